#!/usr/bin/env python3
"""Memory virtualization, measured: shadow paging against nested paging, side by side.

    python bench/mmu.py                  # full: this host, then two lab boots: ~15-25 min
    python bench/mmu.py --quick          # fewer iterations and rounds: ~8-12 min
    python bench/mmu.py --no-lab         # this host's part only: ~1 min
    python bench/mmu.py --lab-run PATH   # the lab's command (default: lab/run of this checkout)

Workloads, each run through `corevisor run ... --stats-json` so KVM's own counters come
with it:
  ptstress  the bundled page-table-stress guest (guests/ptstress.c): per iteration, in
            each of `spaces` address spaces, a CR3 switch, `pages` PTE writes, a touch of
            every page, `pages` PTE clears. Time per iteration from the guest's TSC.
  linux     Debian's kernel (the PVH vmlinux inside /boot/vmlinuz-*) with a busybox
            initramfs whose /init runs `loops` times: `/bin/busybox true` (fork + exec)
            and `dd if=/dev/zero of=/dev/null bs=1M count=4` (fork + a 1 MiB mmap,
            written 4 times, unmapped at exit). Time per iteration from /proc/uptime.
Where:
  lab npt=1  kvm_amd with nested paging (AMD NPT) in the lab (QEMU-TCG, emulated SVM)
  lab npt=0  the same kvm_amd with npt=0: shadow paging on the same CPU model
  host       this machine's PVM (shadow paging, guest CPL0 emulated); ptstress only,
             since Linux cannot reach user space here (HOST.md)
Page-fault exits per iteration = (pf_taken(N) - pf_taken(0)) / N: the same workload
with no iterations gives the set-up's faults (boot, warm-up), so they cancel out.

Also, in the lab with npt=1: Linux boot to /init, corevisor against
`qemu-system-x86_64 -accel kvm -M microvm` on the same vmlinux, initramfs and command
line: spawn to the /init's first line on the serial console; goal <= 1.0x QEMU.

The inner part (`--inner OUT --npt N`) is what runs inside the lab: the outer run
prepares the images on this host (the lab's root is read-only), boots the lab once per
npt value with bench/results/mmu writable, and combines everything into a markdown
table, bench/results/mmu.json (every sample) and bench/results/mmu.png. Ratios are
shadow / nested within the lab (same emulated CPU); this host's times come from another
machine model (a real CPU under PVM, not TCG), so only its fault counts compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

RESULTS = ROOT / "bench" / "results"
WORK = RESULTS / "mmu"  # images and the lab's outputs (writable inside the lab)
KERNEL = Path("/boot/vmlinuz-6.1.0-57-amd64")
QEMU = "qemu-system-x86_64"
LINUX_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k pci=off"
LINUX_MEMORY = "256M"
BOOT_MARK = "bootbench: /init"
RUN_TIMEOUT = 900.0
PT_LINE = re.compile(r"ptstress: iters=(\d+) ns_per_iter=(\d+) ns_per_page=(\d+)")
LOOP_LINE = re.compile(r"linuxloop: loops=(\d+) t0=([\d.]+) t1=([\d.]+)")

# /init of the Linux workload: loops from the kernel command line (the kernel passes
# unknown key=value words to init as environment variables).
LOOP_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
n=${loops:-0}
read t0 rest < /proc/uptime
i=0
while [ $i -lt $n ]; do
    /bin/busybox true
    dd if=/dev/zero of=/dev/null bs=1M count=4 2>/dev/null
    i=$((i + 1))
done
read t1 rest < /proc/uptime
echo "linuxloop: loops=$n t0=$t0 t1=$t1"
reboot -f
"""
# /init of the boot benchmark: one line as soon as user space runs, then the reset.
BOOT_INIT = f"""#!/bin/busybox sh
/bin/busybox echo "{BOOT_MARK}"
/bin/busybox mkdir -p /proc
/bin/busybox mount -t proc proc /proc
read up rest < /proc/uptime
/bin/busybox echo "bootbench: uptime=$up"
/bin/busybox reboot -f
"""


# ------------------------------------------------------------------------------ running


def spawn_timed(
    argv: list[str], mark: str | None = None, last: str | None = None
) -> dict[str, Any]:
    """Run argv; wall time to exit and (if mark is given) to the first output containing
    it. With last, the process is killed once a whole line starting with it came (QEMU's
    microvm has no reset the kernel's reboot finds, so it would never exit)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        bufsize=0,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    t_mark: float | None = None
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    deadline = t0 + RUN_TIMEOUT
    while streams:
        ready, _, _ = select.select(list(streams), [], [], max(0.0, deadline - time.perf_counter()))
        if not ready:
            proc.kill()
            raise RuntimeError(f"timed out after {RUN_TIMEOUT:.0f} s: {' '.join(argv)}")
        for fd in ready:
            data = os.read(fd, 65536)
            if not data:
                del streams[fd]
                continue
            streams[fd].extend(data)
            if mark is not None and t_mark is None and fd == proc.stdout.fileno():
                if mark.encode() in out:
                    t_mark = time.perf_counter() - t0
            if last is not None and re.search(
                rb"^" + re.escape(last.encode()) + rb".*\n", out, re.M
            ):
                proc.kill()
    rc = proc.wait()
    return {
        "returncode": rc,
        "exit_s": time.perf_counter() - t0,
        "mark_s": t_mark,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
    }


def corevisor_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "corevisor.cli", "run", *args]


def run_with_stats(args: list[str], name: str) -> tuple[dict[str, Any], dict[str, int]]:
    """One corevisor run with --stats-json; (the run, the machine's totals)."""
    path = WORK / f"stats-{name}-{os.getpid()}.json"
    r = spawn_timed(corevisor_argv(*args, "--stats-json", str(path)))
    if r["returncode"] != 0:
        raise RuntimeError(f"{name}: exit {r['returncode']}: {r['stderr'][-600:]}")
    doc = json.loads(path.read_text())
    path.unlink()
    runs = doc["partitions"][0]["runs"]
    return r, runs[-1]["totals"]


def pf_exits(totals: dict[str, int]) -> int:
    """KVM's page faults handled by its MMU (pf_taken; older kernels: fixed + to guest)."""
    if "pf_taken" in totals:
        return totals["pf_taken"]
    return totals.get("pf_fixed", 0) + totals.get("pf_guest", 0) + totals.get("pf_emulate", 0)


def ptstress(pages: int, spaces: int, iters: int) -> dict[str, Any]:
    """ns per iteration (guest TSC) and KVM counters per iteration (iters vs iters=0)."""
    cl = f"pages={pages} spaces={spaces} iters={{}}"
    r, full = run_with_stats(["ptstress", "--cmdline", cl.format(iters)], "ptstress")
    m = PT_LINE.search(r["stdout"])
    if m is None:
        raise RuntimeError(f"ptstress printed no result: {r['stdout'][-400:]}")
    _, base = run_with_stats(["ptstress", "--cmdline", cl.format(0)], "ptstress0")
    return {
        "ns_per_iter": int(m[2]),
        "ns_per_page": int(m[3]),
        **per_iteration(full, base, iters),
    }


def per_iteration(full: dict[str, int], base: dict[str, int], n: int) -> dict[str, float]:
    return {
        "pf_exits_per_iter": (pf_exits(full) - pf_exits(base)) / n,
        "kvm_exits_per_iter": (full.get("exits", 0) - base.get("exits", 0)) / n,
        "shadow_pages_per_iter": (full.get("mmu_cache_miss", 0) - base.get("mmu_cache_miss", 0))
        / n,
        "tlb_flush_per_iter": (full.get("tlb_flush", 0) - base.get("tlb_flush", 0)) / n,
    }


def linux_args(vmlinux: Path, initrd: Path, extra: str = "") -> list[str]:
    return [
        "--kernel",
        str(vmlinux),
        "--initrd",
        str(initrd),
        "--memory",
        LINUX_MEMORY,
        "--cmdline",
        f"{LINUX_CMDLINE} {extra}".strip(),
        "--serial",
        "stdout",
    ]


def linux_loop(vmlinux: Path, initrd: Path, loops: int) -> dict[str, Any]:
    def one(n: int) -> tuple[float, dict[str, int]]:
        r, totals = run_with_stats(linux_args(vmlinux, initrd, f"loops={n}"), f"linux{n}")
        m = LOOP_LINE.search(r["stdout"])
        if m is None:
            raise RuntimeError(f"linux loop printed no result: {r['stdout'][-400:]}")
        return float(m[3]) - float(m[2]), totals

    seconds, full = one(loops)
    _, base = one(0)
    return {
        "ns_per_iter": seconds * 1e9 / loops,
        "loop_s": seconds,
        **per_iteration(full, base, loops),
    }


def qemu_boot_argv(vmlinux: Path, initrd: Path) -> list[str]:
    """QEMU's fastest fit for a PVH kernel: microvm (no PC firmware, no PCI), one vCPU."""
    fixed = (
        f"{QEMU} -accel kvm -M microvm -cpu host -m {LINUX_MEMORY} -smp 1 -nodefaults "
        "-no-user-config -nographic -no-reboot -serial stdio"
    )
    return [
        *fixed.split(),
        "-kernel",
        str(vmlinux),
        "-initrd",
        str(initrd),
        "-append",
        LINUX_CMDLINE,
    ]


def boot_bench(vmlinux: Path, initrd: Path, rounds: int) -> dict[str, Any]:
    """Spawn to BOOT_MARK, corevisor and QEMU interleaved round by round."""
    argvs = {
        "corevisor": corevisor_argv(*linux_args(vmlinux, initrd)),
        "qemu-microvm": qemu_boot_argv(vmlinux, initrd),
    }
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in argvs}
    for i in range(rounds):
        order = list(argvs) if i % 2 == 0 else list(reversed(argvs))
        for name in order:
            r = spawn_timed(argvs[name], BOOT_MARK, last="bootbench: uptime=")
            if r["mark_s"] is None:
                raise RuntimeError(
                    f"{name} never reached /init: {r['stdout'][-400:]}{r['stderr'][-400:]}"
                )
            up = re.search(r"bootbench: uptime=([\d.]+)", r["stdout"])
            samples[name].append(
                {"to_init_s": r["mark_s"], "uptime_s": float(up[1]) if up else None}
            )
    out: dict[str, Any] = {"argv": argvs, "samples": samples}
    for name, xs in samples.items():
        out[name] = {
            "to_init_s": statistics.median(x["to_init_s"] for x in xs),
            "uptime_s": statistics.median(x["uptime_s"] or 0 for x in xs),
        }
    out["ratio"] = out["corevisor"]["to_init_s"] / out["qemu-microvm"]["to_init_s"]
    return out


# ------------------------------------------------------------------------------ the parts


def params(quick: bool) -> dict[str, int]:
    if quick:
        return {"pages": 256, "spaces": 4, "iters": 20, "loops": 30, "rounds": 1, "boots": 1}
    return {"pages": 256, "spaces": 4, "iters": 50, "loops": 100, "rounds": 3, "boots": 3}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "samples": runs}


def host_info() -> dict[str, Any]:
    from corevisor.kvm import host

    h = host.detect()
    return {
        "kvm": h.kvm,
        "mmu": h.mmu,
        "tdp_mmu": h.tdp_mmu,
        "cpu": h.cpu_model,
        "kernel": h.kernel,
        "cores": h.cores,
        "load": os.getloadavg(),
    }


def inner(out: Path, npt: int, quick: bool) -> int:
    """Inside the lab: ptstress, the Linux loop and (npt=1) the boot benchmark."""
    p = params(quick)
    images = json.loads((WORK / "images.json").read_text())
    vmlinux, loop_rd, boot_rd = (Path(images[k]) for k in ("vmlinux", "loop", "boot"))
    result: dict[str, Any] = {"npt": npt, "host": host_info(), "params": p}
    t0 = time.monotonic()
    runs = [ptstress(p["pages"], p["spaces"], p["iters"]) for _ in range(p["rounds"])]
    result["ptstress"] = median_of(runs)
    result["linux"] = median_of([linux_loop(vmlinux, loop_rd, p["loops"])])
    if npt == 1:
        result["boot"] = boot_bench(vmlinux, boot_rd, p["boots"])
    result["seconds"] = time.monotonic() - t0
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def prepare_images() -> dict[str, str]:
    """The PVH vmlinux and both initramfs archives, made here (the lab's root is read-only)."""
    from corevisor.loader.bzimage import extract_vmlinux
    from corevisor.loader.initramfs import char_device, directory, regular, write_newc

    WORK.mkdir(parents=True, exist_ok=True)
    vmlinux = WORK / "vmlinux"
    if not vmlinux.exists() or vmlinux.stat().st_mtime < KERNEL.stat().st_mtime:
        vmlinux.write_bytes(extract_vmlinux(KERNEL.read_bytes(), str(KERNEL)))
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("bench/mmu.py: needs busybox (Debian: busybox-static)")
    bb = Path(busybox).read_bytes()
    paths = {"vmlinux": str(vmlinux)}
    for name, init in (("loop", LOOP_INIT), ("boot", BOOT_INIT)):
        archive = write_newc(
            [
                directory("bin"),
                regular("bin/busybox", bb, 0o755),
                directory("dev"),
                char_device("dev/console", 5, 1),
                regular("init", init.encode(), 0o755),
            ]
        )
        path = WORK / f"{name}.cpio"
        path.write_bytes(archive)
        paths[name] = str(path)
    (WORK / "images.json").write_text(json.dumps(paths, indent=1) + "\n")
    return paths


def lab_part(lab_run: Path, npt: int, quick: bool) -> dict[str, Any]:
    out = WORK / f"lab-npt{npt}.json"
    out.unlink(missing_ok=True)
    argv = [
        str(lab_run),
        "--npt",
        str(npt),
        "--writable",
        str(WORK),
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--inner",
        str(out),
        "--npt",
        str(npt),
    ] + (["--quick"] if quick else [])
    t0, load = time.monotonic(), os.getloadavg()
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"lab npt={npt}: exit {r.returncode}: {r.stderr[-1500:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    data["lab_wall_s"] = time.monotonic() - t0
    data["host_load_before"] = load
    data["host_load_after"] = os.getloadavg()  # this machine's, not the lab guest's
    return data


# ------------------------------------------------------------------------------ the report


def ratio(a: float | None, b: float | None, floor: float = 0.0) -> float | None:
    """a / b; None when b is missing or at most floor (a ratio to ~0 says nothing)."""
    return a / b if a is not None and b is not None and b > floor else None


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    if unit == "ms":
        return f"{x / 1e6:.3f} ms"
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios shadow/nested for each workload and measure."""
    n1, n0 = results.get("lab_npt1"), results.get("lab_npt0")
    out: dict[str, Any] = {}
    for w in ("ptstress", "linux"):
        for key in ("ns_per_iter", "pf_exits_per_iter", "kvm_exits_per_iter"):
            a = n0[w][key] if n0 else None
            b = n1[w][key] if n1 else None
            floor = 1.0 if key != "ns_per_iter" else 0.0  # < 1 exit per iteration: ~none
            out[f"{w}.{key}.lab_shadow_over_nested"] = ratio(a, b, floor)
    pvm = results.get("host", {}).get("ptstress")
    if pvm and n1:
        for key in ("ns_per_iter", "pf_exits_per_iter"):
            floor = 1.0 if key != "ns_per_iter" else 0.0
            out[f"ptstress.{key}.pvm_over_lab_nested"] = ratio(pvm[key], n1["ptstress"][key], floor)
    return out


def table(results: dict[str, Any]) -> str:
    rows = [
        "| workload | where | MMU | time per iteration | page-fault exits per iteration "
        "| KVM exits per iteration | shadow pages created per iteration |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    places = (
        ("lab_npt1", "lab npt=1", "NPT"),
        ("lab_npt0", "lab npt=0", "shadow"),
        ("host", "this host (PVM)", "shadow"),
    )
    for w in ("ptstress", "linux"):
        for key, where, mmu in places:
            r = results.get(key, {}).get(w)
            if not r:
                continue
            rows.append(
                f"| {w} | {where} | {mmu} | {fmt(r['ns_per_iter'], 'ms')} | "
                f"{fmt(r['pf_exits_per_iter'])} | {fmt(r['kvm_exits_per_iter'])} | "
                f"{fmt(r['shadow_pages_per_iter'])} |"
            )
    s = results["summary"]
    lines = ["\n".join(rows), ""]
    for w in ("ptstress", "linux"):
        t = s.get(f"{w}.ns_per_iter.lab_shadow_over_nested")
        f = s.get(f"{w}.pf_exits_per_iter.lab_shadow_over_nested")
        pf0 = results.get("lab_npt0", {}).get(w, {}).get("pf_exits_per_iter")
        pf1 = results.get("lab_npt1", {}).get(w, {}).get("pf_exits_per_iter")
        if t is not None:
            faults = f"{f:.0f}x" if f is not None else f"{pf0:.0f} against {pf1:.2f} (~none)"
            lines.append(
                f"- {w}: shadow/nested in the lab: time {t:.1f}x; page-fault exits per "
                f"iteration {faults}"
            )
    boot = results.get("lab_npt1", {}).get("boot")
    if boot:
        c, q = boot["corevisor"], boot["qemu-microvm"]
        met = "met" if boot["ratio"] <= 1.0 else "NOT met"
        lines.append(
            f"- boot to /init in the lab (npt=1): corevisor {c['to_init_s']:.1f} s, "
            f"QEMU -M microvm {q['to_init_s']:.1f} s: {boot['ratio']:.2f}x "
            f"(goal <= 1.0x: {met}); kernel uptime at /init {c['uptime_s']:.1f} s "
            f"vs {q['uptime_s']:.1f} s"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # imported here: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    places = (
        ("lab_npt1", "lab: NPT", "#2a9d8f"),
        ("lab_npt0", "lab: shadow", "#e76f51"),
        ("host", "host: PVM shadow", "#8d99ae"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    measures = (
        ("ns_per_iter", "time per iteration (ms)", 1e-6),
        ("pf_exits_per_iter", "page-fault exits per iteration", 1.0),
    )
    for ax, (key, title, scale) in zip(axes, measures, strict=True):
        workloads = ("ptstress", "linux")
        width = 0.26
        for i, (place, label, color) in enumerate(places):
            xs, ys, shown = [], [], []
            for j, w in enumerate(workloads):
                r = results.get(place, {}).get(w)
                if r:
                    xs.append(j + (i - 1) * width)
                    ys.append(max(r[key] * scale, 1e-2))  # log axis: ~0 drawn as a stub
                    v = r[key] * scale
                    shown.append("~0" if v < 0.01 else f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
                elif place == "host":
                    ax.text(
                        j + (i - 1) * width,
                        0.03,
                        "n/a:\nno Linux\non PVM",
                        ha="center",
                        fontsize=7,
                        color=color,
                        transform=ax.get_xaxis_transform(),  # x in data, y in axes units
                    )
            bars = ax.bar(xs, ys, width, label=label, color=color)
            ax.bar_label(bars, labels=shown, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 6)  # room for the labels
        ax.set_xlim(-0.5, len(workloads) - 0.4)
        ax.set_xticks(
            range(len(workloads)),
            ["ptstress (CR3 switches,\nPTE writes, touches)", "Linux (fork/exec,\nmmap 1 MiB)"],
        )
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9)
    fig.suptitle("Shadow vs nested paging (bench/mmu.py); lab = kvm_amd under QEMU-TCG")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-lab", action="store_true", help="this host's part only")
    ap.add_argument("--lab-run", type=Path, default=ROOT / "lab" / "run")
    ap.add_argument("--json", type=Path, default=RESULTS / "mmu.json")
    ap.add_argument("--inner", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--npt", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner is not None:
        return inner(args.inner, args.npt, args.quick)

    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    p = params(args.quick)
    results: dict[str, Any] = {
        "bench": "mmu",
        "params": p,
        "host_machine": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "images": prepare_images(),
    }
    results["host"] = {
        "host": host_info(),
        "ptstress": median_of(
            [ptstress(p["pages"], p["spaces"], p["iters"]) for _ in range(p["rounds"])]
        ),
    }
    if not args.no_lab:
        if not args.lab_run.exists():
            raise SystemExit(
                f"bench/mmu.py: no lab at {args.lab_run} (--lab-run PATH, or --no-lab)"
            )
        for npt in (1, 0):
            results[f"lab_npt{npt}"] = lab_part(args.lab_run, npt, args.quick)
    results["summary"] = summarize(results)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    png = args.json.with_suffix(".png")
    plot(results, png)
    print(table(results))
    print(f"\nJSON: {args.json}\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
