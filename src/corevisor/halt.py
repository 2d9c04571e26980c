"""Seeing that a guest has halted for good (``cli; hlt``): the rule and the readings.

With the in-kernel irqchip, KVM never exits to userspace for HLT: the vCPU thread sleeps
inside KVM_RUN (``kvm_vcpu_halt``) with its mp_state set to KVM_MP_STATE_HALTED until an
event makes it runnable. With RFLAGS.IF clear, a maskable interrupt never does, so a
guest that did ``cli; hlt`` sleeps forever and nothing reaches the VMM. This is the same
on this PVM host (whose instruction emulator halts the vCPU the same way) and on VT-x or
AMD-V hosts, as long as HLT exits to KVM (not with ``exits = "disabled"`` on hardware,
where HLT stays inside the guest and KVM itself never learns of it: such a halt is not
detected).

**The rule.** A running machine is stopped as "guest halted with interrupts off" when,
read while every vCPU is parked:

1. every vCPU is either HALTED with RFLAGS.IF = 0, or waiting for INIT/SIPI
   (UNINITIALIZED, INIT_RECEIVED), and at least one is HALTED;
2. no vCPU has an NMI that could wake it: none pending or being injected unless NMIs
   are masked, and neither LAPIC LINT0 nor LINT1 unmasked in NMI delivery mode (KVM's
   PIT raises NMIs through LINT0 for an NMI watchdog);
3. no unmasked IOAPIC redirection entry delivers NMI or INIT (a device interrupt
   routed that way would wake a halted CPU).

Nothing else can wake such a machine: an NMI, INIT or SIPI from one of its own vCPUs
needs one that still runs, and corevisor never injects NMIs itself. MSIs are not
checked (no device of ours sends them yet).

**How it is read without disturbing guests.** A vCPU inside KVM_RUN holds its vCPU
mutex, so its state can only be read by its own thread once kicked out (a *probe*,
vcpu.py) or by anyone while it is parked. The watcher (HaltWatch, driven by whoever
monitors the machine) first looks at each vCPU thread's context-switch counts
(/proc/self/task/TID/status): a thread that has not switched since the last look has
not gone to sleep again, so it is either running continuously or still in the same
sleep. Only such a vCPU is probed, once; a probe's verdict stays valid while the
counts stay the same, since a halted vCPU that wakes and halts again switches at least
once. So a guest ticking with a timer is never probed, and an idle guest waiting with
interrupts on (``sti; hlt``) is kicked once per idle period, not once per look. When
every vCPU's verdict says "stuck", the machine parks every vCPU and checks the whole
rule on that one consistent picture before it stops.

What does not live here: the probe command (vcpu.py), stopping the machine
(machine.py), who calls check (system.py's monitor, Machine.wait).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import VcpuFd, VmFd

if TYPE_CHECKING:
    from corevisor.vcpu import Vcpu

__all__ = ["HaltState", "read_halt_state", "ioapic_can_wake", "HaltWatch", "CHECK_INTERVAL"]

CHECK_INTERVAL = 0.25  # seconds between looks; a stuck guest is reported in ~4 looks
RFLAGS_IF = 1 << 9
_WAIT_FOR_SIPI = (b.KVM_MP_STATE_UNINITIALIZED, b.KVM_MP_STATE_INIT_RECEIVED)
_WAKING_MODES = (b.APIC_DM_NMI, b.APIC_DM_INIT)


@dataclass(frozen=True)
class HaltState:
    """What decides whether one vCPU can still run by itself."""

    mp_state: int
    interrupts_on: bool  # RFLAGS.IF
    nmi_can_wake: bool

    @property
    def halted(self) -> bool:
        return self.mp_state == b.KVM_MP_STATE_HALTED

    @property
    def stuck(self) -> bool:
        """Rule 1 and 2 for this vCPU: only another vCPU or a device could wake it."""
        if self.mp_state in _WAIT_FOR_SIPI:
            return True
        return self.halted and not self.interrupts_on and not self.nmi_can_wake


def _lvt_delivers_nmi(regs: bytes, offset: int) -> bool:
    value = int.from_bytes(regs[offset : offset + 4], "little")
    return not value & b.APIC_LVT_MASKED and (value >> 8) & 7 == b.APIC_DM_NMI


def read_halt_state(fd: VcpuFd) -> HaltState:
    """Read one vCPU's HaltState: on its own thread, or on any while it is parked."""
    mp_state = fd.get_mp_state()
    rflags = fd.get_regs().rflags
    ev = fd.get_vcpu_events()
    regs = bytes(fd.get_lapic().regs)
    nmi = bool((ev.nmi.pending or ev.nmi.injected) and not ev.nmi.masked)
    nmi = nmi or _lvt_delivers_nmi(regs, b.APIC_LVT_LINT0)
    nmi = nmi or _lvt_delivers_nmi(regs, b.APIC_LVT_LINT1)
    return HaltState(mp_state, bool(rflags & RFLAGS_IF), nmi)


def ioapic_can_wake(vm: VmFd) -> bool:
    """Rule 3: an unmasked IOAPIC input delivers NMI or INIT."""
    for entry in vm.ioapic_redirections():
        if not entry & b.APIC_LVT_MASKED and (entry >> 8) & 7 in _WAKING_MODES:
            return True
    return False


def machine_stuck(states: list[HaltState]) -> bool:
    """Rules 1 and 2 over every vCPU of a machine (rule 3 is ioapic_can_wake)."""
    return all(s.stuck for s in states) and any(s.halted for s in states)


def switches(tid: int | None) -> tuple[int, int] | None:
    """(voluntary, involuntary) context switches of a thread of this process, or None."""
    if tid is None:
        return None
    try:
        with open(f"/proc/self/task/{tid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    voluntary = involuntary = -1
    for line in text.splitlines():
        if line.startswith(b"voluntary_ctxt_switches:"):
            voluntary = int(line.split()[1])
        elif line.startswith(b"nonvoluntary_ctxt_switches:"):
            involuntary = int(line.split()[1])
    return (voluntary, involuntary) if voluntary >= 0 else None


@dataclass
class _Track:
    """What the watcher knows about one vCPU between looks."""

    sample: tuple[int, int] | None = None
    verdict: HaltState | None = None  # valid while sample stays the same
    probing: bool = False


class HaltWatch:
    """Per machine: probes idle vCPUs and says when every one of them is stuck."""

    def __init__(self, interval: float = CHECK_INTERVAL) -> None:
        self.interval = interval
        self._next = 0.0
        self._tracks: list[_Track] = []

    def reset(self) -> None:
        """Forget every verdict (the machine was paused, or a debugger held it)."""
        self._tracks = []

    def due(self, now: float | None = None) -> bool:
        """True at most once per interval."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def all_stuck(self, vcpus: list[Vcpu]) -> bool:
        """One look: probe the vCPUs that stayed idle; True if every verdict says stuck."""
        if len(self._tracks) != len(vcpus):
            self._tracks = [_Track() for _ in vcpus]
        stuck = True
        for v, t in zip(vcpus, self._tracks, strict=True):
            sample = switches(v.native_id)
            result = v.take_probe()
            if result is not None:
                # The probe itself made the thread switch: what it reads now is the
                # baseline against which the verdict stays valid.
                t.sample, t.verdict, t.probing = sample, result, False
                stuck = stuck and result.stuck
                continue
            if sample is None or sample != t.sample:
                t.sample, t.verdict = sample, None
                stuck = False
                continue
            if t.verdict is None:
                if not t.probing:
                    t.probing = True
                    v.probe()
                stuck = False
            elif not t.verdict.stuck:
                stuck = False
        return stuck
