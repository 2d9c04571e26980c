#!/usr/bin/env python3
"""Partitioning benchmarks: doorbells, interrupt latency under a noisy neighbour, channels.

    python bench/partitions.py [--quick]     # writes bench/results/partitions.json

What is measured, each side by side in this one job (rounds interleaved so load drifts
hit both sides alike), as ratios:
  (1) doorbell round trip between two partitions (guest `dbping` <-> `peer mode=echo`,
      guest-side TSC timestamps): the kernel-only path (outl 0x504 -> ioeventfd ->
      irqfd) against the same ring relayed by a Python thread (doorbell = "thread"), and
      against the HC_CHANNEL_NOTIFY hypercall handled in Python on the vCPU thread.
      Goal: kernel p50 <= 0.5x the thread-relayed p50.
  (2) interrupt latency and jitter (guest `irqlat`: TSC-deadline LAPIC timer vs handler
      entry, interrupting a CPL3 loop) on a dedicated partition pinned to core 0, alone
      and while a second partition on core 1 runs an exit-heavy workload (`pio`).
      Goal: p99 increase <= 10%.
  (3) channel throughput (guest `chanbw` -> `peer mode=sink`, a byte ring through the
      channel's shared memory) against the same ring between two host threads pinned
      to the same cores (bench/floor/memring.c).
What does not live here: the guests (guests/), the VMM (src/).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "guests" / "build"
RESULTS = ROOT / "bench" / "results"
MEMRING = RESULTS / "memring"


def run(cmd: list[str], timeout: float = 300) -> str:
    """Run a command, return its stdout; fail loudly if it did not exit 0."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p.stdout


def corevisor(system: Path) -> str:
    return run([sys.executable, "-m", "corevisor.cli", "run", str(system)])


def system_file(tmp: Path, name: str, partitions: dict[str, dict[str, object]],
                channel: str | None = None, doorbell: str = "kernel") -> Path:
    """A system TOML with absolute image paths; channel: size of one channel a<->b."""
    lines = []
    for pname, p in partitions.items():
        lines.append(f"[partitions.{pname}]")
        for key, value in p.items():
            lines.append(f"{key} = {json.dumps(value)}")
    if channel:
        lines += ["[channels.link]", f"between = {json.dumps(list(partitions))}",
                  f'size = "{channel}"', f'doorbell = "{doorbell}"']
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def field(text: str, name: str) -> float:
    m = re.search(rf"\b{re.escape(name)}=([0-9.]+)", text)
    if not m:
        raise SystemExit(f"bench: no {name}= in output:\n{text}")
    return float(m.group(1))


# Doorbell variants: the ring's path, and how the dedicated partitions idle while they
# wait for it (halt polling keeps a woken vCPU from going back through the scheduler).
DOORBELL_CASES: dict[str, tuple[str, dict[str, object], str]] = {
    "kernel": ("kernel", {}, "kernel"),
    "thread": ("kernel", {}, "thread"),  # same ring, relayed by a Python thread
    "relay": ("relay", {}, "kernel"),  # HC_CHANNEL_NOTIFY, handled on the vCPU thread
    "kernel+halt-poll": ("kernel", {"exits": "halt-poll", "halt_poll_ns": 10_000_000}, "kernel"),
}


def doorbell(tmp: Path, rounds: int, n: int) -> dict[str, object]:
    samples: dict[str, list[tuple[float, float]]] = {case: [] for case in DOORBELL_CASES}
    for _ in range(rounds):
        for case, (path, idle, doorbell) in DOORBELL_CASES.items():
            common = {"memory": "16M", "dedicated": True} | idle
            sysf = system_file(tmp, f"db-{path}", {
                "dbping": {"image": str(BUILD / "dbping.elf"), "pin": [0],
                           "cmdline": f"n={n} path={path}"} | common,
                "peer": {"image": str(BUILD / "peer.elf"), "pin": [1],
                         "cmdline": "mode=echo"} | common,
            }, channel="4K", doorbell=doorbell)
            out = corevisor(sysf)
            samples[case].append((field(out, "p50"), field(out, "p99")))
    med = {k: {"p50_ns": statistics.median(s[0] for s in v),
               "p99_ns": statistics.median(s[1] for s in v)} for k, v in samples.items()}
    ratio = med["kernel"]["p50_ns"] / med["thread"]["p50_ns"]
    polled = med["kernel+halt-poll"]["p50_ns"] / med["thread"]["p50_ns"]
    hypercall = med["kernel"]["p50_ns"] / med["relay"]["p50_ns"]
    return {"n": n, "rounds": rounds, "median": med, "samples": samples,
            "kernel_vs_thread_p50": ratio, "kernel_halt_poll_vs_thread_p50": polled,
            "kernel_vs_hypercall_relay_p50": hypercall, "goal": 0.5, "met": ratio <= 0.5}


def irq_latency(tmp: Path, rounds: int, n: int, noise_count: int) -> dict[str, object]:
    irqlat = {"image": str(BUILD / "irqlat.elf"), "pin": [0], "memory": "16M",
              "dedicated": True, "cmdline": f"n={n} wait=user"}
    # two kinds of neighbour on core 1: an exit storm (port writes from CPL3, each a VM
    # exit into the host) and pure computation (a CPL3 loop taken by its own timer)
    neighbours = {
        "noisy": {"image": str(BUILD / "pio.elf"), "pin": [1], "memory": "16M",
                  "dedicated": True, "cmdline": f"count={noise_count}"},
        "cpu-bound": irqlat | {"pin": [1], "cmdline": f"n={2 * n} wait=user"},
    }
    samples: dict[str, list[dict[str, float]]] = {"alone": [], "noisy": [], "cpu-bound": []}
    for _ in range(rounds):
        for case in samples:
            parts = {"irqlat": irqlat} | ({"noise": neighbours[case]} if case != "alone" else {})
            out = corevisor(system_file(tmp, f"irq-{case}", parts))
            samples[case].append({k: field(out, k) for k in ("p50_ns", "p99_ns", "max_ns")})
    med = {c: {k: statistics.median(s[k] for s in v) for k in ("p50_ns", "p99_ns", "max_ns")}
           for c, v in samples.items()}
    increase = med["noisy"]["p99_ns"] / med["alone"]["p99_ns"] - 1
    return {"n": n, "rounds": rounds, "noise": f"pio count={noise_count} on core 1",
            "cpu_bound_p99_increase": med["cpu-bound"]["p99_ns"] / med["alone"]["p99_ns"] - 1,
            "median": med, "samples": samples, "p99_increase": increase, "goal": 0.10,
            "met": increase <= 0.10}


def channel(tmp: Path, rounds: int, nbytes: int, size: str) -> dict[str, object]:
    ring = int(size.rstrip("K")) * 1024
    guest, host = [], []
    for _ in range(rounds):
        out = corevisor(system_file(tmp, "chanbw", {
            "chanbw": {"image": str(BUILD / "chanbw.elf"), "pin": [0], "memory": "16M",
                       "cmdline": f"bytes={nbytes}"},
            "peer": {"image": str(BUILD / "peer.elf"), "pin": [1], "memory": "16M",
                     "cmdline": "mode=sink"},
        }, channel=size))
        if "verify ok" not in out:
            raise SystemExit(f"bench: chanbw did not verify:\n{out}")
        guest.append(field(out, "MB/s"))
        host.append(field(run([str(MEMRING), str(nbytes), str(ring), "0", "1"]), "MB/s"))
    g, h = statistics.median(guest), statistics.median(host)
    return {"bytes": nbytes, "ring": size, "rounds": rounds, "partitions_MBps": guest,
            "host_threads_MBps": host, "median_partitions_MBps": g,
            "median_host_threads_MBps": h, "partitions_vs_host": g / h}


def table(res: dict[str, dict[str, object]]) -> str:
    d, i, c = res["doorbell"], res["irq"], res["channel"]
    dm, im = d["median"], i["median"]
    assert isinstance(dm, dict) and isinstance(im, dict)
    rows = [
        "| benchmark | corevisor | reference | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
        f"| doorbell round trip p50 (kernel path vs relay by a Python thread) | "
        f"{dm['kernel']['p50_ns'] / 1e3:.0f} µs | {dm['thread']['p50_ns'] / 1e3:.0f} µs | "
        f"{d['kernel_vs_thread_p50']:.2f}x | ≤ 0.5x: {'met' if d['met'] else 'NOT met'} |",
        f"| doorbell round trip p50 (kernel path vs HC_CHANNEL_NOTIFY hypercall) | "
        f"{dm['kernel']['p50_ns'] / 1e3:.0f} µs | {dm['relay']['p50_ns'] / 1e3:.0f} µs | "
        f"{d['kernel_vs_hypercall_relay_p50']:.2f}x | – |",
        f"| timer interrupt latency p99 (exit-storm neighbour vs alone) | "
        f"{im['noisy']['p99_ns'] / 1e3:.0f} µs | {im['alone']['p99_ns'] / 1e3:.0f} µs | "
        f"{1 + float(i['p99_increase']):.2f}x | ≤ 1.10x: {'met' if i['met'] else 'NOT met'} |",
        f"| doorbell round trip p50, both partitions halt-polling (vs thread relay) | "
        f"{dm['kernel+halt-poll']['p50_ns'] / 1e3:.0f} µs | "
        f"{dm['thread']['p50_ns'] / 1e3:.0f} µs | "
        f"{d['kernel_halt_poll_vs_thread_p50']:.2f}x | – |",
        f"| timer interrupt latency p99 (CPU-bound neighbour vs alone) | "
        f"{im['cpu-bound']['p99_ns'] / 1e3:.0f} µs | {im['alone']['p99_ns'] / 1e3:.0f} µs | "
        f"{im['cpu-bound']['p99_ns'] / im['alone']['p99_ns']:.2f}x | – |",
        f"| timer interrupt latency p50 (exit-storm neighbour vs alone) | "
        f"{im['noisy']['p50_ns'] / 1e3:.0f} µs | {im['alone']['p50_ns'] / 1e3:.0f} µs | "
        f"{im['noisy']['p50_ns'] / im['alone']['p50_ns']:.2f}x | – |",
        f"| channel throughput (partitions vs host threads, same cores) | "
        f"{c['median_partitions_MBps']:.0f} MB/s | {c['median_host_threads_MBps']:.0f} MB/s | "
        f"{c['partitions_vs_host']:.2f}x | – |",
    ]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and samples")
    args = ap.parse_args()
    rounds = 2 if args.quick else 5
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(MEMRING),
                    str(ROOT / "bench" / "floor" / "memring.c")], check=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        res = {
            "doorbell": doorbell(tmp, rounds, 300 if args.quick else 1000),
            "irq": irq_latency(tmp, rounds, 500 if args.quick else 2000,
                               30000 if args.quick else 100000),
            "channel": channel(tmp, rounds, 128 << 20 if args.quick else 512 << 20, "64K"),
        }
    md = table(res)
    out = {"benchmark": "partitions", "started": start, "duration_s": time.time() - start,
           "quick": args.quick, "results": res, "table_markdown": md}
    (RESULTS / "partitions.json").write_text(json.dumps(out, indent=1))
    print(md)
    print(f"\nJSON: {RESULTS / 'partitions.json'}")


if __name__ == "__main__":
    main()
