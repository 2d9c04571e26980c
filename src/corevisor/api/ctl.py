"""`corevisor ctl`: drive a running daemon from the shell, with the usual CLI habits.

Each command is one or a few API requests (docs/api.md): ``ps`` lists partitions as a
table (``--json``: the API's JSON), ``add FILE`` creates the partitions of a system file,
``start|pause|resume|stop|restart|rm NAME...`` drive them, ``logs NAME [-f]`` prints
serial output, ``events [-f]`` the event log, ``metrics`` the Prometheus text. An error
from the daemon prints its one line as ``corevisor: MESSAGE`` and exits 1; a user error
on ctl's own side (a bad option, an unreadable FILE) exits 2, as for `corevisor run`.

``add FILE`` reads the file here, as `corevisor run` would (paths relative to the file's
directory, images checked), and sends each partition as a system document with absolute
paths, in file order; a channel goes with the later of its two partitions, so both ends
exist by then. What does not live here: HTTP (client.py), the daemon (daemon.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from corevisor.api.client import Client
from corevisor.errors import show

__all__ = ["run_command", "format_table", "VERBS"]

VERBS = ("start", "pause", "resume", "stop", "restart")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart (the last one not padded)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = []
    for row in (header, *rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _size(n: int) -> str:
    from corevisor.config.parse import format_size

    return format_size(n)


def _cores(p: dict[str, Any]) -> str:
    pin = p["config"].get("pin") or []
    return ",".join(str(c) for c in pin) if pin else "any"


def _ps_rows(partitions: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for p in partitions:
        status = "" if p["status"] is None else str(p["status"])
        rows.append([
            p["name"], p["state"], status, str(p["restarts"]), str(p["config"]["cpus"]),
            _size(p["config"]["memory"]), _cores(p), show(p["last"]),
        ])
    return rows


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=1) + "\n")


def _ps(client: Client, args: Any, out: TextIO) -> int:
    partitions = client.json("GET", "/partitions")["partitions"]
    if args.json:
        _print_json(partitions, out)
        return 0
    header = ["NAME", "STATE", "STATUS", "RESTARTS", "CPUS", "MEMORY", "CORES", "LAST"]
    out.write(format_table(header, _ps_rows(partitions)) + "\n")
    return 0


def _documents(path: Path) -> list[dict[str, Any]]:
    """The file's partitions, one system document each, in file order (see the docstring)."""
    from corevisor.config.document import channel_document, partition_document
    from corevisor.config.toml import read_system

    system = read_system(path)
    order = [p.name for p in system.partitions]
    bodies = []
    for i, p in enumerate(system.partitions):
        body: dict[str, Any] = {"partitions": {p.name: partition_document(p)}}
        mine = {
            c.name: channel_document(c)
            for c in system.channels
            if p.name in c.between and all(
                end == p.name or end not in order or order.index(end) < i for end in c.between
            )
        }
        if mine:
            body["channels"] = mine
        bodies.append(body)
    return bodies


def _states(partitions: list[dict[str, Any]], args: Any, out: TextIO) -> int:
    """What add and the verbs print: each partition's new state (or the API's JSON)."""
    if args.json:
        _print_json(partitions, out)
    else:
        for p in partitions:
            out.write(f"{p['name']}: {p['state']}\n")
    return 0


def _add(client: Client, args: Any, out: TextIO) -> int:
    query = "?start=true" if args.start else ""
    bodies = _documents(Path(args.file))
    return _states([client.json("POST", "/partitions" + query, b) for b in bodies], args, out)


def _verb(client: Client, args: Any, out: TextIO) -> int:
    results = [client.json("POST", f"/partitions/{name}/{args.command}") for name in args.names]
    return _states(results, args, out)


def _rm(client: Client, args: Any, out: TextIO) -> int:
    for name in args.names:
        client.request("DELETE", f"/partitions/{name}")
        if not args.json:
            out.write(f"{name}: removed\n")
    if args.json:
        _print_json([{"name": n, "removed": True} for n in args.names], out)
    return 0


def _inspect(client: Client, args: Any, out: TextIO) -> int:
    _print_json(client.json("GET", f"/partitions/{args.name}"), out)
    return 0


def _logs(client: Client, args: Any, out: TextIO) -> int:
    binary = getattr(out, "buffer", None)
    path = f"/partitions/{args.name}/serial" + ("?follow=true" if args.follow else "")
    chunks = client.stream(path) if args.follow else iter([client.request("GET", path)])
    for chunk in chunks:
        if binary is not None:
            binary.write(chunk)
            binary.flush()
        else:
            out.write(chunk.decode(errors="replace"))
            out.flush()
    return 0


def _event_line(e: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
    return f"{when}  {e['partition']}  {e['kind']}  {show(e['message'], limit=None)}"


def _events(client: Client, args: Any, out: TextIO) -> int:
    if not args.follow:
        events = client.json("GET", "/events")["events"]
        for e in events:
            out.write((json.dumps(e) if args.json else _event_line(e)) + "\n")
        return 0
    pending = b""
    for chunk in client.stream("/events?follow=true&since=0"):
        pending += chunk
        while b"\n\n" in pending:
            block, pending = pending.split(b"\n\n", 1)
            for line in block.decode().splitlines():
                if line.startswith("data: "):
                    e = json.loads(line[6:])
                    out.write((json.dumps(e) if args.json else _event_line(e)) + "\n")
                    out.flush()
    return 0


def _metrics(client: Client, args: Any, out: TextIO) -> int:
    path = "/metrics?format=json" if args.json else "/metrics"
    out.write(client.request("GET", path).decode())
    return 0


_COMMANDS = {
    "ps": _ps,
    "add": _add,
    "rm": _rm,
    "inspect": _inspect,
    "logs": _logs,
    "events": _events,
    "metrics": _metrics,
    **dict.fromkeys(VERBS, _verb),
}


def run_command(args: Any, out: TextIO | None = None) -> int:
    """One parsed ctl command line (commands.py) against the daemon at args.socket."""
    client = Client(args.socket)
    return _COMMANDS[args.command](client, args, out if out is not None else sys.stdout)
