"""`corevisor top`: a live terminal view of a running daemon's partitions.

Every interval it asks the daemon for its partitions (GET /partitions) and metrics
(GET /metrics?format=json) and shows one row per partition: state, host cores (pinned,
and where the vCPUs last ran), vCPU use (CPU time of the vCPU threads per second of
wall time: 100% is one core), exits per second (total, then the busiest reasons), serial
and virtio bytes per second, restarts. Rates need two looks, so the first screen shows
"-" for them. The view uses the terminal's alternate screen (rich's Live) and ends with
Ctrl-C (exit 130) or when the daemon goes away (exit 1, its one-line reason).
``--once`` prints one view (two looks, one interval apart) and exits 0.

rich is imported only here; its import (~50 ms) is paid by `top` alone.
What does not live here: the numbers (metrics.py), HTTP (client.py).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from corevisor.api.client import Client

__all__ = ["run_top", "Snapshot", "take", "rows"]

_HEADER = ("NAME", "STATE", "CORES", "vCPU", "EXITS/s", "BY REASON", "SERIAL/s", "VIRTIO/s",
           "RESTARTS")


@dataclass
class Snapshot:
    """One look at the daemon: its partitions and the counters rates are made of."""

    when: float
    partitions: list[dict[str, Any]]
    rss: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    exits: dict[str, dict[str, float]] = field(default_factory=dict)  # partition -> reason
    serial: dict[str, float] = field(default_factory=dict)
    virtio: dict[str, float] = field(default_factory=dict)


def take(client: Client) -> Snapshot:
    partitions = client.json("GET", "/partitions")["partitions"]
    metrics = client.json("GET", "/metrics?format=json")["metrics"]
    snap = Snapshot(time.monotonic(), partitions)
    exits: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for fam in metrics:
        name = fam["name"]
        for s in fam["samples"]:
            labels, value = s["labels"], float(s["value"])
            part = labels.get("partition", "")
            if name == "corevisor_vcpu_cpu_seconds_total":
                snap.cpu[part] = snap.cpu.get(part, 0.0) + value
            elif name == "corevisor_vcpu_exits_total":
                exits[part][labels["reason"]] += value
            elif name == "corevisor_serial_output_bytes_total":
                snap.serial[part] = value
            elif name in ("corevisor_virtio_to_guest_bytes_total",
                          "corevisor_virtio_from_guest_bytes_total"):
                snap.virtio[part] = snap.virtio.get(part, 0.0) + value
            elif name == "corevisor_vmm_resident_memory_bytes":
                snap.rss = value
    snap.exits = {k: dict(v) for k, v in exits.items()}
    return snap


def _rate(new: float | None, old: float | None, seconds: float) -> float | None:
    if new is None or old is None or seconds <= 0:
        return None
    return max(new - old, 0.0) / seconds  # a rebuilt machine starts its counters at 0


def _count(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x:.0f} B"


def _cores(p: dict[str, Any]) -> str:
    pin = p["config"].get("pin") or []
    ran = sorted({v["cpu"] for v in p["vcpus"] if v["cpu"] is not None})
    pinned = ",".join(map(str, pin)) if pin else "any"
    return pinned + (f" (on {','.join(map(str, ran))})" if ran else "")


def rows(new: Snapshot, old: Snapshot | None) -> list[list[str]]:
    """The table's rows: one per partition, rates against the previous look."""
    seconds = new.when - old.when if old is not None else 0.0
    out = []
    for p in new.partitions:
        name = p["name"]
        running = p["state"] in ("running", "paused")
        before = old if old is not None else None
        cpu = _rate(new.cpu.get(name), before.cpu.get(name) if before else None, seconds)
        reasons = new.exits.get(name, {})
        old_reasons = before.exits.get(name, {}) if before else {}
        by_reason = {
            r: _rate(n, old_reasons.get(r), seconds) for r, n in reasons.items()
        } if before else {}
        total = sum(v for v in by_reason.values() if v is not None) if by_reason else None
        busiest = sorted(((v, r) for r, v in by_reason.items() if v), reverse=True)[:3]
        out.append([
            name,
            p["state"],
            _cores(p),
            "-" if cpu is None or not running else f"{cpu * 100:.0f}%",
            _count(total) if running else "-",
            " ".join(f"{r} {_count(v)}" for v, r in busiest) if running else "",
            _bytes(_rate(new.serial.get(name), before.serial.get(name) if before else None,
                         seconds)),
            _bytes(_rate(new.virtio.get(name), before.virtio.get(name) if before else None,
                         seconds)) if name in new.virtio else "-",
            str(p["restarts"]),
        ])
    return out


def _render(client: Client, new: Snapshot, old: Snapshot | None) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = Text(
        f"corevisor top - {client.socket_path} - {len(new.partitions)} partitions - "
        f"VMM RSS {_bytes(new.rss)} - {time.strftime('%H:%M:%S')}",
        style="bold",
    )
    table = Table(box=None, header_style="bold reverse", pad_edge=False)
    for i, h in enumerate(_HEADER):
        table.add_column(h, justify="right" if i >= 3 else "left", no_wrap=True)
    colours = {"running": "green", "paused": "yellow", "stopped": "red",
               "restarting": "magenta"}
    for name, state, *rest in rows(new, old):
        table.add_row(name, Text(state, style=colours.get(state, "")), *rest)
    return Group(title, table, Text("Ctrl-C to quit", style="dim"))


def run_top(socket_path: str, interval: float, once: bool) -> int:
    """The live view until Ctrl-C (or one view with once)."""
    from rich.console import Console
    from rich.live import Live

    client = Client(socket_path, timeout=30)
    console = Console()
    old = take(client)
    if once:
        time.sleep(interval)
        console.print(_render(client, take(client), old))
        return 0
    with Live(_render(client, old, None), console=console, screen=True,
              auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            new = take(client)
            live.update(_render(client, new, old), refresh=True)
            old = new
