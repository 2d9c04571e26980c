#!/usr/bin/env python3
"""Provisioning benchmark: restore to running, snapshot cost, RSS per clone, and live
migration side by side with QEMU -M microvm on the same guest image.

What lives here (one job, rounds interleaved, medians; absolute times on this PVM host
say little about real hardware, HOST.md):

* restore to running, 256 MiB guest (peer printing a tick every ms, so its first line
  after a restore comes within about a millisecond of its first instruction):
  - `corevisor run --restore DIR` in a fresh process: spawn to the first serial byte
    (the same guest booted fresh, spawn to its first byte, for context);
  - in a running process, what the daemon's "add --restore" calls: System.restore +
    start until the vCPU's first exit (goal <= 20 ms median).
* snapshot create time (System.snapshot of a running partition: dry run, freeze, state,
  RAM, fsync) and size (file, on disk, data) for a 256 MiB idle guest and one that has
  written half its RAM (peer mode=dirty mib=128).
* RSS per clone: 10 `corevisor run --restore` processes of one snapshot side by side,
  each's VmRSS and PSS (shared pages split between the sharers) from /proc, mapped
  copy-on-write (the default) and copied (--copy-memory).
* live migration over loopback TCP of a 256 MiB idle guest (peer counter) and of a
  dirtying guest (peer mode=dirty mib=64), and corevisor's local mode: downtime and
  total time as each VMM reports it (QEMU's query-migrate "downtime"/"total-time"), and
  the gap the guest's own output shows (last byte from the source to the first from the
  target, read from a unix-socket serial line): goal corevisor downtime <= 1.0x QEMU's.

Writes bench/results/provision.json (every sample), bench/results/provision.png (matplotlib,
`pip install -e '.[bench]'`), prints markdown tables.

Usage: python bench/provision.py [--quick] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"
QEMU = "qemu-system-x86_64"
MIB = 1 << 20
MEMORY = 256 * MIB
TICKING = "mode=counter ticks=1000000 period=1"
IDLE = "mode=counter ticks=1000000 period=50"
HALF_DIRTY = "mode=dirty passes=1000000 mib=128 period=200"
DIRTYING = "mode=dirty passes=1000000 mib=64 period=0"
WAIT = 120.0

from corevisor import bundled  # noqa: E402
from corevisor.spec import PartitionSpec, SerialSpec, SystemSpec  # noqa: E402
from corevisor.system import System  # noqa: E402

PEER = bundled.ensure_built("peer")
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
CLI = [sys.executable, "-m", "corevisor.cli"]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _wait_for(path: Path, text: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.01)
    raise RuntimeError(f"{text!r} never appeared in {path}")


@contextmanager
def running(name: str, cmdline: str, log: Path, serial: SerialSpec | None = None,
            memory: int = MEMORY) -> Iterator[System]:
    spec = PartitionSpec(name=name, image=PEER, memory=memory,
                         serial=serial or SerialSpec.file(log), cmdline=cmdline)
    with System(SystemSpec((spec,)), shared_console=False, echo=False) as s:
        s.open()
        s.start(name)
        yield s


def first_byte(argv: list[str]) -> float:
    """Spawn argv; seconds until its first stdout byte (then it is killed)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, env=ENV)
    assert p.stdout is not None
    got = p.stdout.read(1)
    t = time.perf_counter() - t0
    p.kill()
    p.wait()
    if not got:
        raise RuntimeError(f"{argv} printed nothing")
    return t


# --------------------------------------------------------------------------------------
# restore to running


def bench_restore(work: Path, rounds: int) -> dict[str, Any]:
    snap = work / "ticking"
    log = work / "ticking.log"
    with running("tick", TICKING, log) as s:
        _wait_for(log, "peer: tick 20\n")
        s.snapshot("tick", snap)
    cli, boot, inproc = [], [], []
    with System(SystemSpec(partitions=()), shared_console=False, echo=False) as daemon:
        daemon.open()
        for r in range(rounds + 1):
            c = first_byte([*CLI, "run", "--restore", str(snap)]) * 1000
            b = first_byte([*CLI, "run", str(PEER), "--memory", "256M", "--cmdline",
                            TICKING]) * 1000
            name = f"clone{r}"
            t0 = time.perf_counter()
            daemon.restore(snap, _overrides(name, work / f"{name}.log"), start=True)
            m = daemon.machine(name)
            assert m is not None
            while m.vcpus[0].exits == 0:
                pass
            t = (time.perf_counter() - t0) * 1000
            daemon.stop(name)
            daemon.remove(name)
            if r:  # the first round warms the page cache and the imports
                cli.append(c)
                boot.append(b)
                inproc.append(t)
    return {"cli_restore_first_byte_ms": cli, "cli_boot_first_byte_ms": boot,
            "in_process_restore_first_exit_ms": inproc, "memory_bytes": MEMORY}


def _overrides(name: str, log: Path) -> Any:
    from corevisor.snapshot.partition import Overrides

    return Overrides(name=name, serial=SerialSpec.file(log))


# --------------------------------------------------------------------------------------
# snapshot cost


def bench_snapshot(work: Path, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, cmdline, marker in (("idle", IDLE, "peer: tick 2\n"),
                                  ("half-dirty", HALF_DIRTY, "peer: dirty pass 2 ok\n")):
        times, sizes = [], {}
        log = work / f"{kind}.log"
        with running(kind, cmdline, log) as s:
            _wait_for(log, marker)
            for r in range(rounds + 1):
                where = work / f"{kind}-{r}"
                t0 = time.perf_counter()
                snap = s.snapshot(kind, where)
                t = (time.perf_counter() - t0) * 1000
                mem = where / "memory.raw"
                sizes = {"memory_file_bytes": mem.stat().st_size,
                         "memory_on_disk_bytes": mem.stat().st_blocks * 512,
                         "memory_data_bytes": snap.memory.data_bytes,
                         "state_bytes": (where / "state.bin").stat().st_size}
                shutil.rmtree(where)
                if r:
                    times.append(t)
        out[kind] = {"create_ms": times, **sizes}
    return out


# --------------------------------------------------------------------------------------
# RSS per clone


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def bench_clones(work: Path, n: int) -> dict[str, Any]:
    snap = work / "clones"
    log = work / "clones.log"
    with running("src", HALF_DIRTY, log) as s:
        _wait_for(log, "peer: dirty pass 1 ok\n")
        s.pause("src")
        s.snapshot("src", snap)
    out: dict[str, Any] = {"clones": n, "snapshot_data_bytes": 128 * MIB}
    for mode, extra in (("mapped", []), ("copied", ["--copy-memory"])):
        out[mode] = _clone_memory(work, snap, mode, n, " ok\n", extra)
    # The guest rewrites its 128 MiB every pass, so each clone soon owns what it wrote;
    # an idle clone shares almost all of it:
    idle = work / "idle-clones"
    with running("idle", IDLE, work / "idle.log") as s:
        _wait_for(work / "idle.log", "peer: tick 2\n")
        s.snapshot("idle", idle)
    out["idle-mapped"] = _clone_memory(work, idle, "idle", n, "peer: tick", [])
    return out


def _clone_memory(work: Path, snap: Path, tag: str, n: int, marker: str,
                  extra: list[str]) -> dict[str, list[int]]:
    """n clones of snap side by side: each one's VmRSS and PSS once it printed marker."""
    logs = [work / f"{tag}{i}.log" for i in range(n)]
    procs = [subprocess.Popen([*CLI, "run", "--restore", str(snap), "--name", f"{tag}{i}",
                               "--serial", f"file:{logs[i]}", *extra],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV) for i in range(n)]
    try:
        for log in logs:
            _wait_for(log, marker, timeout=300)
        time.sleep(0.5)
        samples = [_rss_pss_kib(p.pid) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {"rss_kib": [r for r, _ in samples], "pss_kib": [p for _, p in samples]}


# --------------------------------------------------------------------------------------
# live migration


class SerialTap:
    """Reads a unix-socket serial line, keeping the time of every chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.chunks: list[tuple[float, bytes]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)
        while data := s.recv(65536):
            self.chunks.append((time.perf_counter(), data))

    def text(self) -> str:
        return b"".join(c for _, c in self.chunks).decode(errors="replace")


def _wait_output(tap: SerialTap, pattern: str) -> None:
    """Until the guest's output matches pattern (a regex: a serial line without a client
    drops what it prints, so the tap may have missed an earlier match)."""
    deadline = time.monotonic() + WAIT
    while re.search(pattern, tap.text()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{pattern!r} never came from {tap.path}")
        time.sleep(0.01)


def gap_ms(src: SerialTap, dst: SerialTap) -> float | None:
    """Wall time between the source's last output and the target's first."""
    if not src.chunks or not dst.chunks:
        return None
    return (dst.chunks[0][0] - src.chunks[-1][0]) * 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def corevisor_migration(work: Path, cmdline: str, marker: str, local: bool,
                        tag: str) -> dict[str, Any]:
    addr = f"unix:{work / (tag + '.mig')}" if local else f"tcp:127.0.0.1:{_free_port()}"
    src_sock, dst_sock = work / f"{tag}-src.sock", work / f"{tag}-dst.sock"
    target = subprocess.Popen([*CLI, "run", "--incoming", addr, "--serial", f"unix:{dst_sock}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=ENV, text=True)
    try:
        dst = SerialTap(dst_sock)
        with running("g", cmdline, work / "unused.log", SerialSpec.unix(src_sock)) as s:
            src = SerialTap(src_sock)
            _wait_output(src, marker)
            while not _listening(addr, target):
                time.sleep(0.01)
            r = s.migrate("g", addr)
            time.sleep(0.3)
        return {"downtime_ms": r.downtime_ms, "total_ms": r.total_s * 1000,
                "rounds": r.rounds, "sent_bytes": r.sent_bytes, "throttle": r.throttle,
                "output_gap_ms": gap_ms(src, dst)}
    finally:
        target.kill()
        target.wait()


def _listening(addr: str, proc: subprocess.Popen[str]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"the target ended: {proc.stderr.read() if proc.stderr else ''}")
    kind, _, rest = addr.partition(":")
    if kind == "unix":
        return Path(rest).exists()
    port = f":{int(rest.rpartition(':')[2]):04X} "
    with open("/proc/net/tcp") as f:
        return any(port in line and " 0A " in line for line in f)


class Qmp:
    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")


def _qemu(cpu: str, cmdline: str, serial: Path, qmp: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [QEMU, "-accel", "kvm", "-M", "microvm", "-m", "256M", "-cpu", cpu, "-smp", "1",
         "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
         "-serial", f"unix:{serial},server=on,wait=off",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-qmp", f"unix:{qmp},server=on,wait=off", "-kernel", str(PEER), "-append", cmdline,
         *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def qemu_cpu() -> str:
    for cpu in ("host", "host,-arch-capabilities", "qemu64"):
        p = subprocess.run([QEMU, "-accel", "kvm", "-M", "microvm", "-cpu", cpu, "-m", "64M",
                            "-nodefaults", "-display", "none", "-no-reboot", "-device",
                            "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(PEER),
                            "-append", "mode=counter ticks=1 period=1"],
                           capture_output=True, timeout=60, check=False)
        if p.returncode == 1:  # exit status 0 through isa-debug-exit
            return cpu
    return "qemu64"


def qemu_migration(work: Path, cpu: str, cmdline: str, marker: str, tag: str) -> dict[str, Any]:
    port = _free_port()
    s_ser, d_ser = work / f"q{tag}-src.ser", work / f"q{tag}-dst.ser"
    s_qmp, d_qmp = work / f"q{tag}-src.qmp", work / f"q{tag}-dst.qmp"
    src = _qemu(cpu, cmdline, s_ser, s_qmp)
    dst = _qemu(cpu, cmdline, d_ser, d_qmp, "-incoming", f"tcp:127.0.0.1:{port}")
    try:
        qs, _ = Qmp(s_qmp), Qmp(d_qmp)
        stap, dtap = SerialTap(s_ser), SerialTap(d_ser)
        _wait_output(stap, marker)
        qs.cmd("migrate-set-parameters", **{"downtime-limit": 300})
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while (info := qs.cmd("query-migrate"))["status"] not in ("completed", "failed"):
            time.sleep(0.005)
        time.sleep(0.3)
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU migration {info}")
        return {"downtime_ms": float(info["downtime"]), "total_ms": float(info["total-time"]),
                "rounds": info["ram"]["dirty-sync-count"],
                "sent_bytes": info["ram"]["transferred"], "output_gap_ms": gap_ms(stap, dtap)}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def bench_migration(work: Path, rounds: int) -> dict[str, Any]:
    cpu = qemu_cpu()
    cases = {
        "idle": (TICKING, r"peer: tick \d\d+\n"),
        "dirtying": (DIRTYING, r"peer: dirty pass ([3-9]|\d\d+) ok\n"),
    }
    out: dict[str, Any] = {"qemu_cpu": cpu}
    for case, (cmdline, marker) in cases.items():
        runs: dict[str, list[dict[str, Any]]] = {"corevisor": [], "qemu": []}
        if case == "idle":
            runs["corevisor-local"] = []
        for r in range(rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for vmm in order:
                tag = f"{case}-{vmm}-{r}"
                if vmm == "qemu":
                    runs[vmm].append(qemu_migration(work, cpu, cmdline, marker, tag))
                else:
                    runs[vmm].append(corevisor_migration(work, cmdline, marker,
                                                         vmm == "corevisor-local", tag))
        out[case] = runs
    return out


# --------------------------------------------------------------------------------------
# report


def summary(res: dict[str, Any]) -> dict[str, Any]:
    r = res.get("restore", {"cli_restore_first_byte_ms": [], "cli_boot_first_byte_ms": [],
                            "in_process_restore_first_exit_ms": []})
    s: dict[str, Any] = {
        "restore_cli_ms": med(r["cli_restore_first_byte_ms"]),
        "boot_cli_ms": med(r["cli_boot_first_byte_ms"]),
        "restore_in_process_ms": med(r["in_process_restore_first_exit_ms"]),
    }
    s["restore_goal_met"] = s["restore_in_process_ms"] <= 20.0
    for kind, v in res["snapshot"].items():
        s[f"snapshot_{kind}_ms"] = med(v["create_ms"])
    for case in ("idle", "dirtying"):
        m = res["migration"][case]
        for vmm, runs in m.items():
            s[f"{case}_{vmm}_downtime_ms"] = med([x["downtime_ms"] for x in runs])
            s[f"{case}_{vmm}_total_ms"] = med([x["total_ms"] for x in runs])
            gaps = [x["output_gap_ms"] for x in runs if x["output_gap_ms"] is not None]
            s[f"{case}_{vmm}_gap_ms"] = med(gaps)
        s[f"{case}_downtime_ratio"] = (s[f"{case}_corevisor_downtime_ms"]
                                       / max(s[f"{case}_qemu_downtime_ms"], 1e-9))
        s[f"{case}_gap_ratio"] = (s[f"{case}_corevisor_gap_ms"]
                                  / max(s[f"{case}_qemu_gap_ms"], 1e-9))
    return s


def tables(res: dict[str, Any], s: dict[str, Any]) -> str:
    lines = ["### Restore to running (256 MiB guest, median)", "",
             "| path | time |", "| --- | ---: |",
             f"| `corevisor run --restore` spawn to first serial byte | "
             f"{s['restore_cli_ms']:.1f} ms |",
             f"| `corevisor run` (fresh boot) spawn to first serial byte | "
             f"{s['boot_cli_ms']:.1f} ms |",
             f"| in a running process (System.restore + start) to the first guest exit | "
             f"{s['restore_in_process_ms']:.1f} ms (goal <= 20 ms: "
             f"{'met' if s['restore_goal_met'] else 'NOT met'}) |", "",
             "### Snapshot of a running 256 MiB guest", "",
             "| guest | create (median) | memory.raw on disk | RAM data | state.bin |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for kind, v in res["snapshot"].items():
        lines.append(f"| {kind} | {med(v['create_ms']):.0f} ms | "
                     f"{v['memory_on_disk_bytes'] / MIB:.1f} MiB | "
                     f"{v['memory_data_bytes'] / MIB:.1f} MiB | "
                     f"{v['state_bytes'] / 1024:.0f} KiB |")
    c = res["clones"]
    lines += ["", f"### {c['clones']} clones of one snapshot side by side (per clone, median)",
              "", "| memory | VmRSS | PSS |", "| --- | ---: | ---: |"]
    for mode in ("idle-mapped", "mapped", "copied"):
        v = c[mode]
        label = {"idle-mapped": "idle guest, mapped copy-on-write (default)",
                 "mapped": "guest rewriting 128 MiB, mapped copy-on-write",
                 "copied": "guest rewriting 128 MiB, --copy-memory"}[mode]
        lines.append(f"| {label} | {med(v['rss_kib']) / 1024:.1f} MiB | "
                     f"{med(v['pss_kib']) / 1024:.1f} MiB |")
    lines += ["", "### Live migration, 256 MiB guest, loopback (median)", "",
              "| guest | VMM | downtime (own report) | total | output gap | rounds |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for case in ("idle", "dirtying"):
        for vmm, runs in res["migration"][case].items():
            lines.append(
                f"| {case} | {vmm} | {s[f'{case}_{vmm}_downtime_ms']:.1f} ms | "
                f"{s[f'{case}_{vmm}_total_ms']:.0f} ms | {s[f'{case}_{vmm}_gap_ms']:.1f} ms | "
                f"{med([x['rounds'] for x in runs]):.0f} |")
    for case in ("idle", "dirtying"):
        ratio = s[f"{case}_downtime_ratio"]
        lines.append(f"\n{case}: corevisor downtime {ratio:.1f}x QEMU's (goal <= 1.0x: "
                     f"{'met' if ratio <= 1.0 else 'NOT met'}); output gap "
                     f"{s[f'{case}_gap_ratio']:.1f}x")
    return "\n".join(lines)


def plot(res: dict[str, Any], s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    names = ["run --restore\n(fresh process)", "run (boot)\n(fresh process)",
             "restore in a\nrunning process"]
    vals = [s["restore_cli_ms"], s["boot_cli_ms"], s["restore_in_process_ms"]]
    ax.bar(names, vals, color=["tab:blue", "tab:gray", "tab:green"])
    ax.axhline(20, color="tab:red", ls="--", lw=1, label="goal 20 ms (daemon)")
    ax.set_ylabel("ms to the guest running (median)")
    ax.set_title("Restore to running, 256 MiB")
    ax.legend()
    ax = axes[1]
    modes = ["idle-mapped", "mapped", "copied"]
    rss = [med(res["clones"][m]["rss_kib"]) / 1024 for m in modes]
    pss = [med(res["clones"][m]["pss_kib"]) / 1024 for m in modes]
    x = range(len(modes))
    ax.bar([i - 0.2 for i in x], rss, 0.4, label="VmRSS")
    ax.bar([i + 0.2 for i in x], pss, 0.4, label="PSS (shared split)")
    ax.set_xticks(list(x), ["idle, mapped", "dirtying, mapped", "dirtying, copied"])
    ax.set_ylabel("MiB per clone (median of 10)")
    ax.set_title("10 clones of one 256 MiB snapshot")
    ax.legend()
    ax = axes[2]
    cases = ["idle", "dirtying"]
    for j, vmm in enumerate(["corevisor", "qemu", "corevisor-local"]):
        vals = [s.get(f"{c}_{vmm}_downtime_ms", 0.0) for c in cases]
        ax.bar([i + (j - 1) * 0.27 for i in range(2)], vals, 0.27, label=vmm)
    ax.axhline(300, color="tab:red", ls="--", lw=1, label="limit 300 ms")
    ax.set_xticks([0, 1], cases)
    ax.set_yscale("log")
    ax.set_ylabel("downtime, ms (median, log)")
    ax.set_title("Live migration on loopback, 256 MiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, 4 clones")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS / "provision.json")
    ap.add_argument("--only", action="append", choices=["restore", "snapshot", "clones",
                                                         "migration"],
                    help="run only these parts (merged into an existing --json)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "rounds": rounds,
                           "load_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="provision-", dir=RESULTS) as tmp:
        work = Path(tmp)
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("restore", lambda: bench_restore(work, rounds)),
            ("snapshot", lambda: bench_snapshot(work, rounds)),
            ("clones", lambda: bench_clones(work, 4 if args.quick else 10)),
            ("migration", lambda: bench_migration(work, rounds)),
        ]
        if args.only and args.json.exists():
            res = {**json.loads(args.json.read_text()), **res}
        for name, step in steps:
            if args.only and name not in args.only:
                continue
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            res[name] = step()
            args.json.write_text(json.dumps(res, indent=2) + "\n")  # kept if a later part fails
    res["load_end"] = os.getloadavg()
    s = res["summary"] = summary(res)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(tables(res, s))
    try:
        plot(res, s, args.json.with_suffix(".png"))
    except ImportError:
        print("(no plot: pip install -e '.[bench]' for matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
