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
from corevisor.errors import CorevisorError, show

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
    if args.restore is not None:
        return _states([client.json("POST", "/partitions/restore" + query,
                                    _restore_body(args))], args, out)
    if args.file is None:
        raise CorevisorError("ctl add: give a system FILE or --restore DIR")
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


# --- provisioning: snapshot, add --restore, migrate ---------------------------------------


def add_provision_arguments(cmds: Any, add: Any, as_json: Any) -> None:
    """`ctl add --restore DIR [overrides]`, `ctl snapshot NAME DIR`, `ctl migrate NAME ADDR`."""
    add.add_argument("--restore", metavar="DIR", help="a partition continuing this snapshot")
    add.add_argument("--name", help="with --restore: the clone's name")
    add.add_argument("--serial", help="with --restore: its serial line")
    add.add_argument("--net", action="append", metavar="TAP", help="with --restore: a TAP")
    add.add_argument("--disk", action="append", metavar="PATH", help="with --restore: a disk")
    add.add_argument("--pin", help="with --restore: host cores")
    add.add_argument("--copy-memory", action="store_true",
                     help="with --restore: copy the saved RAM (default: map it)")
    snap = cmds.add_parser("snapshot", parents=[as_json],
                           help="save a partition into a directory; it runs on")
    snap.add_argument("name", metavar="NAME")
    snap.add_argument("dir", metavar="DIR")
    mig = cmds.add_parser("migrate", parents=[as_json],
                          help="move a partition live to `corevisor run --incoming ADDR`")
    mig.add_argument("name", metavar="NAME")
    mig.add_argument("to", metavar="ADDR", help="tcp:HOST:PORT or unix:PATH")
    mig.add_argument("--max-downtime", type=float, metavar="MS", help="default 300")
    mig.add_argument("--timeout", type=float, metavar="S", help="default 300")
    mig.add_argument("--bandwidth", type=float, metavar="BYTES/S")


def _restore_body(args: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"path": str(Path(args.restore).absolute())}
    for key in ("name", "serial", "pin"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.net:
        body["net"] = args.net
    if args.disk:
        body["disk"] = [str(Path(d).absolute()) for d in args.disk]
    if args.copy_memory:
        body["copy_memory"] = True
    return body


def _snapshot(client: Client, args: Any, out: TextIO) -> int:
    answer = client.json("POST", f"/partitions/{args.name}/snapshot",
                         {"path": str(Path(args.dir).absolute())})
    if args.json:
        _print_json(answer, out)
    else:
        out.write(f"{args.name}: saved in {answer['path']} "
                  f"({answer['data_bytes'] / 2**20:.1f} MiB of RAM data)\n")
    return 0


def _migrate(client: Client, args: Any, out: TextIO) -> int:
    """POST .../migrate (answered when done) while another request polls the progress
    for the bar (provisioning.ProgressBar, on stderr when it is a terminal)."""
    import threading

    from corevisor.api.client import Client as Polling
    from corevisor.provisioning import ProgressBar

    body: dict[str, Any] = {"to": args.to}
    for key, value in (("max_downtime_ms", args.max_downtime), ("timeout_s", args.timeout),
                       ("bandwidth", args.bandwidth)):
        if value is not None:
            body[key] = value
    result: dict[str, Any] = {}

    def request() -> None:
        try:
            result["answer"] = Client(client.socket_path, timeout=None).json(
                "POST", f"/partitions/{args.name}/migrate", body)
        except CorevisorError as e:
            result["error"] = e

    thread = threading.Thread(target=request, name="ctl-migrate", daemon=True)
    thread.start()
    bar = ProgressBar("migrating out")
    poll = Polling(client.socket_path)
    while thread.is_alive():
        thread.join(0.2)
        try:
            bar(poll.json("GET", f"/partitions/{args.name}/migration"))
        except CorevisorError:
            pass  # not started yet, or already gone: the answer says how it went
    bar({"phase": "failed" if "error" in result else "done"})
    if "error" in result:
        raise result["error"]
    answer = result["answer"]
    if args.json:
        _print_json(answer, out)
    else:
        out.write(f"{args.name}: migrated to {answer['address']} in {answer['total_s']:.1f} s, "
                  f"{answer['rounds']} rounds, {answer['downtime_ms']:.0f} ms down\n")
    return 0


_COMMANDS = {
    "ps": _ps,
    "snapshot": _snapshot,
    "migrate": _migrate,
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
