"""The JSON schema of a partition and of a system, derived from the spec types (spec.py).

The document a user writes — a system file's tables, the API's JSON body of a new
partition — has the spec's fields as keys, with the written forms of values ("64M",
"file:PATH", "HOST:PORT"). So the schema is generated, never written by hand: msgspec
walks the spec dataclasses (types, enums, defaults, docstrings) and each field's ``doc``
metadata (spec.doc) turns the spec's shape into the document's — a key renamed
(virtio_console), a field omitted (the partition's name is its table's key), a group
flattened (blk, net, rng sit in the partition table), a value's written form (a size,
a CPU list, a serial setting). tests/unit/test_schema.py validates real system files
against it, so the schema and the reader (toml.py) cannot drift apart unnoticed.

``components(ref_template)`` gives the same schemas as named components for the
OpenAPI document (``#/components/schemas/{name}``).

msgspec is imported only here, when a schema is asked for: it costs `corevisor run`
nothing (its import took ~13 ms beyond what `run` already imports, measured with
``python -X importtime``).
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

from corevisor.spec import (
    NAME_PATTERN,
    ChannelSpec,
    PartitionSpec,
    SystemSpec,
    document_fields,
)

__all__ = ["partition_schema", "system_schema", "components", "JSON_SCHEMA_DIALECT"]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_DEFS = "#/$defs/{name}"
_NAME = {"type": "string", "pattern": f"^{NAME_PATTERN}$"}


def _hook(t: type) -> dict[str, Any]:
    """Schemas of the types msgspec does not know: a path is a string."""
    if isinstance(t, type) and issubclass(t, Path):
        return {"type": "string"}
    raise NotImplementedError(t)


def components(ref_template: str = _DEFS) -> dict[str, dict[str, Any]]:
    """Every schema a system document uses, by name, refs made with ref_template."""
    import msgspec  # lazily: only schema users pay for it

    _, raw = msgspec.json.schema_components(
        [PartitionSpec, ChannelSpec], schema_hook=_hook, ref_template=ref_template
    )
    classes = _spec_classes((PartitionSpec, ChannelSpec))
    out: dict[str, dict[str, Any]] = {}
    for name, schema in raw.items():
        cls = classes.get(name)
        if cls is not None and hasattr(cls, "document_schema"):
            out[name] = {"title": name, **cls.document_schema()}
        elif cls is not None and dataclasses.is_dataclass(cls):
            out[name] = _document_object(cls, raw)
        else:
            out[name] = schema
    out["SystemSpec"] = _system(ref_template)
    # Keep what a document refers to: a flattened group or the kind inside a serial
    # setting's string has no schema of its own.
    used = _referenced(out, ref_template, ("PartitionSpec", "ChannelSpec", "SystemSpec"))
    return {name: schema for name, schema in out.items() if name in used}


def _referenced(
    schemas: dict[str, dict[str, Any]], ref_template: str, roots: tuple[str, ...]
) -> set[str]:
    """The names reachable from roots through $ref."""
    prefix = ref_template.split("{name}")[0]
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        stack: list[Any] = [schemas[name]]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str) and ref.startswith(prefix):
                    todo.append(ref[len(prefix):])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return seen


def _spec_classes(roots: tuple[type, ...]) -> dict[str, type]:
    """The dataclasses (and enums) reachable from roots, by name."""
    import typing

    seen: dict[str, type] = {}
    todo = list(roots)
    while todo:
        cls = todo.pop()
        if cls.__name__ in seen:
            continue
        seen[cls.__name__] = cls
        if not dataclasses.is_dataclass(cls):
            continue
        for hint in typing.get_type_hints(cls).values():
            for arg in (hint, *typing.get_args(hint)):
                for t in (arg, *typing.get_args(arg)):
                    if isinstance(t, type) and (dataclasses.is_dataclass(t) or _is_enum(t)):
                        todo.append(t)
    return seen


def _is_enum(t: type) -> bool:
    return issubclass(t, enum.Enum)


def _document_object(cls: type, raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The schema of cls's document table: its doc fields as keys, additional ones refused."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for d in document_fields(cls):
        owner = cls
        for step in d.path[:-1]:  # a flattened group: the field lives in the group's class
            owner = type(next(f for f in dataclasses.fields(owner) if f.name == step).default)
        generated = raw[owner.__name__]["properties"][d.field.name]
        schema = dict(d.schema) if d.schema is not None else _without_null(generated)
        if d.description:
            schema["description"] = d.description
        default = _document_default(d.field)
        if default is not dataclasses.MISSING:
            schema["default"] = default
        if d.field.default is dataclasses.MISSING is d.field.default_factory:
            required.append(d.key)
        properties[d.key] = schema
    out: dict[str, Any] = {"title": cls.__name__, "type": "object"}
    if cls.__doc__:  # its first paragraph: what the table is, not how Python holds it
        out["description"] = " ".join(cls.__doc__.split("\n\n")[0].split())
    out["properties"] = properties
    if required:
        out["required"] = required
    one_of = getattr(cls, "DOCUMENT_ONE_OF", ())
    if one_of:  # exactly one of these keys (a partition's image, or its bios)
        out["oneOf"] = [{"required": [key]} for key in one_of]
    out["additionalProperties"] = False
    return out


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field is left out of a document, never written as null (TOML has none)."""
    alternatives = schema.get("anyOf")
    if alternatives is None:
        return {k: v for k, v in schema.items() if k != "default"}
    kept = [a for a in alternatives if a != {"type": "null"}]
    return dict(kept[0]) if len(kept) == 1 else {"anyOf": kept}


def _document_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default as a document would write it; MISSING when it has none to show."""
    value = f.default
    if value is dataclasses.MISSING or value is None:
        return dataclasses.MISSING
    if hasattr(type(value), "document_schema"):  # SerialSpec(): "stdout"
        return str(value)
    if isinstance(value, tuple):
        return list(value) if not value or not dataclasses.is_dataclass(value[0]) else []
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool | int | str):
        return value
    return dataclasses.MISSING


def _field_description(cls: type, name: str) -> str:
    """The doc metadata description of one spec field."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("doc", {}).get("description", ""))
    raise KeyError(name)


def _system(ref_template: str) -> dict[str, Any]:
    """A system file: partitions (and channels) keyed by name, and the [system] table."""

    def keyed(component: str, what: str) -> dict[str, Any]:
        return {
            "type": "object",
            "description": f"{what}, by name",
            "propertyNames": _NAME,
            "additionalProperties": {"$ref": ref_template.format(name=component)},
        }

    partitions = keyed("PartitionSpec", "the partitions (one VM each)")
    partitions["minProperties"] = 1
    return {
        "title": "SystemSpec",
        "description": " ".join((SystemSpec.__doc__ or "").split()),
        "type": "object",
        "properties": {
            "partitions": partitions,
            "channels": keyed("ChannelSpec", "shared memory between two partitions"),
            "system": {
                "type": "object",
                "properties": {
                    "log_dir": {
                        "type": "string",
                        "minLength": 1,
                        "description": "per-partition serial logs (default: a new temp dir)",
                    },
                    "sandbox": {
                        "type": "boolean",
                        "default": True,
                        "description": _field_description(SystemSpec, "sandbox"),
                    },
                },
                "additionalProperties": False,
            },
        },
        "required": ["partitions"],
        "additionalProperties": False,
    }


def _standalone(root: str) -> dict[str, Any]:
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$ref": _DEFS.format(name=root),
        "$defs": components(_DEFS),
    }


def partition_schema() -> dict[str, Any]:
    """The JSON schema of one partition table (a [partitions.NAME] table, an API body)."""
    return _standalone("PartitionSpec")


def system_schema() -> dict[str, Any]:
    """The JSON schema of a whole system file."""
    return _standalone("SystemSpec")
