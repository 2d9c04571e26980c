"""A spec written back as its document: the JSON object (or TOML table) that reads as it.

The inverse of toml.py's readers, for whoever must show or send a spec in the written
form the schema (schema.py) describes: the API answers GET /partitions/NAME with the
partition's table, and `corevisor ctl add FILE` reads a system file on the client's side
(paths resolved against the file's directory) and sends its partitions as documents
whose paths are absolute. ``partition_from_table(name, partition_document(p), ...)``
gives p back (tests/unit/test_document.py checks the round trip).

Every key the spec has a value for is written, defaults included (a reader sees what the
partition got, not what someone typed); values that are None are left out, as TOML has
no null. What does not live here: reading documents (toml.py), their schema (schema.py).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from corevisor.spec import (
    BlkSpec,
    ChannelSpec,
    DeviceSpace,
    DeviceSpec,
    HostPort,
    ModuleSpec,
    NetSpec,
    PartitionSpec,
    PciAddress,
    SerialSpec,
    SystemSpec,
    document_fields,
)

__all__ = ["partition_document", "channel_document", "system_document"]


def _value(value: object) -> Any:
    """One spec value in its written form."""
    if isinstance(value, SerialSpec | HostPort | Path | PciAddress):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, BlkSpec):
        return {"path": str(value.path), "readonly": value.readonly}
    if isinstance(value, NetSpec):
        return {"tap": value.tap}
    if isinstance(value, ModuleSpec):
        return f"{value.path},{value.string}"
    if isinstance(value, DeviceSpec):  # its own keys, then its parameters (userdev/load.py)
        base = None if value.space is DeviceSpace.PCI else value.base  # a PCI BAR is placed
        own = {"class": value.cls, "name": value.name, "base": base, "gsi": value.gsi}
        params = {k: _value(v) for k, v in value.params}
        return {**{k: v for k, v in own.items() if v is not None}, **params}
    if isinstance(value, tuple):
        return [_value(v) for v in value]
    return value


def _document(spec: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in document_fields(type(spec)):
        value: Any = spec
        for step in d.path:
            value = getattr(value, step)
        if value is not None:
            out[d.key] = _value(value)
    return out


def partition_document(p: PartitionSpec) -> dict[str, Any]:
    """The [partitions.NAME] table of p (its name is the table's key, not in it)."""
    return _document(p)


def channel_document(c: ChannelSpec) -> dict[str, Any]:
    """The [channels.NAME] table of c; a one-way channel's direction as "writer->reader"."""
    out = _document(c)
    if c.writer is not None:
        out["direction"] = f"{c.writer}->{c.reader}"
    return out


def system_document(system: SystemSpec) -> dict[str, Any]:
    """A whole system file's document (the API's body of POST /partitions)."""
    out: dict[str, Any] = {
        "partitions": {p.name: partition_document(p) for p in system.partitions}
    }
    if system.channels:
        out["channels"] = {c.name: channel_document(c) for c in system.channels}
    if system.log_dir is not None:
        out["system"] = {"log_dir": str(system.log_dir)}
    return out
