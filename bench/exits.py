"""HLT exit handling of a dedicated partition: idle CPU cost against wake-up latency.

    python bench/exits.py            # ~30 s on the 2-core CI host
    python bench/exits.py --quick    # fewer samples, ~10 s

For each mode (exits = "normal", "halt-poll" with three poll windows, "disabled") it
builds one single-vCPU partition through builder.build, the vCPU pinned to the last
allowed core and this script's thread to the first, running an assembled guest that
waits in `sti; hlt` and
  (a) idle: takes a 1 kHz LAPIC timer interrupt (EOI, back to hlt) -> the vCPU thread's
      CPU time (/proc/self/task/TID/schedstat) per second of wall time;
  (b) wake-up: takes a channel-style doorbell (an irqfd on GSI 16, rung from here with
      eventfd_write, no timer) and answers with an `out` to a port whose device stamps
      the time -> ring-to-answer latency, with the ring sent 50 us or 5 ms after the
      previous answer (inside / outside a halt-poll window).
The answer is a PIO exit to userspace (~85 us on the PVM host) in every mode, so
compare modes with each other, not with bare-metal numbers. Prints a markdown table
and writes bench/results/exits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from corevisor.builder import build  # noqa: E402
from corevisor.kvm.stats import StatsFile  # noqa: E402
from corevisor.spec import ExitMode, PartitionSpec, SerialSpec  # noqa: E402
from tests.kvm.asm import guest  # noqa: E402

IDLE = r"""
main:
    mov $timer_irq, %eax        # vector 0x40 -> timer_irq
    mov %ax, IDT + 0x40 * 8
    mov %cs, %bx
    mov %bx, IDT + 0x40 * 8 + 2
    movw $0x8e00, IDT + 0x40 * 8 + 4
    shr $16, %eax
    mov %ax, IDT + 0x40 * 8 + 6
    call setup_doorbell_irq     # also loads the IDT and enables the LAPIC
    cmpl $0, ticks_on
    je idle
    movl $0xb, 0xfee003e0       # divide by 1: KVM's APIC bus is 1 GHz
    movl $0x20040, 0xfee00320   # periodic, vector 0x40
    movl $1000000, 0xfee00380   # 1 ms
idle:
    sti
    hlt
    jmp idle
# The handlers drop their frame and go back to idle instead of `iret`: the PVM host's
# instruction emulator fails on a 32-bit iret at CPL0 (emulation failure).
timer_irq:
    movl $0, 0xfee000b0         # EOI
    add $12, %esp
    jmp idle
doorbell_irq:
    out %al, $0x90              # answer: the host stamps the time
    movl $0, 0xfee000b0
    add $12, %esp
    jmp idle
"""


class Stamp:
    """Port 0x90: records when the guest answered and wakes the waiting thread."""

    def __init__(self) -> None:
        self.when = 0
        self.event = threading.Event()

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self.when = time.perf_counter_ns()
        self.event.set()


HALT_STATS = ("halt_exits", "halt_attempted_poll", "halt_successful_poll", "halt_wakeup")


def thread_cpu_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def spin_until(t_ns: int) -> None:
    while time.perf_counter_ns() < t_ns:
        pass


def run_mode(
    cfg: PartitionSpec, quiet: PartitionSpec, idle_s: float, rings: int
) -> dict[str, float]:
    """Idle CPU per second (cfg: timer on) and wake-up latencies (quiet: no timer)."""
    result: dict[str, float] = {}
    # (a) idle with a 1 kHz timer
    with build(cfg) as m:
        # opened before the vCPU runs: the ioctl waits for the mutex KVM_RUN holds in HLT
        stats = StatsFile(m.vcpus[0].fd.stats_fd())
        m.at_close(stats.close)
        m.start()
        time.sleep(0.3)  # boot (CPL0 set-up is emulated)
        tid = m.vcpus[0].native_id
        assert tid is not None
        s0 = stats.read()
        c0, t0 = thread_cpu_ns(tid), time.perf_counter_ns()
        time.sleep(idle_s)
        c1, t1 = thread_cpu_ns(tid), time.perf_counter_ns()
        s1 = stats.read()
        result["idle_cpu_pct"] = 100 * (c1 - c0) / (t1 - t0)
        for name in HALT_STATS:
            v0, v1 = s0.get(name), s1.get(name)
            if isinstance(v0, int) and isinstance(v1, int):
                result[f"idle_{name}_per_s"] = (v1 - v0) / idle_s
        m.stop("bench done")
    # (b) doorbell wake-ups, no timer
    bell = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with build(quiet) as m:
            m.vm.irqfd(bell, 16)
            stamp = Stamp()
            m.pio.attach(0x90, 1, stamp, "stamp")
            m.start()
            time.sleep(0.3)
            for gap_us, key in ((50, "wake_in_window_us"), (5000, "wake_after_5ms_us")):
                samples = []
                for _ in range(rings):
                    spin_until(time.perf_counter_ns() + gap_us * 1000)
                    stamp.event.clear()
                    t = time.perf_counter_ns()
                    os.eventfd_write(bell, 1)
                    if not stamp.event.wait(2):
                        raise RuntimeError("the guest did not answer a doorbell")
                    samples.append((stamp.when - t) / 1000)
                result[key] = statistics.median(samples)
                result[key + "_p90"] = statistics.quantiles(samples, n=10)[-1]
            m.stop("bench done")
    finally:
        os.close(bell)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    image = out / "idle.elf"
    guest(image, IDLE + "ticks_on: .long 1\n")
    quiet_image = out / "idle-quiet.elf"
    guest(quiet_image, IDLE + "ticks_on: .long 0\n")
    base = PartitionSpec(
        name="bench",
        image=image,
        memory=16 << 20,
        pin=(cores[-1],),
        dedicated=True,
        serial=SerialSpec.null(),
    )
    modes = {
        "normal": base,
        "halt-poll 50us": replace(base, exits=ExitMode.HALT_POLL, halt_poll_ns=50_000),
        "halt-poll 200us": replace(base, exits=ExitMode.HALT_POLL, halt_poll_ns=200_000),
        "halt-poll 10ms": replace(base, exits=ExitMode.HALT_POLL, halt_poll_ns=10_000_000),
        "disabled": replace(base, exits=ExitMode.DISABLED),
    }
    idle_s, rings = (1.0, 50) if args.quick else (3.0, 200)
    results: dict[str, dict[str, float]] = {}
    for name, cfg in modes.items():
        results[name] = run_mode(cfg, replace(cfg, image=quiet_image), idle_s, rings)
    print(
        "| exits | idle vCPU CPU (1 kHz timer) | per s: HLT exits / polls tried / polls won "
        "| wake 50 us after last (median / p90) | wake 5 ms after last (median / p90) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        halts = " / ".join(f"{r.get(f'idle_{k}_per_s', float('nan')):.0f}" for k in HALT_STATS[:3])
        print(
            f"| {name} | {r['idle_cpu_pct']:.1f} % | {halts} | "
            f"{r['wake_in_window_us']:.0f} / {r['wake_in_window_us_p90']:.0f} us | "
            f"{r['wake_after_5ms_us']:.0f} / {r['wake_after_5ms_us_p90']:.0f} us |"
        )
    (out / "exits.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
