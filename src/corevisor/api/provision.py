"""The API's provisioning endpoints: snapshot, restore (clones) and live migration.

    POST /partitions/{name}/snapshot   {"path": DIR}                      -> 201 Snapshot
    POST /partitions/restore?start=    {"path": DIR, "name", "serial", "net", "disk",
                                        "pin", "copy_memory"}             -> 201 Partition
    POST /partitions/{name}/migrate    {"to": ADDR, "max_downtime_ms", "timeout_s",
                                        "bandwidth", "throttle"}          -> 200 Migration
    GET  /partitions/{name}/migration                                     -> 200 MigrationProgress

Each calls the System method of the same purpose (docs/provisioning.md); a snapshot that
cannot be taken or read is 400 (SnapshotError), a migration that failed or was refused is
409 (MigrationError: the partition runs on). A migration's request answers when it is
done; meanwhile GET .../migration tells where it is (`corevisor ctl migrate` draws it).
Paths are the daemon's (ctl sends absolute ones). What does not live here: the other
endpoints (routes.py), the work itself (system.py, snapshot/).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from corevisor.api.server import HttpError, Request, Response, json_response
from corevisor.errors import ConfigError

if TYPE_CHECKING:
    from corevisor.api.daemon import Daemon
    from corevisor.api.routes import Route

__all__ = ["routes", "SCHEMAS"]

_NAME = "/partitions/{name}"
_NAME_PATTERN = "^[a-z][a-z0-9_-]{0,31}$"


def _body(request: Request, kinds: dict[str, type | tuple[type, ...]],
          required: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object of request with only the keys of kinds, each of its type."""
    doc = request.json()
    if not isinstance(doc, dict):
        raise ConfigError("the body must be a JSON object")
    for key, value in doc.items():
        kind = kinds.get(key)
        if kind is None:
            raise ConfigError(f"unknown key {key!r} (known: {', '.join(kinds)})")
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ConfigError(f"{key}: {value!r} is not of the expected type")
    for key in required:
        if key not in doc:
            raise ConfigError(f"missing key {key!r}")
    return doc


def _strings(doc: dict[str, Any], key: str) -> list[str] | None:
    value = doc.get(key)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    return value


def _snapshot(daemon: Daemon, request: Request) -> Response:
    doc = _body(request, {"path": str}, ("path",))
    snap = daemon.system.snapshot(request.params["name"], Path(doc["path"]))
    return json_response({"path": str(snap.path), "ram_bytes": snap.memory.size,
                          "data_bytes": snap.memory.data_bytes,
                          "created": snap.meta.created}, 201)


def _restore(daemon: Daemon, request: Request) -> Response:
    from corevisor.api.routes import partition_json
    from corevisor.provisioning import make_overrides

    doc = _body(request, {"path": str, "name": str, "serial": str, "net": list, "disk": list,
                          "pin": str, "copy_memory": bool}, ("path",))
    o = make_overrides(name=doc.get("name"), serial=doc.get("serial"),
                       nets=_strings(doc, "net"), disks=_strings(doc, "disk"),
                       pin=doc.get("pin"), copy_memory=bool(doc.get("copy_memory")))
    with daemon.creating:
        info = daemon.system.restore(Path(doc["path"]), o, start=request.flag("start"))
    return json_response(partition_json(daemon, info), 201)


def _migrate(daemon: Daemon, request: Request) -> Response:
    doc = _body(request, {"to": str, "max_downtime_ms": (int, float), "timeout_s": (int, float),
                          "bandwidth": (int, float), "throttle": bool}, ("to",))
    downtime = doc.get("max_downtime_ms")
    r = daemon.system.migrate(
        request.params["name"], doc["to"],
        max_downtime=None if downtime is None else downtime / 1000,
        timeout=doc.get("timeout_s"), bandwidth=doc.get("bandwidth"),
        throttle=doc.get("throttle", True),
    )
    return json_response({"address": r.address, "local": r.local, "rounds": r.rounds,
                          "sent_bytes": r.sent_bytes, "downtime_ms": r.downtime_ms,
                          "total_s": r.total_s, "throttle": r.throttle})


def _migration(daemon: Daemon, request: Request) -> Response:
    progress = daemon.system.migration(request.params["name"])
    if progress is None:
        raise HttpError(404, f"partition {request.params['name']} has not been migrated")
    return json_response(progress.as_dict())


def routes() -> tuple[Route, ...]:
    """The provisioning routes, for routes.ROUTES."""
    from corevisor.api.routes import Param, Route

    errors = {400: "Error", 404: "Error", 409: "Error"}
    return (
        Route("POST", f"{_NAME}/snapshot", _snapshot, "snapshotPartition",
              "Save a partition into a snapshot directory; it runs on",
              {201: "Snapshot", **errors}, body="SnapshotRequest"),
        Route("POST", "/partitions/restore", _restore, "restorePartition",
              "Add a partition continuing a snapshot (a clone, with its overrides)",
              {201: "Partition", **errors}, body="RestoreRequest",
              query=(Param("start", "boolean", "start it at once (default false)"),)),
        Route("POST", f"{_NAME}/migrate", _migrate, "migratePartition",
              "Move a partition live to a target waiting on an address; answers when done",
              {200: "Migration", **errors}, body="MigrateRequest"),
        Route("GET", f"{_NAME}/migration", _migration, "getMigration",
              "Where the partition's latest migration is", {200: "MigrationProgress",
                                                            404: "Error"}),
    )


def _obj(props: dict[str, Any], required: list[str], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "required": required,
                           "additionalProperties": False}
    if description:
        out["description"] = description
    return out


_STR = {"type": "string"}
_NUM = {"type": "number", "minimum": 0}
_INT = {"type": "integer", "minimum": 0}

SCHEMAS: dict[str, dict[str, Any]] = {
    "SnapshotRequest": _obj({"path": {**_STR, "description": "a directory that does not "
                                      "exist or is empty"}}, ["path"]),
    "Snapshot": _obj({"path": _STR, "ram_bytes": _INT, "data_bytes": _INT,
                      "created": {"type": "number"}},
                     ["path", "ram_bytes", "data_bytes", "created"]),
    "RestoreRequest": _obj({
        "path": {**_STR, "description": "a partition snapshot directory"},
        "name": {**_STR, "pattern": _NAME_PATTERN},
        "serial": {**_STR, "description": "stdout, null, file:PATH or unix:PATH"},
        "net": {"type": "array", "items": _STR, "description": "a TAP per saved virtio-net"},
        "disk": {"type": "array", "items": _STR, "description": "a disk per saved virtio-blk"},
        "pin": {**_STR, "description": "host cores, e.g. 0,1"},
        "copy_memory": {"type": "boolean"},
    }, ["path"], "what a clone gets instead of what was saved"),
    "MigrateRequest": _obj({
        "to": {**_STR, "description": "tcp:HOST:PORT or unix:PATH, where "
                                      "`corevisor run --incoming` waits"},
        "max_downtime_ms": _NUM, "timeout_s": _NUM,
        "bandwidth": {**_NUM, "description": "bytes/s at most"},
        "throttle": {"type": "boolean"},
    }, ["to"]),
    "Migration": _obj({"address": _STR, "local": {"type": "boolean"}, "rounds": _INT,
                       "sent_bytes": _INT, "downtime_ms": _NUM, "total_s": _NUM,
                       "throttle": _NUM},
                      ["address", "local", "rounds", "sent_bytes", "downtime_ms", "total_s",
                       "throttle"]),
    "MigrationProgress": {"type": "object", "description": "snapshot/migrate.Progress: "
                          "phase, round, sent and remaining bytes, rates, throttle, the "
                          "expected and (once done) the measured downtime"},
}
