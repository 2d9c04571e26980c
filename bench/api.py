#!/usr/bin/env python3
"""The daemon's API benchmark (P2b): starting a partition through a running daemon against
QEMU's cold start, API request latency, and the daemon's idle CPU.

  (a) start-up: from just before the request `POST /partitions` that creates a `hello`
      partition in a running `corevisor serve`, then `POST /partitions/NAME/start`, to
      the first byte of its serial output, against `qemu-system-x86_64 -M microvm`
      started cold on the same image (spawn -> first byte on stdout, bench/run.py's
      measurement); `corevisor run` cold is there for context. Target: <= 0.5x QEMU.
      The partition's serial line is `unix:` a socket this benchmark connects to between
      the two requests (the connection waits in the listen backlog until the machine
      starts), so its first byte arrives the moment the guest's UART write reaches the
      daemon's backend. After each round the partition is removed.
  (b) API latency: p50 / p99 of GET /partitions (a new connection each time, as
      `corevisor ctl` does) and of a pause followed by a resume of a running partition,
      with two partitions running.
  (c) idle CPU: the daemon's CPU time (utime + stime of the whole process) over a quiet
      interval, with no partition and with two halted ones, as % of one core.

Rounds of (a) are interleaved (QEMU, daemon, cold corevisor in turn) so drifting host
load hits all alike; medians. Absolute times on this nested PVM host say little about
real hardware (HOST.md): the headline is the ratio. Writes bench/results/api.json (every
sample), prints a markdown table and draws bench/results/api.png.

Usage: python bench/api.py [--quick] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

import run as startup  # noqa: E402 - bench/run.py: the QEMU and cold-start measurement

from corevisor.api.client import Client  # noqa: E402

RESULTS = BENCH / "results"
TARGET = 0.5  # daemon start-to-first-byte / QEMU's cold start
IDLE_SECONDS = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "p50": percentile(xs, 50),
            "p99": percentile(xs, 99), "min": min(xs), "max": max(xs), "n": len(xs),
            "samples": xs}


class Serve:
    """`corevisor serve` in a child, with its socket in a private directory."""

    def __init__(self, workdir: Path) -> None:
        self.socket = str(workdir / "api.sock")
        self.err = workdir / "serve.err"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corevisor.cli", "serve", "--socket", self.socket],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.err, "wb"), env=env, cwd=workdir,  # noqa: SIM115
        )
        deadline = time.monotonic() + 120
        while b"serving on" not in self.err.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"corevisor serve did not start: {self.err.read_text()}")
            time.sleep(0.05)
        self.client = Client(self.socket, timeout=120)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def create_to_first_byte(serve: Serve, image: Path, sock: Path, name: str) -> float:
    """One round of (a): seconds from the create request to the first serial byte, with
    the start request between (the serial socket is connected in between: it exists
    once the partition does, and its first byte is the guest's first)."""
    body = {"partitions": {name: {"image": str(image), "memory": "64M",
                                  "cmdline": "count=0", "serial": f"unix:{sock}"}}}
    t0 = time.perf_counter()
    serve.client.json("POST", "/partitions", body)
    with socket.socket(socket.AF_UNIX) as reader:
        reader.settimeout(60)
        reader.connect(str(sock))  # waits in the listen backlog until the machine starts
        serve.client.json("POST", f"/partitions/{name}/start")
        if not reader.recv(1):
            raise RuntimeError("the serial socket closed before any output")
        first = time.perf_counter() - t0
    while serve.client.json("GET", f"/partitions/{name}")["state"] != "stopped":
        time.sleep(0.01)
    info = serve.client.json("GET", f"/partitions/{name}")
    if info["status"] != 0:
        raise RuntimeError(f"hello ended with {info['status']}: {info['last']}")
    serve.client.request("DELETE", f"/partitions/{name}")
    return first


def bench_startup(serve: Serve, image: Path, rounds: int, workdir: Path) -> dict[str, Any]:
    qemu = startup.qemu_vmm("microvm", image)
    cold = startup.corevisor_vmm()
    fifo = workdir / "serial.sock"
    samples: dict[str, list[float]] = {"qemu-microvm": [], "daemon": [], "corevisor-run": []}
    create_to_first_byte(serve, image, fifo, "warm")  # warm-up: page cache, lazy imports
    for v in (qemu, cold):
        v.run(image, "count=0")
    for i in range(rounds):
        for v, key in ((qemu, "qemu-microvm"), (cold, "corevisor-run")):
            s = v.run(image, "count=0")
            if s.first_byte is None or startup.check(v, s, "hello: exit 0") is not None:
                raise RuntimeError(f"{key}: {startup.check(v, s, 'hello: exit 0')}")
            samples[key].append(s.first_byte)
        samples["daemon"].append(create_to_first_byte(serve, image, fifo, f"hello{i}"))
    out = {k: summary(v) for k, v in samples.items()}
    ratio = out["daemon"]["median"] / out["qemu-microvm"]["median"]
    return {"image": str(image), "qemu": qemu.info, "first_byte_s": out,
            "ratio_daemon_vs_qemu": ratio, "target": TARGET, "met": ratio <= TARGET}


def _counters(serve: Serve, guests: Path, n: int, period: int) -> None:
    for name in (f"c{i}" for i in range(n)):
        serve.client.json("POST", "/partitions?start=true", {"partitions": {name: {
            "image": str(guests / "peer.elf"), "memory": "16M", "serial": "null",
            "cmdline": f"mode=counter ticks=1000000 period={period}"}}})


def bench_latency(serve: Serve, guests: Path, n: int) -> dict[str, Any]:
    _counters(serve, guests, 2, 100)
    gets, flips = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        serve.client.json("GET", "/partitions")
        gets.append(time.perf_counter() - t0)
    for _ in range(n // 2):
        t0 = time.perf_counter()
        serve.client.json("POST", "/partitions/c0/pause")
        serve.client.json("POST", "/partitions/c0/resume")
        flips.append(time.perf_counter() - t0)
    return {"get_partitions_s": summary(gets), "pause_resume_s": summary(flips),
            "running_partitions": 2}


def idle_cpu(serve: Serve, seconds: float) -> float:
    """% of one core the daemon used over `seconds` of quiet."""
    c0, t0 = serve.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return 100 * (serve.cpu_seconds() - c0) / (time.monotonic() - t0)


def bench_idle(serve: Serve, guests: Path, seconds: float) -> dict[str, Any]:
    for p in serve.client.json("GET", "/partitions")["partitions"]:
        if p["state"] != "stopped":
            serve.client.json("POST", f"/partitions/{p['name']}/stop")
        serve.client.request("DELETE", f"/partitions/{p['name']}")
    time.sleep(1)
    empty = idle_cpu(serve, seconds)
    _counters(serve, guests, 2, 60000)  # a tick a minute: halted in between
    time.sleep(1)
    halted = idle_cpu(serve, seconds)
    return {"seconds": seconds, "no_partitions_pct": empty, "two_halted_pct": halted}


def table(res: dict[str, Any]) -> str:
    su = res["startup"]["first_byte_s"]
    lat, idle = res["latency"], res["idle"]
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    q = su["qemu-microvm"]["median"]
    lines = [
        f"### (a) Start-up to the first serial byte: `hello.elf`, median of "
        f"{su['daemon']['n']} rounds",
        "",
        "| how | vs QEMU | first byte (this host) |",
        "| --- | --- | --- |",
        f"| `POST /partitions` + `POST .../start` to a running daemon | "
        f"{su['daemon']['median'] / q:.2f}x | {ms(su['daemon']['median'])} |",
        f"| QEMU -M microvm, cold | 1.00x | {ms(q)} |",
        f"| `corevisor run`, cold | {su['corevisor-run']['median'] / q:.2f}x | "
        f"{ms(su['corevisor-run']['median'])} |",
        "",
        f"Target: daemon <= {TARGET}x QEMU: {res['startup']['ratio_daemon_vs_qemu']:.2f}x, "
        f"{'met' if res['startup']['met'] else 'NOT met'}.",
        "",
        "### (b) API latency (2 partitions running) and (c) idle CPU",
        "",
        "| what | p50 | p99 |",
        "| --- | --- | --- |",
        f"| GET /partitions (new connection each) | {ms(lat['get_partitions_s']['p50'])} | "
        f"{ms(lat['get_partitions_s']['p99'])} |",
        f"| pause + resume | {ms(lat['pause_resume_s']['p50'])} | "
        f"{ms(lat['pause_resume_s']['p99'])} |",
        "",
        f"Idle daemon CPU over {idle['seconds']:.0f} s: {idle['no_partitions_pct']:.2f}% of a "
        f"core with no partition, {idle['two_halted_pct']:.2f}% with two halted ones.",
    ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib  # imported here: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    su = res["startup"]["first_byte_s"]
    names = [("daemon", "API create+start\n(running daemon)", "#2a9d8f"),
             ("qemu-microvm", "QEMU microvm\n(cold)", "#8d99ae"),
             ("corevisor-run", "corevisor run\n(cold)", "#e76f51")]
    data = [[x * 1e3 for x in su[k]["samples"]] for k, _, _ in names]
    parts = a.boxplot(data, tick_labels=[label for _, label, _ in names], patch_artist=True)
    for patch, (_, _, colour) in zip(parts["boxes"], names, strict=True):
        patch.set_facecolor(colour)
    a.axhline(su["qemu-microvm"]["median"] * 1e3 * TARGET, ls="--", color="k", lw=0.8,
              label=f"target: {TARGET}x QEMU")
    a.set_ylabel("ms to the first serial byte")
    a.set_title("(a) start-up, hello.elf")
    a.legend(fontsize=8)
    lat = res["latency"]
    for key, label, colour in (("get_partitions_s", "GET /partitions", "#264653"),
                               ("pause_resume_s", "pause + resume", "#f4a261")):
        xs = sorted(x * 1e3 for x in lat[key]["samples"])
        b.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label, color=colour)
    b.set_xscale("log")
    b.set_xlabel("ms (log)")
    b.set_ylabel("fraction of requests")
    b.set_title("(b) API latency, 2 partitions running")
    b.legend(fontsize=8)
    fig.suptitle("corevisor daemon (bench/api.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds, 100 requests, 3 s idle")
    ap.add_argument("--rounds", type=int, help="start-up rounds (default 11, quick 5)")
    ap.add_argument("--json", type=Path, default=RESULTS / "api.json")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 11)
    requests = 100 if args.quick else 400
    idle_s = 3.0 if args.quick else IDLE_SECONDS
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    guests = ROOT / "guests" / "build"
    RESULTS.mkdir(parents=True, exist_ok=True)
    image = RESULTS / "images" / "hello.elf"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes((guests / "hello.elf").read_bytes())
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="corevisor-bench-api-") as tmp:
        serve = Serve(Path(tmp))
        try:
            print(f"(a) start-up x{rounds} ...", file=sys.stderr)
            su = bench_startup(serve, image, rounds, Path(tmp))
            print(f"(b) latency x{requests} ...", file=sys.stderr)
            lat = bench_latency(serve, guests, requests)
            print(f"(c) idle CPU {idle_s:.0f} s x2 ...", file=sys.stderr)
            idle = bench_idle(serve, guests, idle_s)
        finally:
            serve.close()
    res: dict[str, Any] = {
        "benchmark": "api",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "host": startup.host_info(),
        "startup": su,
        "latency": lat,
        "idle": idle,
    }
    res["host"]["loadavg_at_end"] = os.getloadavg()
    res["table_markdown"] = table(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    png = args.json.with_suffix(".png")
    plot(res, png)
    print(res["table_markdown"])
    print(f"\nJSON: {args.json}\nplot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
