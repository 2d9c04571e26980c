#!/usr/bin/env python3
"""Snapshot figures for an idle guest: capture, write, read and restore times, sizes.

What lives here: a 256 MiB partition running the bundled peer guest in counter mode
(sleeping in hlt between ticks), paused, captured and written to a snapshot directory,
then read back and restored into a fresh VM, N times; medians go to a printed table and
bench/results/snapshot.json. What does not: the lifecycle commands (ctl snapshot, run
--restore) and the comparisons with Firecracker and QEMU, which bench/provision.py will
make once they exist. Absolute times on the PVM host say little about real hardware
(HOST.md); the sizes do not depend on the host.

Usage: python bench/snapshot.py [--runs N] [--memory MIB] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from corevisor import bundled  # noqa: E402
from corevisor.arch.x86_64 import layout  # noqa: E402
from corevisor.builder import build  # noqa: E402
from corevisor.snapshot import format as fmt  # noqa: E402
from corevisor.snapshot import state as st  # noqa: E402
from corevisor.spec import PartitionSpec, SerialSpec  # noqa: E402


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def one_run(work: Path, memory: int) -> dict[str, float]:
    image = bundled.ensure_built("peer")
    log = work / "a.log"
    config = PartitionSpec(
        name="idle", image=image, memory=memory, serial=SerialSpec.file(log),
        cmdline="mode=counter ticks=100000 period=100",
    )
    out: dict[str, float] = {}
    with build(config) as m:
        m.start()
        while "peer: tick 2\n" not in log.read_text():
            time.sleep(0.01)
        m.pause()
        t = time.perf_counter()
        snap = st.capture_machine(m)
        out["capture_ms"] = _ms(t)
        t = time.perf_counter()
        written = fmt.write(work / "snap", {"bench": "idle"}, snap, m.memory,
                            layout.ram_layout(memory))
        out["write_ms"] = _ms(t)
        m.stop("bench done")
    mem = work / "snap" / fmt.MEMORY_FILE
    out["state_bytes"] = (work / "snap" / fmt.STATE_FILE).stat().st_size
    out["memory_file_bytes"] = mem.stat().st_size
    out["memory_on_disk_bytes"] = mem.stat().st_blocks * 512
    out["memory_data_bytes"] = written.memory.data_bytes
    out["ram_bytes"] = memory
    t = time.perf_counter()
    loaded = fmt.read(work / "snap")
    out["read_ms"] = _ms(t)
    t = time.perf_counter()
    with build(PartitionSpec(name="idle", image=image, memory=memory, serial=SerialSpec.null(),
                               cmdline=config.cmdline)) as fresh:
        out["build_ms"] = _ms(t)
        t = time.perf_counter()
        fmt.copy_memory(loaded, fresh.memory)
        out["copy_memory_ms"] = _ms(t)
        t = time.perf_counter()
        st.restore_machine(fresh, loaded.machine)
        out["restore_state_ms"] = _ms(t)
    t = time.perf_counter()
    mapped = fmt.open_memory(loaded)
    out["map_private_ms"] = _ms(t)
    mapped.close()
    shutil.rmtree(work / "snap")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "snapshot.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="corevisor-snapbench-") as tmp:
        for i in range(args.runs):
            work = Path(tmp) / str(i)
            work.mkdir()
            runs.append(one_run(work, args.memory << 20))
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": runs, "median": medians}, indent=2) + "\n")
    print(f"idle guest, {args.memory} MiB RAM, {args.runs} runs (medians)")
    for key, value in medians.items():
        shown = f"{value:10.1f} ms" if key.endswith("_ms") else f"{value / 1024:10.1f} KiB"
        print(f"  {key:22} {shown}")
    print(f"  memory on disk / RAM   {medians['memory_on_disk_bytes'] / args.memory / 2**20:.5f}")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
