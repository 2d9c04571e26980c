#!/usr/bin/env python3
"""BIOS boot benchmark: SeaBIOS to the boot sector's first print, corevisor vs QEMU -M pc.

What lives here: spawning each VMM with the same bios.bin (Debian's SeaBIOS) and the same
disk image (the bundled boot sector, guests/bootsect.asm, on virtio-blk-pci), in
interleaved rounds; timestamping, from the spawn, three points of the serial output as it
arrives — SeaBIOS's banner ("SeaBIOS (version"), the boot sector's first line ("boot:
stage 1") and the guest's exit through port 0xF4 (process end) — and writing
bench/results/bios.json, a markdown table and bench/results/bios.png. What does not:
anything inside corevisor (it runs the CLI, like a user would).

The headline is the ratio of the medians of spawn -> "boot: stage 1" (goal <= 1.0x):
everything a user waits for, VMM start-up included. The firmware's own part (banner ->
boot sector) is reported too: it is the real-mode and 32-bit code SeaBIOS runs, which
this host's PVM emulates in its kernel for both VMMs alike, plus each VMM's exits
(port I/O to fw_cfg, PCI configuration, the serial port).

Usage: python bench/bios.py [--rounds N] [--no-build] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DISK = ROOT / "guests" / "build" / "bootsect.img"
BIOS = Path("/usr/share/seabios/bios-256k.bin")
QEMU = "qemu-system-x86_64"
MEMORY_MIB = 64
TIMEOUT = 300.0
MARKS = {"banner": b"SeaBIOS (version", "boot": b"boot: stage 1", "done": b"boot: exit 0"}
GOAL = 1.0


@dataclass
class Run:
    vmm: str
    ok: bool = False
    status: int = -1
    times: dict[str, float] = field(default_factory=dict)  # mark -> seconds from spawn
    wall_s: float = 0.0
    tail: str = ""


def run_one(vmm: str, argv: list[str], env: dict[str, str] | None) -> Run:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    run = Run(vmm)
    seen = b""

    def read() -> None:
        nonlocal seen
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            now = time.perf_counter() - t0
            seen += chunk
            for mark, text in MARKS.items():
                if mark not in run.times and text in seen:
                    run.times[mark] = now

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    run.wall_s = time.perf_counter() - t0
    reader.join(10)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    # QEMU's isa-debug-exit exits with (status << 1) | 1
    run.status = rc if vmm == "corevisor" else (rc >> 1 if rc > 0 and rc & 1 else -1)
    run.ok = run.status == 0 and set(run.times) == set(MARKS)
    run.tail = (seen.decode(errors="replace") + err)[-400:]
    return run


def corevisor_argv(disk: Path) -> list[str]:
    return [sys.executable, "-m", "corevisor.cli", "run", "--bios", str(BIOS), "--disk",
            str(disk), "--memory", f"{MEMORY_MIB}M", "--timeout", str(int(TIMEOUT - 20))]


def qemu_argv(disk: Path) -> list[str]:
    return [QEMU, "-accel", "kvm", "-M", "pc", "-m", f"{MEMORY_MIB}M", "-smp", "1",
            "-bios", str(BIOS), "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-monitor", "none",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-drive", f"file={disk},if=none,id=d,format=raw",
            "-device", "virtio-blk-pci,drive=d,disable-legacy=on"]


def corevisor_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def summarise(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for vmm in ("corevisor", "qemu"):
        good = [r for r in runs if r.vmm == vmm and r.ok]
        row: dict[str, Any] = {"runs": len(good), "failed": sum(
            1 for r in runs if r.vmm == vmm and not r.ok)}
        for mark in MARKS:
            row[f"{mark}_s"] = statistics.median([r.times[mark] for r in good]) if good else 0.0
        row["firmware_s"] = statistics.median(
            [r.times["boot"] - r.times["banner"] for r in good]) if good else 0.0
        row["exit_s"] = statistics.median([r.wall_s for r in good]) if good else 0.0
        out[vmm] = row
    c, q = out["corevisor"], out["qemu"]
    out["ratio_boot"] = c["boot_s"] / q["boot_s"] if q["boot_s"] else 0.0
    out["ratio_firmware"] = c["firmware_s"] / q["firmware_s"] if q["firmware_s"] else 0.0
    out["ratio_exit"] = c["exit_s"] / q["exit_s"] if q["exit_s"] else 0.0
    out["goal"] = GOAL
    out["met"] = 0 < out["ratio_boot"] <= GOAL
    return out


def table(s: dict[str, Any], rounds: int) -> str:
    c, q = s["corevisor"], s["qemu"]
    lines = [
        f"SeaBIOS ({BIOS.name}) booting the bundled boot sector from virtio-blk-pci, "
        f"{MEMORY_MIB} MiB, 1 vCPU; medians of {rounds} interleaved rounds, seconds from spawn",
        "",
        "| VMM | SeaBIOS banner | boot sector's first print | banner -> boot sector | exit |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| corevisor | {c['banner_s']:.2f} | {c['boot_s']:.2f} | {c['firmware_s']:.2f} | "
        f"{c['exit_s']:.2f} |",
        f"| QEMU -M pc | {q['banner_s']:.2f} | {q['boot_s']:.2f} | {q['firmware_s']:.2f} | "
        f"{q['exit_s']:.2f} |",
        f"| ratio | | **{s['ratio_boot']:.2f}x** | {s['ratio_firmware']:.2f}x | "
        f"{s['ratio_exit']:.2f}x |",
        "",
        f"Goal: first print of the boot sector <= {GOAL}x QEMU: "
        f"{s['ratio_boot']:.2f}x, {'met' if s['met'] else 'NOT met'}.",
    ]
    return "\n".join(lines)


def plot(runs: list[Run], s: dict[str, Any], path: Path) -> None:
    import matplotlib  # only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    colors = {"corevisor": "#2a9d8f", "qemu": "#8d99ae"}
    for i, vmm in enumerate(("corevisor", "qemu")):
        good = [r for r in runs if r.vmm == vmm and r.ok]
        for j, mark in enumerate(("banner", "boot", "done")):
            ys = [r.times[mark] for r in good]
            xs = [j + (i - 0.5) * 0.35] * len(ys)
            ax.scatter(xs, ys, color=colors[vmm], s=14, alpha=0.6,
                       label=("corevisor" if vmm == "corevisor" else "QEMU -M pc") if j == 0
                       else None)
            med = s[vmm][f"{mark}_s"]
            ax.hlines(med, xs[0] - 0.12 if xs else j, (xs[0] if xs else j) + 0.12,
                      color=colors[vmm], linewidth=2)
    ax.set_xticks(range(3), ["SeaBIOS banner", "boot sector's\nfirst print", "guest exit"])
    ax.set_ylabel("seconds from spawn")
    ax.set_title(f"SeaBIOS -> boot sector (ratio {s['ratio_boot']:.2f}x; lines: medians)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS / "bios.json")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    for need, what in ((DISK, "nasm"), (BIOS, "seabios")):
        if not need.exists():
            print(f"bench/bios: {need} is missing (install {what})", file=sys.stderr)
            return 2
    if shutil.which(QEMU) is None:
        print(f"bench/bios: {QEMU} is missing (install qemu-system-x86)", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    disks = {vmm: RESULTS / f"bios-{vmm}.img" for vmm in ("corevisor", "qemu")}
    for d in disks.values():
        shutil.copy(DISK, d)
    env = corevisor_env()
    argvs = {"corevisor": (corevisor_argv(disks["corevisor"]), env),
             "qemu": (qemu_argv(disks["qemu"]), None)}
    load0 = os.getloadavg()
    for vmm, (argv, e) in argvs.items():  # warm-up: page cache, bytecode
        run_one(vmm, argv, e)
    runs: list[Run] = []
    for rnd in range(args.rounds):
        order = ("corevisor", "qemu") if rnd % 2 == 0 else ("qemu", "corevisor")
        for vmm in order:
            argv, e = argvs[vmm]
            r = run_one(vmm, argv, e)
            if not r.ok:
                print(f"bench/bios: {vmm} round {rnd} failed:\n{r.tail}", file=sys.stderr)
            runs.append(r)
    s = summarise(runs)
    report = {
        "benchmark": "bios",
        "host": {"machine": platform.machine(), "kernel": platform.release(),
                 "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "bios": str(BIOS),
        "disk": str(DISK.relative_to(ROOT)),
        "rounds": args.rounds,
        "vmms": {"corevisor": {"argv": argvs["corevisor"][0]},
                 "qemu": {"argv": argvs["qemu"][0], "version": subprocess.run(
                     [QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]}},
        "summary": s,
        "runs": [r.__dict__ for r in runs],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    png = args.json.with_suffix(".png")
    plot(runs, s, png)
    print(table(s, args.rounds))
    print(f"\n(JSON: {args.json}, plot: {png})")
    for d in disks.values():
        d.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
