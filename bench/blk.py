#!/usr/bin/env python3
"""virtio-blk benchmark: the `blk` guest under corevisor and QEMU, over virtio-mmio and PCI.

What lives here: making a raw image, picking QEMU's fastest fitting drive settings,
spawning each VMM on the same guest image and disk image in interleaved rounds, reading
the guest's own TSC-timed results (`blk: <mode> bytes=B us=T MB/s=X iops=Y`), sampling
each VMM's memory while it runs, and writing bench/results/blk.json plus a markdown table.
What does not: anything inside corevisor (it runs the CLI, like a user would).

Workloads (guest `mode=bench`, one request in flight, no warm-up requests counted):
sequential 1 MiB read and write, random 4 KiB read and write. Goals: corevisor/QEMU
throughput >= 1.0 on 1 MiB sequential, >= 0.7 on 4 KiB random. Memory overhead: peak of
(VmRSS - resident guest RAM) sampled from /proc while the guest runs.

Transports, side by side in the same rounds: corevisor's virtio-mmio and virtio-pci
(`--transport pci`), QEMU's virtio-blk-device on -M microvm and its virtio-blk-pci
(modern only) on -M pc, with the same drive settings; the ratios compare corevisor
with QEMU on each transport, and corevisor's PCI with its MMIO. The guest polls (no
interrupts), so the transports differ in how a request is set up and kicked.

Absolute numbers from the PVM test host (nested, exits cost tens of us) say nothing about
real hardware: the headline figures are ratios of runs made side by side in this job.

Usage: python bench/blk.py [--quick] [--no-build] [--rounds N] [--qemu-drive OPTS] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GUEST = ROOT / "guests" / "build" / "blk.elf"
QEMU = "qemu-system-x86_64"
MEMORY_MIB = 64
IMAGE_MIB = 128
RUN_TIMEOUT = 300.0

WORKLOADS: dict[str, tuple[str, str]] = {
    # name: (guest command line, the goal it is judged by)
    "seq-read 1M": ("seq=1M write=0", "seq"),
    "seq-write 1M": ("seq=1M write=1", "seq"),
    "rand-read 4K": ("rand=4K write=0", "rand"),
    "rand-write 4K": ("rand=4K write=1", "rand"),
}
GOALS = {"seq": 1.0, "rand": 0.7}
# QEMU drive/device settings that fit (raw image in the host page cache or O_DIRECT,
# virtio-blk-device on virtio-mmio); the fastest one here is picked per run of this script.
QEMU_DEFAULT = "cache=writeback,aio=threads"  # QEMU's own defaults
QEMU_CANDIDATES = (
    QEMU_DEFAULT,
    "cache=writeback,aio=threads,iothread",
    "cache=writeback,aio=io_uring",
    "cache=writeback,aio=io_uring,iothread",
    "cache=none,aio=io_uring,iothread",
)
_RESULT = re.compile(r"blk: (\S+) bytes=(\d+) us=(\d+) MB/s=([\d.]+) iops=([\d.]+)")


# --------------------------------------------------------------------------------------
# running one VMM process, sampling its memory


@dataclass
class Run:
    vmm: str
    workload: str
    ok: bool
    mbps: float = 0.0
    iops: float = 0.0
    guest_us: int = 0
    wall_s: float = 0.0
    rss_peak_kib: int = 0
    overhead_peak_kib: int = 0  # max over samples of VmRSS - resident guest RAM
    samples: int = 0
    output: str = ""


def _vmrss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _guest_ram_rss_kib(pid: int, ram_kib: int) -> int | None:
    """Rss of the largest mapping at least as big as guest RAM (the guest's memory)."""
    best_size, best_rss = 0, None
    size = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    lo, hi = line.split(" ", 1)[0].split("-")
                    size = (int(hi, 16) - int(lo, 16)) // 1024
                elif line.startswith("Rss:") and size >= ram_kib and size > best_size:
                    best_size, best_rss = size, int(line.split()[1])
    except OSError:
        return None
    return best_rss


def run_vmm(vmm: str, argv: list[str], workload: str, env: dict[str, str] | None) -> Run:
    ram_kib = MEMORY_MIB * 1024
    errfile = tempfile.TemporaryFile()
    outfile = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=outfile, stderr=errfile, env=env, cwd=ROOT
    )
    peak = [0, 0, 0]  # rss, overhead, samples
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = _vmrss_kib(proc.pid)
            guest = _guest_ram_rss_kib(proc.pid, ram_kib)
            if rss is not None and guest is not None:
                peak[0] = max(peak[0], rss)
                peak[1] = max(peak[1], rss - guest)
                peak[2] += 1
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rc = proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    outfile.seek(0)
    errfile.seek(0)
    out = outfile.read().decode(errors="replace")
    err = errfile.read().decode(errors="replace")
    outfile.close()
    errfile.close()
    status = rc if vmm.startswith("corevisor") else (rc >> 1 if rc > 0 and rc & 1 else -1)
    m = _RESULT.search(out)
    r = Run(vmm, workload, ok=status == 0 and m is not None, wall_s=wall)
    r.rss_peak_kib, r.overhead_peak_kib, r.samples = peak
    r.output = (out + err)[-600:]
    if m:
        r.guest_us, r.mbps, r.iops = int(m.group(3)), float(m.group(4)), float(m.group(5))
    return r


# --------------------------------------------------------------------------------------
# the two VMMs


def corevisor_argv(img: Path, cmdline: str, transport: str = "mmio") -> list[str]:
    argv = [sys.executable, "-m", "corevisor.cli", "run", str(GUEST), "--disk", str(img)]
    argv += ["--transport", transport]
    return argv + ["--cmdline", cmdline, "--cpus", "1", "--memory", f"{MEMORY_MIB}M"]


def corevisor_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def qemu_argv(cpu: str, drive: str, img: Path, cmdline: str, pci: bool = False) -> list[str]:
    """QEMU -M microvm with virtio-blk-device, or (pci) -M pc with a modern-only
    virtio-blk-pci (the guest finds it through 0xCF8: -M pc has no MCFG)."""
    opts = drive.split(",")
    iothread = "iothread" in opts
    drive_opts = ",".join(o for o in opts if o != "iothread")
    machine = "pc" if pci else "microvm,acpi=off"
    argv = [QEMU, "-accel", "kvm", "-M", machine, "-m", f"{MEMORY_MIB}M"]
    argv += ["-cpu", cpu, "-smp", "1", "-nodefaults", "-no-user-config", "-nographic"]
    argv += ["-no-reboot", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    if not pci:
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    if iothread:
        argv += ["-object", "iothread,id=io0"]
    argv += ["-drive", f"id=d,file={img},format=raw,if=none,{drive_opts}"]
    device = "virtio-blk-pci,disable-legacy=on" if pci else "virtio-blk-device"
    argv += ["-device", f"{device},drive=d" + (",iothread=io0" if iothread else "")]
    return [*argv, "-kernel", str(GUEST), "-append", cmdline]


def qemu_cpu(img: Path) -> tuple[str, list[dict[str, Any]]]:
    """The first CPU model QEMU boots the guest with here (`host` first, as bench/run.py)."""
    tried = []
    for cpu in ("host", "host,-arch-capabilities", "qemu64"):
        argv = qemu_argv(cpu, QEMU_CANDIDATES[0], img, "mode=bench seq=4K ops=1")
        r = run_vmm("qemu", argv, "probe", None)
        tried.append({"cpu": cpu, "ok": r.ok, "tail": r.output[-200:]})
        if r.ok:
            return cpu, tried
    raise RuntimeError(f"QEMU -M microvm does not run the blk guest: {tried}")


# --------------------------------------------------------------------------------------


def make_image(path: Path) -> None:
    """A raw image full of non-zero data (no holes: every read comes from real pages)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(IMAGE_MIB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def cmdline(workload: str, ops: dict[str, int]) -> str:
    args, goal = WORKLOADS[workload]
    return f"mode=bench {args} ops={ops[goal]} warm=2 qd=1"


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs)) if xs else 0.0


def pick_qemu_drive(cpu: str, img: Path, ops: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """Each candidate once per workload (two passes, best kept): fastest geometric mean."""
    scores: dict[str, Any] = {}
    for cand in QEMU_CANDIDATES:
        per: dict[str, float] = {}
        for _ in range(2):
            for w in WORKLOADS:
                r = run_vmm("qemu", qemu_argv(cpu, cand, img, cmdline(w, ops)), w, None)
                per[w] = max(per.get(w, 0.0), r.iops if r.ok else 0.0)
        scores[cand] = {"iops": per, "geomean_iops": geomean(list(per.values()))}
    best = max(scores, key=lambda c: scores[c]["geomean_iops"])
    return best, scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, fewer requests")
    ap.add_argument("--no-build", action="store_true", help="use guests/build/blk.elf as is")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 5)")
    ap.add_argument(
        "--qemu-drive", default="", help="skip the pick, e.g. cache=writeback,aio=threads"
    )
    ap.add_argument("--json", type=Path, default=RESULTS / "blk.json")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    ops = {"seq": 64, "rand": 1000} if args.quick else {"seq": 256, "rand": 4000}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    img = RESULTS / "blk.img"
    make_image(img)
    load0 = os.getloadavg()
    cpu, cpu_tried = qemu_cpu(img)
    picks: dict[str, Any] = {}
    if args.qemu_drive:
        drive = args.qemu_drive
    else:
        drive, picks = pick_qemu_drive(cpu, img, {"seq": 32, "rand": 500})
    print(f"bench/blk: QEMU -cpu {cpu}, drive {drive}", file=sys.stderr)
    env = corevisor_env()
    vmms: dict[str, tuple[Callable[[str], list[str]], dict[str, str] | None]] = {
        "corevisor": (lambda cl: corevisor_argv(img, cl), env),
        "qemu": (lambda cl: qemu_argv(cpu, drive, img, cl), None),
        "corevisor-pci": (lambda cl: corevisor_argv(img, cl, "pci"), env),
        "qemu-pci": (lambda cl: qemu_argv(cpu, drive, img, cl, pci=True), None),
    }
    if drive != QEMU_DEFAULT:  # also QEMU as most people run it, for context
        vmms["qemu-default"] = (lambda cl: qemu_argv(cpu, QEMU_DEFAULT, img, cl), None)
    for name, (argv, e) in vmms.items():  # warm-up (page cache, Python bytecode)
        run_vmm(name, argv(cmdline("seq-read 1M", ops)), "warm-up", e)
    runs: list[Run] = []
    for rnd in range(rounds):
        order = list(vmms) if rnd % 2 == 0 else list(reversed(list(vmms)))
        for w in WORKLOADS:
            for name in order:
                argv, e = vmms[name]
                r = run_vmm(name, argv(cmdline(w, ops)), w, e)
                if not r.ok:
                    print(f"bench/blk: {name} {w} failed:\n{r.output}", file=sys.stderr)
                runs.append(r)
    summary = summarise(runs, list(vmms))
    report = {
        "benchmark": "blk",
        "host": {
            "machine": platform.machine(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        },
        "guest": str(GUEST.relative_to(ROOT)),
        "image_mib": IMAGE_MIB,
        "guest_memory_mib": MEMORY_MIB,
        "rounds": rounds,
        "ops": ops,
        "queue_depth": 1,
        "vmms": {
            "corevisor": {"argv": corevisor_argv(img, "CMDLINE"), "python": sys.version.split()[0]},
            "corevisor-pci": {"argv": corevisor_argv(img, "CMDLINE", "pci")},
            "qemu-pci": {"argv": qemu_argv(cpu, drive, img, "CMDLINE", pci=True)},
            "qemu": {
                "argv": qemu_argv(cpu, drive, img, "CMDLINE"),
                "version": subprocess.run(
                    [QEMU, "--version"], capture_output=True, text=True
                ).stdout.splitlines()[0],
                "cpu": cpu,
                "cpu_models_tried": cpu_tried,
                "drive": drive,
                "drive_candidates": picks,
            },
        },
        "goals": GOALS,
        "summary": summary,
        "runs": [r.__dict__ for r in runs],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(summary, drive))
    png = args.json.with_suffix(".png")
    plot(summary, png)
    print(f"\n(JSON: {args.json}, plot: {png})")
    img.unlink()
    return 0


def summarise(runs: list[Run], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"workloads": {}, "memory": {}}
    for w, (_, goal) in WORKLOADS.items():
        row: dict[str, Any] = {}
        for vmm in names:
            good = [r for r in runs if r.vmm == vmm and r.workload == w and r.ok]
            row[vmm] = {
                "runs": len(good),
                "mbps_median": statistics.median([r.mbps for r in good]) if good else 0.0,
                "iops_median": statistics.median([r.iops for r in good]) if good else 0.0,
            }
        q = row["qemu"]["iops_median"]
        row["ratio"] = row["corevisor"]["iops_median"] / q if q else 0.0
        if "corevisor-pci" in row:
            c, cp, qp = (row[n]["iops_median"] for n in ("corevisor", "corevisor-pci", "qemu-pci"))
            row["ratio_pci"] = cp / qp if qp else 0.0  # corevisor vs QEMU, both over PCI
            row["pci_vs_mmio"] = cp / c if c else 0.0  # corevisor's PCI vs its MMIO
        if "qemu-default" in row:
            qd = row["qemu-default"]["iops_median"]
            row["ratio_vs_qemu_default"] = row["corevisor"]["iops_median"] / qd if qd else 0.0
        row["goal"] = GOALS[goal]
        row["met"] = row["ratio"] >= GOALS[goal]
        out["workloads"][w] = row
    for vmm in names:
        good = [r for r in runs if r.vmm == vmm and r.ok and r.samples]
        out["memory"][vmm] = {
            "vmrss_peak_kib_median": statistics.median([r.rss_peak_kib for r in good])
            if good
            else 0,
            "overhead_kib_median": statistics.median([r.overhead_peak_kib for r in good])
            if good
            else 0,
            "vmrss_minus_guest_ram_kib_median": statistics.median(
                [r.rss_peak_kib - MEMORY_MIB * 1024 for r in good]
            )
            if good
            else 0,
        }
    return out


def table(s: dict[str, Any], drive: str) -> str:
    rows = s["workloads"]
    ctx = all("qemu-default" in row for row in rows.values())
    lines = [
        f"virtio-blk, queue depth 1, QEMU -M microvm drive `{drive}`"
        + (f" (and `{QEMU_DEFAULT}`, QEMU's defaults, for context)" if ctx else "")
        + "; medians; ratio = corevisor/QEMU requests per second",
        "",
        "| workload | corevisor MB/s | QEMU MB/s | corevisor req/s | QEMU req/s | ratio | goal |"
        + (" QEMU-default req/s | ratio vs default |" if ctx else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |" + (" ---: | ---: |" if ctx else ""),
    ]
    for w, row in rows.items():
        c, q = row["corevisor"], row["qemu"]
        line = (
            f"| {w} | {c['mbps_median']:.1f} | {q['mbps_median']:.1f} | {c['iops_median']:.0f} | "
            f"{q['iops_median']:.0f} | {row['ratio']:.2f}x | >= {row['goal']} "
            f"{'met' if row['met'] else 'NOT met'} |"
        )
        if ctx:
            line += (
                f" {row['qemu-default']['iops_median']:.0f} | {row['ratio_vs_qemu_default']:.2f}x |"
            )
        lines.append(line)
    if all("ratio_pci" in row for row in rows.values()):
        lines += [
            "",
            "Over PCI (corevisor --transport pci; QEMU -M pc, virtio-blk-pci, the same drive):",
            "",
            "| workload | corevisor-pci req/s | QEMU-pci req/s | ratio | corevisor PCI vs MMIO |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for w, row in rows.items():
            lines.append(
                f"| {w} | {row['corevisor-pci']['iops_median']:.0f} | "
                f"{row['qemu-pci']['iops_median']:.0f} | {row['ratio_pci']:.2f}x | "
                f"{row['pci_vs_mmio']:.2f}x |"
            )
    names = list(s["memory"])
    rss, over, naive = (
        "vmrss_peak_kib_median",
        "overhead_kib_median",
        "vmrss_minus_guest_ram_kib_median",
    )
    mem = s["memory"]
    lines += [
        "",
        "| memory (MiB, median of per-run peaks) | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
        "| VmRSS | " + " | ".join(f"{mem[n][rss] / 1024:.1f}" for n in names) + " |",
        "| VmRSS - resident guest RAM | "
        + " | ".join(f"{mem[n][over] / 1024:.1f}" for n in names)
        + " |",
        f"| VmRSS - {MEMORY_MIB} MiB guest RAM | "
        + " | ".join(f"{mem[n][naive] / 1024:.1f}" for n in names)
        + " |",
    ]
    return "\n".join(lines)


def plot(s: dict[str, Any], path: Path) -> None:
    """Requests per second per workload, one bar per VMM and transport."""
    import matplotlib  # only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s["workloads"]
    names = [n for n in ("corevisor", "qemu", "corevisor-pci", "qemu-pci", "qemu-default")
             if all(n in row for row in rows.values())]
    colors = {"corevisor": "#2a9d8f", "qemu": "#8d99ae", "corevisor-pci": "#e76f51",
              "qemu-pci": "#6d597a", "qemu-default": "#c9c9c9"}
    labels = {"corevisor": "corevisor virtio-mmio", "qemu": "QEMU microvm virtio-mmio",
              "corevisor-pci": "corevisor virtio-pci", "qemu-pci": "QEMU pc virtio-blk-pci",
              "qemu-default": "QEMU microvm, default drive"}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        ys = [row[n]["iops_median"] for row in rows.values()]
        bars = ax.bar(xs, ys, width, label=labels[n], color=colors[n])
        ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], fontsize=7)
    ax.set_xticks(range(len(rows)), list(rows))
    ax.set_ylabel("requests per second (median)")
    ax.set_title("virtio-blk, queue depth 1, the blk guest polling (this host: PVM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
