"""Pause and resume latency of a running machine, from the main thread and from another.

    python bench/lifecycle.py                      # ~20 s on the 2-core CI host
    python bench/lifecycle.py --quick              # fewer rounds
    python bench/lifecycle.py --baseline OLD/src   # also time another checkout's code

Machine.pause() returns once every vCPU thread has acknowledged that it parked; the
time it takes is what an API's pause request or the watchdog's register dump waits
for. It is measured on three single-vCPU guests, each pinned to the last core:

  exiting    `out 0x80; jmp` at CPL0: the vCPU leaves KVM_RUN for userspace constantly
  computing  `jmp .` at CPL0: inside KVM_RUN all the time (emulated on the PVM host)
  halted     `sti; hlt`: asleep inside KVM_RUN, nothing to wake it but the kick

Each round: pause (timed), resume (timed), then 2 ms of running. The baseline (another
source tree, e.g. the code before the kick went through KVM_SET_SIGNAL_MASK) runs in a
child process with that tree first on PYTHONPATH, from the main thread only (its kick
handler could only be installed there). Prints a markdown table and writes
bench/results/lifecycle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GUESTS = {
    "exiting": bytes([0xE6, 0x80, 0xEB, 0xFC]),
    "computing": bytes([0xEB, 0xFE]),
    "halted": bytes([0xFB, 0xF4, 0xEB, 0xFC]),
}


def _stats(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {"median_us": statistics.median(samples), "p90_us": q[89], "p99_us": q[98]}


def measure(kind: str, rounds: int, in_thread: bool) -> dict[str, Any]:
    """Time rounds pause/resume pairs on a fresh machine running guest kind."""
    from corevisor.builder import build
    from corevisor.spec import PartitionSpec, SerialKind, SerialSpec
    from tests.kvm.images import pvh_elf

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    image = out / f"lifecycle-{kind}.elf"
    image.write_bytes(pvh_elf(GUESTS[kind]))
    core = sorted(os.sched_getaffinity(0))[-1]
    cfg = PartitionSpec(
        name=kind, image=image, memory=16 << 20, pin=(core,), serial=SerialSpec(SerialKind.NULL)
    )
    pauses: list[float] = []
    resumes: list[float] = []

    def rounds_loop() -> None:
        with build(cfg) as m:
            m.start()
            time.sleep(0.3)  # past the guest's first instructions
            for _ in range(rounds):
                t0 = time.perf_counter_ns()
                m.pause()
                t1 = time.perf_counter_ns()
                m.resume()
                t2 = time.perf_counter_ns()
                pauses.append((t1 - t0) / 1000)
                resumes.append((t2 - t1) / 1000)
                time.sleep(0.002)
            m.stop("bench done")

    if in_thread:
        worker = threading.Thread(target=rounds_loop)
        worker.start()
        worker.join()
    else:
        rounds_loop()
    return {"pause": _stats(pauses), "resume": _stats(resumes), "rounds": rounds}


def run_all(rounds: int, threads: bool) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for kind in GUESTS:
        results[f"{kind}/main"] = measure(kind, rounds, in_thread=False)
        if threads:
            results[f"{kind}/thread"] = measure(kind, rounds, in_thread=True)
    return results


def baseline(src: Path, rounds: int) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": f"{src}:{ROOT}"}
    r = subprocess.run(
        [sys.executable, __file__, "--child", "--rounds", str(rounds)],
        capture_output=True, text=True, env=env, check=True, timeout=600,
    )
    data: dict[str, dict[str, Any]] = json.loads(r.stdout)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--baseline", type=Path, help="another checkout's src/ to compare with")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rounds = args.rounds or (100 if args.quick else 400)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if args.child:  # the baseline: main thread only, JSON on stdout
        print(json.dumps(run_all(rounds, threads=False)))
        return 0
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    results = {"corevisor": run_all(rounds, threads=True)}
    if args.baseline is not None:
        results["baseline"] = baseline(args.baseline, rounds)
    print("| guest / caller | code | pause median / p90 / p99 | resume median / p90 / p99 |")
    print("| --- | --- | --- | --- |")
    for code, runs in results.items():
        for key, r in runs.items():
            p, s = r["pause"], r["resume"]
            print(
                f"| {key} | {code} | {p['median_us']:.0f} / {p['p90_us']:.0f} / "
                f"{p['p99_us']:.0f} us | {s['median_us']:.0f} / {s['p90_us']:.0f} / "
                f"{s['p99_us']:.0f} us |"
            )
    out = ROOT / "bench" / "results" / "lifecycle.json"
    out.write_text(json.dumps({"rounds": rounds, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
