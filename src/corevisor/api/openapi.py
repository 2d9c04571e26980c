"""The API's OpenAPI 3.1 document, generated: paths from routes.py, schemas from the spec.

A partition's table, a channel's and a whole system file's are config/schema.py's
components (derived from spec.py), so a body the API accepts is exactly a system file's
document; the answers' shapes (Partition, Event, ...) are described here, beside the
code that writes them (routes.py, daemon.py). tests/unit/test_openapi.py validates the
document with openapi-spec-validator and checks real answers against its schemas.
"""

from __future__ import annotations

from typing import Any

from corevisor.api.routes import API_VERSION, ROUTES, Route

__all__ = ["document", "REF"]

REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


_STATES = ["created", "running", "paused", "stopped", "restarting"]

# The answers' schemas (what routes.py and daemon.py write).
_ANSWERS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "description": "every error: the one-line message the CLI would print",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
        "additionalProperties": False,
    },
    "Vcpu": {
        "type": "object",
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "pin": {**_nullable("integer"), "description": "the host core it is pinned to"},
            "cpu": {**_nullable("integer"), "description": "the host core it last ran on"},
            "cpu_seconds": {**_nullable("number"), "description": "CPU time of its thread"},
            "exits": {"type": "integer", "minimum": 0, "description": "exits to corevisor"},
        },
        "required": ["index", "pin", "cpu", "cpu_seconds", "exits"],
        "additionalProperties": False,
    },
    "Partition": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "index": {"type": "integer", "minimum": 0, "description": "partition id"},
            "state": {"enum": _STATES},
            "status": {**_nullable("integer"), "description": "how it last ended"},
            "restarts": {"type": "integer", "minimum": 0},
            "last": {"type": "string", "description": "why it last stopped"},
            "channels": {"type": "array", "items": {"type": "string"}},
            "vcpus": {"type": "array", "items": _ref("Vcpu"),
                      "description": "the current machine's vCPUs (none while stopped)"},
            "config": _ref("PartitionSpec"),
        },
        "required": ["name", "index", "state", "status", "restarts", "last", "channels",
                     "vcpus", "config"],
        "additionalProperties": False,
    },
    "PartitionList": {
        "type": "object",
        "properties": {"partitions": {"type": "array", "items": _ref("Partition")}},
        "required": ["partitions"],
        "additionalProperties": False,
    },
    "PartitionCreate": {
        "type": "object",
        "description": "a system file's document with exactly one partition, and channels "
                       "joining it to existing partitions (which must not be running)",
        "properties": {
            "partitions": {
                "type": "object",
                "propertyNames": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$"},
                "additionalProperties": _ref("PartitionSpec"),
                "minProperties": 1,
                "maxProperties": 1,
            },
            "channels": {
                "type": "object",
                "propertyNames": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$"},
                "additionalProperties": _ref("ChannelSpec"),
            },
        },
        "required": ["partitions"],
        "additionalProperties": False,
    },
    "Event": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "time": {"type": "number", "description": "Unix time"},
            "partition": {"type": "string", "description": "or \"system\""},
            "kind": {"enum": ["state", "exit", "stopped", "crash", "watchdog", "restart",
                              "removed", "error", "message"]},
            "message": {"type": "string"},
            "state": {"enum": [*_STATES, None]},
            "status": _nullable("integer"),
            "registers": {"type": "string"},
        },
        "required": ["id", "time", "partition", "kind", "message", "state", "status"],
        "additionalProperties": False,
    },
    "EventList": {
        "type": "object",
        "properties": {"events": {"type": "array", "items": _ref("Event")}},
        "required": ["events"],
        "additionalProperties": False,
    },
    "System": {
        "type": "object",
        "properties": {
            "api": {"type": "string"},
            "pid": {"type": "integer"},
            "socket": {"type": "string"},
            "log_dir": _nullable("string"),
            "started": {"type": "number"},
            "host_cores": {"type": "integer"},
            "partitions": {"type": "integer"},
            "vmm_rss_bytes": {"type": "integer"},
        },
        "required": ["api", "pid", "socket", "log_dir", "started", "host_cores",
                     "partitions", "vmm_rss_bytes"],
        "additionalProperties": False,
    },
}

from corevisor.api.provision import SCHEMAS as _PROVISION  # noqa: E402

_ANSWERS.update(_PROVISION)

_DESCRIPTIONS = {200: "OK", 201: "created", 204: "done, nothing to say", 400: "bad input",
                 404: "no such partition", 409: "the partition's state does not allow it",
                 500: "the daemon could not do it"}


def _content(what: str) -> dict[str, Any]:
    """A response's content: component names and media types, "|" between alternatives."""
    out: dict[str, Any] = {}
    for part in what.split("|"):
        if "/" in part:
            schema: dict[str, Any] = {"type": "string"}
            if part == "application/json":
                schema = {"type": "object"}
            out[part] = {"schema": schema}
        else:
            out["application/json"] = {"schema": _ref(part)}
    return out


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation, "summary": route.summary}
    params: list[dict[str, Any]] = []
    if "{name}" in route.pattern:
        params.append({"name": "name", "in": "path", "required": True,
                       "description": "the partition's name",
                       "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$"}})
    for p in route.query:
        params.append({"name": p.name, "in": "query", "required": False,
                       "description": p.description, "schema": {"type": p.type}})
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(route.body)}}}
    responses: dict[str, Any] = {}
    for status, what in {**route.responses, 500: "Error"}.items():
        entry: dict[str, Any] = {"description": _DESCRIPTIONS.get(status, "")}
        if what:
            entry["content"] = _content(what)
        responses[str(status)] = entry
    op["responses"] = responses
    return op


def document() -> dict[str, Any]:
    """The whole OpenAPI document (GET /openapi.json)."""
    from corevisor.config.schema import components

    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "corevisor",
            "version": API_VERSION,
            "description": "The control API of a corevisor daemon (`corevisor serve`): "
                           "HTTP/1.1 and JSON on a unix socket. docs/api.md is the reference.",
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": paths,
        "components": {"schemas": {**components(REF), **_ANSWERS}},
    }
