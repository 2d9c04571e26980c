"""The API's endpoints: what each does with the daemon's System, and how it is documented.

Every endpoint is one Route: method, path pattern (``/partitions/{name}/pause``), the
handler, and what openapi.py needs to describe it (summary, query parameters, body and
responses). The router matches a request's path to a pattern, then its method (405 with
Allow when only the method is wrong, 404 ``no such endpoint`` when nothing matches).

Errors are JSON ``{"error": MESSAGE}`` with the same one line the CLI would print:

    400  bad input: ConfigError, LoaderError (a body, a value, a query parameter),
         SnapshotError (a snapshot that cannot be taken or read)
    404  NotFoundError: no partition by that name
    409  StateError: the partition's state does not allow it; MigrationError
    500  anything else the daemon could not do (a KvmError while building, a bug)

A new partition's body is a system document (the schema of a system file, with exactly
one partition, and optionally its channels to existing partitions; no [system] table):
it is read by config/toml.py, checked by config/validate.validate_addition against the
running system and the host now, then built. Relative paths in it are relative to the
daemon's working directory (`corevisor ctl add` sends absolute ones).

What does not live here: HTTP itself (server.py), the OpenAPI document (openapi.py),
metric values (metrics.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corevisor.api.provision import routes as provision_routes
from corevisor.api.server import HttpError, Request, Response, Stream, json_response
from corevisor.errors import (
    ConfigError,
    CorevisorError,
    LoaderError,
    MigrationError,
    NotFoundError,
    SnapshotError,
    StateError,
    quote,
    show,
)
from corevisor.system import PartitionInfo

if TYPE_CHECKING:
    from corevisor.api.daemon import Daemon
    from corevisor.spec import ChannelSpec, PartitionSpec

__all__ = ["Route", "Param", "ROUTES", "Router", "partition_json", "status_of"]

HEARTBEAT = 1.0  # seconds between a serial stream's checks that its client is there
API_VERSION = "1.0"
_CREATE_KEYS = ("partitions", "channels")


def status_of(e: CorevisorError) -> int:
    """The HTTP status of an error raised on purpose."""
    if isinstance(e, HttpError):
        return e.status
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, StateError):
        return 409
    if isinstance(e, ConfigError | LoaderError | SnapshotError):
        return 400
    if isinstance(e, MigrationError):
        return 409  # refused or failed: the partition runs on where it was
    return 500


@dataclass(frozen=True)
class Param:
    """A query parameter, for the OpenAPI document."""

    name: str
    type: str  # "boolean" | "integer" | "string"
    description: str


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Callable[[Daemon, Request], Response | Stream]
    operation: str  # OpenAPI operationId
    summary: str
    responses: dict[int, str]  # status -> what it carries: a component name or a media type
    body: str | None = None  # the component name of the JSON body
    query: tuple[Param, ...] = ()

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


# ---------------------------------------------------------------------- representations


def _vcpus(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    from corevisor.api.metrics import thread_cpu

    m = daemon.system.machine(name)
    out = []
    for v in m.vcpus if m is not None else ():
        tid = v.native_id
        cpu = thread_cpu(tid) if tid is not None and v.alive else None
        out.append({
            "index": v.index,
            "pin": v.host_core,
            "cpu": cpu[0] if cpu else None,  # the host core it last ran on
            "cpu_seconds": cpu[1] if cpu else None,
            "exits": v.exits,
        })
    return out


def partition_json(daemon: Daemon, info: PartitionInfo) -> dict[str, Any]:
    """What GET /partitions/NAME answers (component Partition)."""
    from corevisor.config.document import partition_document

    channels = [ch.name for ch in daemon.system.channels() if info.name in ch.config.between]
    return {
        "name": info.name,
        "index": info.index,
        "state": info.state.value,
        "status": info.status,
        "restarts": info.restarts,
        "last": info.last,
        "channels": channels,
        "vcpus": _vcpus(daemon, info.name),
        "config": partition_document(info.config),
    }


# ---------------------------------------------------------------------- handlers


def _list(daemon: Daemon, request: Request) -> Response:
    infos = daemon.system.partitions()
    return json_response({"partitions": [partition_json(daemon, i) for i in infos]})


def _get(daemon: Daemon, request: Request) -> Response:
    return json_response(partition_json(daemon, daemon.system.partition(request.params["name"])))


def _read_body(daemon: Daemon, doc: object) -> tuple[PartitionSpec, tuple[ChannelSpec, ...]]:
    """A system document with one partition -> its spec and channels (unvalidated)."""
    from corevisor.config.parse import type_name
    from corevisor.config.toml import system_from_document

    if not isinstance(doc, dict):
        raise ConfigError(f"request body: expected a JSON object, got {type_name(doc)}")
    for key in doc:
        if key not in _CREATE_KEYS:
            hint = " (log_dir is the daemon's)" if key == "system" else ""
            raise ConfigError(
                f"request body: unknown key {quote(key)} (known: {', '.join(_CREATE_KEYS)})"
                + hint
            )
    tables = doc.get("partitions")
    if not isinstance(tables, dict) or len(tables) != 1:
        shown = type_name(tables) if not isinstance(tables, dict) else f"{len(tables)} tables"
        raise ConfigError(f"partitions: expected one partition table by name, got {shown}")
    system = system_from_document(doc, "", daemon.base)
    spec = system.partitions[0]
    for c in system.channels:
        if spec.name not in c.between:
            raise ConfigError(
                f"channels.{c.name}.between: a new channel must join the new partition "
                f"{spec.name}"
            )
    return spec, system.channels


def _create(daemon: Daemon, request: Request) -> Response:
    from corevisor.config.host import gather
    from corevisor.config.validate import validate_addition

    start = request.flag("start")
    spec, channels = _read_body(daemon, request.json())
    system = daemon.system
    with daemon.creating:  # validated against what exists, until it exists too
        running = system.spec()
        if spec.name in {p.name for p in running.partitions}:
            raise StateError(f"cannot add partition {spec.name}: a partition of that name exists")
        taken = {c.name for c in running.channels} & {c.name for c in channels}
        if taken:
            raise StateError(
                f"cannot add channel {sorted(taken)[0]}: a channel of that name exists")
        spec, placed = validate_addition(spec, running, gather(), channels=channels)
        system.add(spec, placed)
    if start:
        try:
            system.start(spec.name)
        except CorevisorError:
            pass  # the partition exists, stopped: its state and "last" say why
    return json_response(partition_json(daemon, system.partition(spec.name)), 201)


def _transition(verb: str) -> Callable[[Daemon, Request], Response]:
    def handler(daemon: Daemon, request: Request) -> Response:
        name = request.params["name"]
        getattr(daemon.system, verb)(name)
        return json_response(partition_json(daemon, daemon.system.partition(name)))

    handler.__name__ = f"_{verb}"
    return handler


def _remove(daemon: Daemon, request: Request) -> Response:
    daemon.system.remove(request.params["name"])
    return Response(204)


def _serial(daemon: Daemon, request: Request) -> Response | Stream:
    tap = daemon.system.serial(request.params["name"])
    follow = request.flag("follow")
    backlog, watch = tap.watch()
    if not follow:
        watch.close()
        return Response(200, backlog, "application/octet-stream")

    def chunks() -> Iterator[bytes]:
        try:
            yield backlog
            while True:
                data = watch.take(HEARTBEAT)
                if data is None:
                    return
                yield data
        finally:
            watch.close()

    return Stream(chunks())


def _events(daemon: Daemon, request: Request) -> Response | Stream:
    from corevisor.api.daemon import event_stream

    after = request.number("since", 0)
    if request.flag("follow"):
        return Stream(event_stream(daemon.events, after), "text/event-stream")
    return json_response({"events": [e.to_json() for e in daemon.events.since(after)]})


def _metrics(daemon: Daemon, request: Request) -> Response:
    from corevisor.api import metrics

    families = metrics.collect(daemon)
    fmt = request.query.get("format", ["text"])[-1]
    if fmt == "json":
        return json_response(metrics.to_json(families))
    if fmt != "text":
        raise HttpError(400, f"query parameter format: {show(fmt)} is not text or json")
    return Response(200, metrics.to_text(families).encode(), metrics.CONTENT_TYPE)


def _openapi(daemon: Daemon, request: Request) -> Response:
    from corevisor.api.openapi import document

    return json_response(document())


def _system(daemon: Daemon, request: Request) -> Response:
    import os

    from corevisor.api.metrics import vmm_rss

    return json_response({
        "api": API_VERSION,
        "pid": os.getpid(),
        "socket": daemon.socket_path,
        "log_dir": str(daemon.system.log_dir) if daemon.system.log_dir else None,
        "started": daemon.started,
        "host_cores": os.cpu_count(),
        "partitions": len(daemon.system.partitions()),
        "vmm_rss_bytes": vmm_rss(),
    })


# ---------------------------------------------------------------------- the table

_NAME = "/partitions/{name}"
_ERRORS = {400: "Error", 404: "Error", 409: "Error"}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/system", _system, "getSystem", "The daemon: pid, socket, log directory",
          {200: "System"}),
    Route("GET", "/partitions", _list, "listPartitions", "Every partition with its state",
          {200: "PartitionList"}),
    Route("POST", "/partitions", _create, "createPartition",
          "Build a new partition (and its channels) while the others run",
          {201: "Partition", **_ERRORS}, body="PartitionCreate",
          query=(Param("start", "boolean", "start it at once (default false)"),)),
    Route("GET", _NAME, _get, "getPartition", "One partition", {200: "Partition", 404: "Error"}),
    Route("DELETE", _NAME, _remove, "removePartition",
          "Remove a created or stopped partition (and its channels)", {204: "", **_ERRORS}),
    *(
        Route("POST", f"{_NAME}/{verb}", _transition(verb), f"{verb}Partition", summary,
              {200: "Partition", 404: "Error", 409: "Error"})
        for verb, summary in (
            ("start", "created -> running"),
            ("pause", "running -> paused: every vCPU parked"),
            ("resume", "paused -> running"),
            ("stop", "created | running | paused -> stopped"),
            ("restart", "running | paused | stopped -> running, on a fresh machine"),
        )
    ),
    Route("GET", f"{_NAME}/serial", _serial, "getSerial",
          "Serial output: the newest 64 KiB kept, then (follow) every byte as it comes",
          {200: "application/octet-stream", 400: "Error", 404: "Error"},
          query=(Param("follow", "boolean", "keep streaming (chunked) until the partition "
                       "is removed or the daemon stops"),)),
    Route("GET", "/events", _events, "getEvents",
          "Events (state changes, ends, crashes, restarts, watchdog expiries)",
          {200: "EventList|text/event-stream", 400: "Error"},
          query=(Param("since", "integer", "only events with a larger id (default 0: all "
                       "kept)"),
                 Param("follow", "boolean", "stream them as Server-Sent Events, then every "
                       "later one"))),
    Route("GET", "/metrics", _metrics, "getMetrics", "Prometheus metrics",
          {200: "text/plain", 400: "Error"},
          query=(Param("format", "string", "text (Prometheus 0.0.4, default) or json"),)),
    Route("GET", "/openapi.json", _openapi, "getOpenApi", "This API's OpenAPI document",
          {200: "application/json"}),
    *provision_routes(),  # snapshot, restore, migrate (api/provision.py)
)


class Router:
    """Request -> the matching route's answer; CorevisorErrors as JSON errors."""

    def __init__(self, daemon: Daemon, routes: tuple[Route, ...] = ROUTES) -> None:
        self.daemon = daemon
        self._routes = [(r, r.regex) for r in routes]

    def __call__(self, request: Request) -> Response | Stream:
        method = "GET" if request.method == "HEAD" else request.method
        allowed: list[str] = []
        for route, regex in self._routes:
            match = regex.match(request.path)
            if match is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            request.params = match.groupdict()
            try:
                return route.handler(self.daemon, request)
            except HttpError:
                raise
            except CorevisorError as e:
                raise HttpError(status_of(e), str(e)) from None
        if allowed:
            raise HttpError(
                405,
                f"{show(request.method)} is not allowed on {show(request.path)} "
                f"(allowed: {', '.join(sorted(set(allowed)))})",
                {"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise HttpError(404, f"no such endpoint: {show(request.method)} {show(request.path)}")
