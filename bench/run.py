#!/usr/bin/env python3
"""Start-up and port-I/O benchmark: corevisor side by side with QEMU and a C floor.

What lives here: building the floor (bench/floor/kvm_floor.c) and the guests, spawning each
VMM on the same bundled guest image, timing it from outside (wall clock), and turning the
medians into ratios, a printed table and bench/results/startup_pio.json.
What does not: anything inside corevisor (this only runs its CLI, like a user would).

  (a) start-up: process spawn -> first guest serial byte on stdout -> process exit,
      guest hello.elf; corevisor vs QEMU (-M microvm); target corevisor <= 0.5x QEMU.
  (b) port I/O: per-exit cost = (t(count=N) - t(count=0)) / N of the whole process,
      guest pio.elf (N `outb` to port 0x80 from CPL3); corevisor vs the C floor and QEMU;
      target corevisor <= 1.2x the floor.

Absolute times depend on the host's KVM (see HOST.md: nested, exits cost tens of us), so
results are reported as ratios of runs made side by side in this one job; the absolute
medians are kept in the JSON for reference only.

Usage: python bench/run.py [--quick] [--no-build] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
GUESTS = ROOT / "guests"
GUEST_BUILD = GUESTS / "build"
FLOOR_SRC = BENCH / "floor" / "kvm_floor.c"
FLOOR_BIN = RESULTS / "kvm_floor"
CPL0_SRC_DIR = BENCH / "guest"
CPL0_BUILD = RESULTS / "guest-build"
IMAGES = RESULTS / "images"

MEMORY = "64M"
QEMU = "qemu-system-x86_64"
STARTUP_TARGET = 0.5  # corevisor start-up time / QEMU's
PIO_TARGET = 1.2  # corevisor per-exit time / the floor's
RUN_TIMEOUT = 300.0


# --------------------------------------------------------------------------------------
# running one process


@dataclass
class Sample:
    """One process run, timed from just before spawn."""

    first_byte: float | None  # s until the first byte on stdout
    exit: float  # s until the process was reaped
    returncode: int
    stdout: str
    stderr: str


def run_once(argv: list[str], env: dict[str, str] | None = None) -> Sample:
    """Spawn argv, read stdout unbuffered, note when its first byte and its exit arrive."""
    errfile = tempfile.TemporaryFile()  # stderr: a file, so a chatty VMM cannot block on a pipe
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errfile,
            env=env,
            bufsize=0,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        chunks: list[bytes] = []
        first: float | None = None
        deadline = t0 + RUN_TIMEOUT
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"timed out after {RUN_TIMEOUT:.0f} s: {' '.join(argv)}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            if first is None:
                first = time.perf_counter() - t0
            chunks.append(data)
        rc = proc.wait()
        t_exit = time.perf_counter() - t0
        proc.stdout.close()
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    finally:
        errfile.close()
    return Sample(first, t_exit, rc, b"".join(chunks).decode(errors="replace"), err)


# --------------------------------------------------------------------------------------
# the VMMs


@dataclass
class Vmm:
    name: str
    label: str
    argv: Callable[[Path, str], list[str]]
    status: Callable[[int], int | None]  # process exit code -> guest status (None: no exit)
    env: dict[str, str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def run(self, image: Path, cmdline: str) -> Sample:
        return run_once(self.argv(image, cmdline), self.env)


def plain_status(rc: int) -> int | None:
    return rc if rc >= 0 else None


def qemu_status(rc: int) -> int | None:
    """isa-debug-exit: QEMU exits with (status << 1) | 1; anything else is not a guest exit."""
    return (rc >> 1) if rc > 0 and rc & 1 else None


def corevisor_vmm() -> Vmm:
    env = dict(os.environ)
    paths = [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return Vmm(
        "corevisor",
        "corevisor",
        lambda img, cl: [
            sys.executable,
            "-m",
            "corevisor.cli",
            "run",
            str(img),
            "--cmdline",
            cl,
            "--cpus",
            "1",
            "--memory",
            MEMORY,
        ],
        plain_status,
        env,
        {"python": sys.version.split()[0]},
    )


def floor_vmm() -> Vmm:
    return Vmm(
        "floor",
        "C floor (kvm_floor)",
        lambda img, cl: [str(FLOOR_BIN), str(img), cl],
        plain_status,
        info={"source": str(FLOOR_SRC.relative_to(ROOT))},
    )


def qemu_argv(machine: str, cpu: str) -> Callable[[Path, str], list[str]]:
    def argv(img: Path, cl: str) -> list[str]:
        return [
            QEMU,
            "-accel",
            "kvm",
            "-M",
            machine,
            "-m",
            MEMORY,
            "-cpu",
            cpu,
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel",
            str(img),
            "-append",
            cl,
        ]

    return argv


def qemu_vmm(machine: str, hello: Path) -> Vmm:
    """QEMU with the first CPU model that boots hello here: `host` first.

    Some KVMs reject an MSR QEMU sets for `-cpu host` (seen: IA32_ARCH_CAPABILITIES, QEMU
    aborts); then `host,-arch-capabilities`, then QEMU's default model.
    """
    tried = []
    for cpu in ("host", "host,-arch-capabilities", "qemu64"):
        s = run_once(qemu_argv(machine, cpu)(hello, "count=0"))
        ok = qemu_status(s.returncode) == 0 and "hello: exit 0" in s.stdout
        tried.append(
            {"cpu": cpu, "ok": ok, "returncode": s.returncode, "stderr": s.stderr.strip()[-300:]}
        )
        if ok:
            break
    else:
        raise RuntimeError(f"QEMU -M {machine} does not boot {hello.name}: {tried}")
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return Vmm(
        f"qemu-{machine}",
        f"QEMU -M {machine}",
        qemu_argv(machine, cpu),
        qemu_status,
        info={
            "version": version.splitlines()[0] if version else "?",
            "cpu": cpu,
            "cpu_models_tried": tried,
        },
    )


# --------------------------------------------------------------------------------------
# building


def build(no_build: bool) -> dict[str, Any]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    notes: dict[str, Any] = {}
    if not no_build and (GUESTS / "Makefile").exists():
        r = subprocess.run(["make", "-s", "-C", str(GUESTS)])
        if r.returncode != 0:
            print("bench: make -C guests failed; using guests/build as it is", file=sys.stderr)
        notes["guests_make_rc"] = r.returncode
    stale = not FLOOR_BIN.exists() or FLOOR_BIN.stat().st_mtime < FLOOR_SRC.stat().st_mtime
    if stale or not no_build:
        cc = os.environ.get("CC", "gcc")
        subprocess.run(
            [
                cc,
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-std=gnu11",
                "-o",
                str(FLOOR_BIN),
                str(FLOOR_SRC),
            ],
            check=True,
        )
    notes["floor_cc"] = os.environ.get("CC", "gcc")
    return notes


def build_cpl0_guest() -> Path | None:
    """The bench-only CPL0 pio variant, built with the guests' own Makefile rules."""
    out = CPL0_BUILD / "pio_cpl0.elf"
    r = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(GUESTS),
            f"BUILD={CPL0_BUILD}",
            f"VPATH={CPL0_SRC_DIR}",
            f"CC={os.environ.get('CC', 'gcc')} -I{GUESTS}",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or not out.exists():
        print(f"note: CPL0 pio variant not built:\n{r.stderr.strip()}", file=sys.stderr)
        return None
    return out


# --------------------------------------------------------------------------------------
# measurements


def stats(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def check(vmm: Vmm, s: Sample, expect: str) -> str | None:
    """None if the run did what it should, else why not."""
    status = vmm.status(s.returncode)
    if status != 0:
        return (
            f"exit code {s.returncode} (guest status {status}); "
            f"stderr: {s.stderr.strip()[-400:]!r}; stdout tail: {s.stdout[-200:]!r}"
        )
    if expect not in s.stdout:
        return f"output lacks {expect!r}; stdout tail: {s.stdout[-200:]!r}"
    return None


def bench_startup(vmms: list[Vmm], image: Path, reps: int) -> dict[str, Any]:
    """(a): hello.elf, all VMMs interleaved rep by rep so drifting host load hits all alike."""
    first: dict[str, list[float]] = {v.name: [] for v in vmms}
    done: dict[str, list[float]] = {v.name: [] for v in vmms}
    errors: dict[str, str] = {}
    for v in vmms:  # one warm-up each (page cache, Python bytecode cache)
        s = v.run(image, "count=0")
        if (e := check(v, s, "hello: exit 0")) is not None:
            errors[v.name] = e
    for _ in range(reps):
        for v in vmms:
            if v.name in errors:
                continue
            s = v.run(image, "count=0")
            if (e := check(v, s, "hello: exit 0")) is not None or s.first_byte is None:
                errors[v.name] = e or "no output"
                continue
            first[v.name].append(s.first_byte)
            done[v.name].append(s.exit)
    out: dict[str, Any] = {
        "image": str(image.relative_to(ROOT)),
        "cmdline": "count=0",
        "repeats": reps,
        "vmms": {},
    }
    for v in vmms:
        if v.name in errors:
            out["vmms"][v.name] = {"error": errors[v.name]}
        else:
            out["vmms"][v.name] = {
                "first_byte_s": stats(first[v.name]),
                "exit_s": stats(done[v.name]),
            }
    return out


def bench_pio(vmms: list[Vmm], image: Path, n: int, reps: int) -> dict[str, Any]:
    """(b): per-exit cost from whole-process wall times, start-up subtracted out."""
    t0: dict[str, list[float]] = {v.name: [] for v in vmms}
    tn: dict[str, list[float]] = {v.name: [] for v in vmms}
    errors: dict[str, str] = {}
    for _ in range(reps):
        for v in vmms:
            for count, bucket in ((0, t0), (n, tn)):
                if v.name in errors:
                    continue
                s = v.run(image, f"count={count}")
                if (e := check(v, s, f"pio: {count} writes")) is not None:
                    errors[v.name] = e
                    continue
                bucket[v.name].append(s.exit)
    out: dict[str, Any] = {
        "image": str(image.relative_to(ROOT)),
        "count": n,
        "repeats": reps,
        "vmms": {},
    }
    for v in vmms:
        if v.name in errors:
            out["vmms"][v.name] = {"error": errors[v.name]}
            continue
        m0, mn = statistics.median(t0[v.name]), statistics.median(tn[v.name])
        per = (mn - m0) / n
        out["vmms"][v.name] = {
            "t_count0_s": stats(t0[v.name]),
            "t_countN_s": stats(tn[v.name]),
            "per_exit_s": per,
            "exits_per_s": (1 / per) if per > 0 else None,
        }
    return out


def ratio(section: dict[str, Any], a: str, b: str, key: str) -> float | None:
    vm = section["vmms"]
    ra, rb = vm.get(a, {}), vm.get(b, {})
    if "error" in ra or "error" in rb or not ra or not rb:
        return None
    va = ra[key]["median"] if isinstance(ra[key], dict) else ra[key]
    vb = rb[key]["median"] if isinstance(rb[key], dict) else rb[key]
    return va / vb if vb else None


# --------------------------------------------------------------------------------------
# reporting


def host_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "kvm_pvm_module": Path("/sys/module/kvm_pvm").exists(),
        "python": sys.version.split()[0],
    }


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def fmt_ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def fmt_us(x: float) -> str:
    return f"{x * 1e6:.1f} us"


def table(res: dict[str, Any], vmms: list[Vmm]) -> str:
    lines: list[str] = []
    su = res["startup"]
    labels = {v.name: v.label for v in vmms}
    lines.append(f"### (a) Start-up: `{su['image']}`, median of {su['repeats']} runs")
    lines.append("")
    lines.append(
        "| VMM | first serial byte vs QEMU | guest exit vs QEMU | first byte / exit (this host) |"
    )
    lines.append("| --- | --- | --- | --- |")
    for name, r in su["vmms"].items():
        if "error" in r:
            lines.append(f"| {labels.get(name, name)} | failed | failed | {r['error'][:80]} |")
            continue
        fq = ratio(su, name, "qemu-microvm", "first_byte_s")
        q = ratio(su, name, "qemu-microvm", "exit_s")
        fb = r["first_byte_s"]["median"]
        ex = r["exit_s"]["median"]
        lines.append(
            f"| {labels.get(name, name)} | {fmt_ratio(fq)} | {fmt_ratio(q)} | "
            f"{fmt_ms(fb)} / {fmt_ms(ex)} |"
        )
    t = res["targets"]["startup"]
    lines.append("")
    lines.append(
        f"Ratios are against QEMU -M microvm. Target: corevisor exit <= {STARTUP_TARGET}x "
        f"QEMU: {t['verdict']}."
    )
    lines.append("")
    pio = res["pio"]
    lines.append(
        f"### (b) Port-I/O exits: `{pio['image']}` (guest `outb` to port 0x80 at CPL3), "
        f"N={pio['count']}, median of {pio['repeats']}"
    )
    lines.append("")
    lines.append(
        "| VMM | time per exit vs C floor | vs QEMU microvm | exits/s (this host) | "
        "per exit (this host) |"
    )
    lines.append("| --- | --- | --- | --- | --- |")
    for name, r in pio["vmms"].items():
        if "error" in r:
            lines.append(
                f"| {labels.get(name, name)} | failed | failed | n/a | {r['error'][:80]} |"
            )
            continue
        f = ratio(pio, name, "floor", "per_exit_s")
        q = ratio(pio, name, "qemu-microvm", "per_exit_s")
        eps = r["exits_per_s"]
        lines.append(
            f"| {labels.get(name, name)} | {fmt_ratio(f)} | {fmt_ratio(q)} | "
            f"{'n/a' if eps is None else f'{eps:,.0f}'} | {fmt_us(r['per_exit_s'])} |"
        )
    t = res["targets"]["pio"]
    lines.append("")
    lines.append(
        "Per exit = (t(count=N) - t(count=0)) / N of the whole process, so start-up "
        f"cancels out. Target: corevisor <= {PIO_TARGET}x the C floor: {t['verdict']}."
    )
    ctx = res.get("context", {})
    c0 = ctx.get("pio_cpl0")
    if c0 and "vmms" in c0:
        parts = []
        for name, r in c0["vmms"].items():
            if "error" not in r:
                parts.append(f"{labels.get(name, name)} {fmt_us(r['per_exit_s'])}")
        lines.append("")
        lines.append(
            "Context, same loop at CPL0 (bench/guest/pio_cpl0.c; CPL0 is emulated in the "
            "host kernel here): per exit " + ", ".join(parts) + "."
        )
    return "\n".join(lines)


def verdict(x: float | None, limit: float) -> dict[str, Any]:
    if x is None:
        return {"ratio": None, "limit": limit, "met": None, "verdict": "not measured"}
    met = x <= limit
    return {
        "ratio": x,
        "limit": limit,
        "met": met,
        "verdict": f"{x:.2f}x, {'met' if met else 'NOT met'}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer repeats, smaller N, no context runs"
    )
    ap.add_argument("--no-build", action="store_true", help="use the guests and floor as they are")
    ap.add_argument("--json", type=Path, default=RESULTS / "startup_pio.json")
    ap.add_argument("--count", type=int, help="N for (b) (default 20000, quick 5000)")
    ap.add_argument("--repeats", type=int, help="runs per measurement (default 7/3, quick 3/1)")
    args = ap.parse_args()

    su_reps = args.repeats or (3 if args.quick else 7)
    pio_reps = args.repeats or (1 if args.quick else 3)
    n = args.count or (5000 if args.quick else 20000)

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: /dev/kvm is not usable", file=sys.stderr)
        return 2
    if shutil.which(QEMU) is None:
        print(f"bench: {QEMU} not found", file=sys.stderr)
        return 2
    started = time.time()
    host = host_info()
    build_notes = build(args.no_build)
    # Snapshot the images: every VMM runs the very same bytes, even if guests/build is
    # rebuilt or cleaned while the benchmark runs.
    images: dict[str, Any] = {}
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name in ("hello.elf", "pio.elf"):
        src = GUEST_BUILD / name
        try:
            data = src.read_bytes()
        except OSError as e:
            print(f"bench: {src}: {e.strerror} (make -C guests)", file=sys.stderr)
            return 2
        (IMAGES / name).write_bytes(data)
        images[name] = {"from": str(src.relative_to(ROOT)), "sha256": sha256(data).hexdigest()}
    hello, pio = IMAGES / "hello.elf", IMAGES / "pio.elf"

    qemu = qemu_vmm("microvm", hello)
    vmms = [corevisor_vmm(), qemu, floor_vmm()]

    print(f"(a) start-up: {hello.name} x{su_reps} ...", file=sys.stderr)
    startup = bench_startup(vmms, hello, su_reps)
    startup["image"] = images["hello.elf"]["from"]
    print(f"(b) port I/O: {pio.name} count=0/{n} x{pio_reps} ...", file=sys.stderr)
    pio_res = bench_pio(vmms, pio, n, pio_reps)
    pio_res["image"] = images["pio.elf"]["from"]

    context: dict[str, Any] = {}
    if not args.quick:
        print("context: CPL0 pio variant, QEMU -M pc start-up ...", file=sys.stderr)
        cpl0 = build_cpl0_guest()
        if cpl0 is not None:
            r = bench_pio(vmms, cpl0, n, pio_reps)
            r["image"] = str(cpl0.relative_to(ROOT))
            r["note"] = "bench-only variant: the same outb loop at CPL0"
            context["pio_cpl0"] = r
        try:
            pc = qemu_vmm("pc", hello)
            s = pc.run(hello, "count=0")
            context["qemu_pc_startup"] = {
                "note": "QEMU -M pc (SeaBIOS + linuxboot option ROM), one run, JSON only",
                "cpu": pc.info["cpu"],
                "first_byte_s": s.first_byte,
                "exit_s": s.exit,
                "error": check(pc, s, "hello: exit 0"),
            }
        except RuntimeError as e:
            context["qemu_pc_startup"] = {"error": str(e)}

    res: dict[str, Any] = {
        "benchmark": "startup_pio",
        "schema": 1,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": None,
        "quick": args.quick,
        "host": host,
        "build": build_notes,
        "images": images,
        "vmms": {
            v.name: {"label": v.label, "argv": v.argv(Path("IMAGE"), "CMDLINE"), **v.info}
            for v in vmms
        },
        "startup": startup,
        "pio": pio_res,
        "context": context,
    }
    res["ratios"] = {
        "startup_exit_corevisor_vs_qemu": ratio(startup, "corevisor", "qemu-microvm", "exit_s"),
        "startup_first_byte_corevisor_vs_qemu": ratio(
            startup, "corevisor", "qemu-microvm", "first_byte_s"
        ),
        "startup_exit_floor_vs_qemu": ratio(startup, "floor", "qemu-microvm", "exit_s"),
        "pio_per_exit_corevisor_vs_floor": ratio(pio_res, "corevisor", "floor", "per_exit_s"),
        "pio_per_exit_corevisor_vs_qemu": ratio(pio_res, "corevisor", "qemu-microvm", "per_exit_s"),
        "pio_per_exit_qemu_vs_floor": ratio(pio_res, "qemu-microvm", "floor", "per_exit_s"),
    }
    res["targets"] = {
        "startup": verdict(res["ratios"]["startup_exit_corevisor_vs_qemu"], STARTUP_TARGET),
        "pio": verdict(res["ratios"]["pio_per_exit_corevisor_vs_floor"], PIO_TARGET),
    }
    res["host"]["loadavg_at_end"] = os.getloadavg()
    res["duration_s"] = round(time.time() - started, 1)
    text = table(res, vmms)
    res["table_markdown"] = text
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(text)
    print(f"\nJSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
