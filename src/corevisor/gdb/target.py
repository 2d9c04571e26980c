"""The debug target: one Machine seen the way GDB sees a program.

It owns everything a debugger changes in a machine: the software breakpoints planted
in guest memory, each vCPU's KVM_SET_GUEST_DEBUG control, and the all-stop discipline
(when one vCPU stops for any reason every vCPU is parked; they resume together, or
only the one being single-stepped runs). GDB threads are vCPUs: thread id = index + 1.

Stops reach it on the vCPU threads through Vcpu.debug_handler:
  * KVM_EXIT_DEBUG, exception 1: a single-step finished (KVM_GUESTDBG_SINGLESTEP);
  * KVM_EXIT_DEBUG, exception 3: an int3 with KVM_GUESTDBG_USE_SW_BP (VT-x, AMD-V);
  * KVM_EXIT_DEBUG, exception 1 with DR6.B0-B3: a hardware breakpoint or watchpoint
    (KVM_GUESTDBG_USE_HW_BP; the slots are debugregs.py's, the same on every vCPU);
  * on PVM only (kvm/host.detect().is_pvm), KVM_EXIT_INTERNAL_ERROR (emulation
    failure) whose rip is exactly a planted breakpoint holding 0xCC: PVM runs guest CPL0
    code in the kernel's instruction emulator, which cannot emulate int3, so that is how
    a breakpoint hit arrives there. On VT-x/AMD-V an emulation failure is always a fault.
Everything else keeps its usual meaning (an emulation failure elsewhere is a fault).

Guest-virtual addresses are translated by walking the guest's own page tables with the
selected vCPU's CR0/CR3/CR4/EFER (arch/x86_64/paging.py); all accesses stay inside
guest RAM. Memory reads show the original bytes under planted breakpoints, and writes
over them update the saved byte, so GDB never sees (or clobbers) its own int3s.

Methods other than the debug handler run on the GDB server's thread and, except halt,
resume and wait_stop, only while every vCPU is parked.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from corevisor.arch.x86_64 import paging
from corevisor.gdb import debugregs, x86_64
from corevisor.kvm import bindings as b
from corevisor.kvm import host
from corevisor.machine import Machine
from corevisor.vcpu import Vcpu, VcpuState

SIGINT = 2
SIGTRAP = 5
INT3 = 0xCC
STEP_OVER_TIMEOUT = 5.0  # seconds one instruction may take when stepping off a breakpoint
DEBUGGER = "debugger"  # the vCPU hold reason of the all-stop discipline

_MP_STATES = {
    b.KVM_MP_STATE_RUNNABLE: "runnable",
    b.KVM_MP_STATE_UNINITIALIZED: "INIT: waiting for SIPI",
    b.KVM_MP_STATE_INIT_RECEIVED: "INIT received: waiting for SIPI",
    b.KVM_MP_STATE_HALTED: "halted (hlt)",
    b.KVM_MP_STATE_SIPI_RECEIVED: "SIPI received",
}


@dataclass(frozen=True)
class StopEvent:
    """Why the machine stopped for the debugger: which vCPU, which signal."""

    vcpu: int
    signal: int
    swbreak: bool = False
    reason: bytes = b""  # stop reply field of a hardware hit: b"hwbreak:;", b"watch:ADDR;"


@dataclass
class Breakpoint:
    """A planted int3: where GDB asked (virtual), where it is (physical), what it hid."""

    addr: int
    gpa: int
    original: int


class DebugTarget:
    """All-stop debugging of one Machine: registers, memory, breakpoints, execution."""

    def __init__(self, machine: Machine, halted: bool = True) -> None:
        self.machine = machine
        self.vcpus: list[Vcpu] = machine.vcpus
        self._cond = threading.Condition()
        self._event: StopEvent | None = None
        self._stepping: int | None = None
        self._bps: dict[int, Breakpoint] = {}
        self._hw = debugregs.DebugRegisters()
        self._hw_skip: int | None = None  # slot left out while stepping off it
        # x86 KVM never reports KVM_CAP_GUEST_DEBUG_HW_BPS (arm64/s390 only); it always
        # takes DR0-DR3/DR7, and SET_GUEST_DEBUG2 lists the control flags it accepts.
        self.hw_supported = bool(
            machine.kvm.check_extension(b.Cap.SET_GUEST_DEBUG2) & b.KVM_GUESTDBG_USE_HW_BP
        )
        # Data breakpoints (watchpoints) need the guest to run natively with DR0-DR3
        # loaded. PVM emulates CPL0 code (KVM's emulator checks only execute
        # breakpoints) and never fires them at CPL3 either (measured): a watchpoint
        # would silently never stop, so it is refused there and GDB's software
        # watchpoints (`set can-use-hw-watchpoints 0`, single steps) are the way.
        pvm = host.detect().is_pvm
        self.hw_watch_supported = self.hw_supported and not pvm
        # PVM reports a planted int3 its emulator met as an emulation failure; hardware
        # intercepts #BP and reports KVM_EXIT_DEBUG (exception 3), so there an emulation
        # failure at a breakpoint address is a real fault and must stop the machine.
        self._int3_fails_emulation = pvm
        self._control: list[tuple[int, tuple[int, ...]] | None] = [None] * len(self.vcpus)
        # While attached, debug exits are ours; detached, they are faults as usual.
        self.attached = halted
        self.last_stop = StopEvent(0, SIGTRAP)
        for v in self.vcpus:
            v.debug_handler = self._on_exit
        if halted:
            # Held before the threads start: each parks before its first KVM_RUN, so
            # not a single guest instruction runs.
            for v in self.vcpus:
                v.hold(DEBUGGER, wait=False)
            self._event = self.last_stop

    # --- threads ----------------------------------------------------------------------
    def thread_ids(self) -> list[int]:
        return [v.index + 1 for v in self.vcpus]

    def vcpu(self, thread: int) -> Vcpu:
        """The vCPU behind a GDB thread id (KeyError if there is none)."""
        if not 1 <= thread <= len(self.vcpus):
            raise KeyError(thread)
        return self.vcpus[thread - 1]

    def thread_info(self, thread: int) -> str:
        """A line for GDB's `info threads`: the vCPU, its run state and CPU mode."""
        v = self.vcpu(thread)
        try:
            state = _MP_STATES.get(v.fd.get_mp_state(), "unknown")
            s = v.fd.get_sregs()
        except Exception as e:  # noqa: BLE001 - a description must not fail a session
            return f"vCPU {v.index} ({e})"
        if s.efer & paging.EFER_LMA:
            mode = "64-bit" if s.cs.l else "compatibility mode"
        elif s.cr0 & 1:
            mode = "protected mode" + (", paging" if s.cr0 & paging.CR0_PG else "")
        else:
            mode = "real mode"
        return f"vCPU {v.index}, {state}, {mode}, CPL{s.cs.selector & 3}"

    @property
    def ended(self) -> bool:
        """True once the machine has stopped for good (guest exit, fault, kill)."""
        return self.machine.report is not None

    # --- stop and go ------------------------------------------------------------------
    def _on_exit(self, vcpu: Vcpu, reason: int) -> bool:
        """Vcpu.debug_handler, on the vCPU's thread: is this exit a debugger stop?"""
        if not self.attached:
            return False
        fd = vcpu.fd
        if reason == b.ExitReason.DEBUG:
            info = fd.debug_exit()
            swbreak = False
            hw_hit = b""
            if info.exception == 3:
                swbreak = self._rewind_to_breakpoint(vcpu, info.pc)
            elif info.exception == 1 and info.dr6 & debugregs.DR6_HITS:
                point = self._hw.hit(info.dr6)
                hw_hit = point.stop_reason() if point is not None else b""
            event = StopEvent(vcpu.index, SIGTRAP, swbreak, hw_hit)
        else:
            if not self._int3_fails_emulation:
                return False
            suberror, _ = fd.internal_error()
            if suberror != b.KVM_INTERNAL_ERROR_EMULATION or not self._at_breakpoint(vcpu):
                return False
            event = StopEvent(vcpu.index, SIGTRAP, swbreak=True)
        self._post(event)
        return True

    def _rewind_to_breakpoint(self, vcpu: Vcpu, pc: int) -> bool:
        """A #BP exit: True if it is one of ours. The reported pc is the int3's address
        (VMX and SVM intercept #BP before delivery); should a host report the address
        after it, rip is moved back so GDB sees the breakpoint address."""
        if pc in self._bps:
            return True
        if pc - 1 in self._bps:
            regs = vcpu.fd.get_regs()
            regs.rip -= 1
            vcpu.fd.set_regs(regs)
            return True
        return False  # the guest's own int3: reported as a plain SIGTRAP

    def _linear_pc(self, vcpu: Vcpu) -> int:
        regs = vcpu.fd.get_regs()
        sregs = vcpu.fd.get_sregs()
        base = 0 if sregs.efer & paging.EFER_LMA and sregs.cs.l else sregs.cs.base
        return int(base + regs.rip) & ((1 << 64) - 1)

    def _at_breakpoint(self, vcpu: Vcpu) -> bool:
        """True if the vCPU's rip is a planted breakpoint whose int3 is still there."""
        bp = self._bps.get(self._linear_pc(vcpu))
        return bp is not None and self.machine.memory.read_u8(bp.gpa) == INT3

    def _post(self, event: StopEvent) -> None:
        """Record the first stop and park every vCPU (all-stop)."""
        with self._cond:
            if self._event is None:
                self._event = event
                self._cond.notify_all()
        for v in self.vcpus:
            v.hold(DEBUGGER, wait=False)

    def _park_all(self) -> None:
        for v in self.vcpus:
            v.hold(DEBUGGER, wait=False)
        for v in self.vcpus:
            v.hold(DEBUGGER)

    def halt(self, signal: int = SIGINT, thread: int = 1) -> StopEvent:
        """Stop every vCPU now (Ctrl-C, or GDB attaching to a running guest)."""
        with self._cond:
            if self._event is None:
                self._event = StopEvent(max(thread, 1) - 1, signal)
        self._park_all()
        return self._take()

    def _take(self) -> StopEvent:
        with self._cond:
            event = self._event
            assert event is not None
            self._stepping = None
        self.last_stop = event
        return event

    def wait_stop(self, timeout: float) -> StopEvent | None:
        """Wait up to timeout for a stop; once there is one, every vCPU is parked."""
        with self._cond:
            self._cond.wait_for(lambda: self._event is not None, timeout)
            if self._event is None:
                return None
        self._park_all()
        return self._take()

    def resume(self, step: int | None = None) -> StopEvent | None:
        """Run every vCPU, or single-step only vCPU `step` (GDB thread id) while the
        others stay parked. A vCPU sitting on a planted breakpoint first steps off it
        (original byte back, one instruction, int3 again). Returns a stop at once if
        that step-off already was the requested step, else None: wait_stop follows."""
        step_index = self.vcpu(step).index if step is not None else None
        for v in self.vcpus if step_index is None else [self.vcpus[step_index]]:
            if v.state is VcpuState.STOPPED:
                continue
            if self._at_breakpoint(v) or self._hw_exec_slot(v) is not None:
                event = self._step_over(v)
                # a watchpoint the stepped instruction hit is a stop of its own
                if v.index == step_index or self.ended or event.reason:
                    return event
        self._go(step_index)
        return None

    def _go(self, step_index: int | None) -> None:
        with self._cond:
            self._event = None
            self._stepping = step_index
        self._apply_control(step_index)
        for v in self.vcpus:
            if step_index is None or v.index == step_index:
                v.release(DEBUGGER)

    def _hw_exec_slot(self, v: Vcpu) -> int | None:
        return self._hw.exec_slot(self._linear_pc(v)) if self._hw else None

    def _step_over(self, v: Vcpu) -> StopEvent:
        """One instruction of v with the breakpoint at its pc out of the way: the int3's
        original byte back, and/or the hardware execute slot left out of DR7 (KVM's
        emulator ignores RFLAGS.RF for the debugger's breakpoints, measured on PVM:
        a plain resume would hit the same one again at once)."""
        bp = self._bps.get(self._linear_pc(v))
        if bp is not None and self._at_breakpoint(v):
            self.machine.memory.write(bp.gpa, bytes([bp.original]))
        else:
            bp = None
        self._hw_skip = self._hw_exec_slot(v)
        try:
            self._go(v.index)
            event = self.wait_stop(STEP_OVER_TIMEOUT)
            if event is None:  # the instruction blocks (hlt, a wait for SIPI): stop anyway
                event = self.halt(SIGTRAP, v.index + 1)
        finally:
            self._hw_skip = None
            if bp is not None and bp.addr in self._bps:
                self.machine.memory.write(bp.gpa, bytes([INT3]))
        return event

    def _apply_control(self, step_index: int | None) -> None:
        """KVM_SET_GUEST_DEBUG on each (parked) vCPU, only where it changes.

        Interrupts stay enabled while stepping (no KVM_GUESTDBG_BLOCKIRQ): a step that
        meets a pending interrupt stops at the handler's first instruction, as a TF
        step does on hardware, and a step never waits for an interrupt that cannot come.
        """
        base = b.KVM_GUESTDBG_ENABLE | b.KVM_GUESTDBG_USE_SW_BP if self._bps else 0
        if self._hw:
            base |= b.KVM_GUESTDBG_ENABLE | b.KVM_GUESTDBG_USE_HW_BP
        for v in self.vcpus:
            control = base
            if v.index == step_index:
                control |= b.KVM_GUESTDBG_ENABLE | b.KVM_GUESTDBG_SINGLESTEP
            skip = self._hw_skip if v.index == step_index else None
            regs = self._hw.debugregs(skip) if self._hw else ()
            if self._control[v.index] != (control, regs) and v.state is not VcpuState.STOPPED:
                v.fd.set_guest_debug(control, regs)
                self._control[v.index] = (control, regs)

    # --- leaving ----------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every breakpoint, turn guest debugging off and let the guest run."""
        if self.ended:
            self.attached = False
            return
        self._park_all()
        self.remove_all_breakpoints()
        self._hw.clear()
        self._apply_control(None)
        self.attached = False
        with self._cond:
            self._event = None
            self._stepping = None
        for v in self.vcpus:  # a pause of the machine itself (its own hold) stays
            v.release(DEBUGGER)

    def attach(self) -> StopEvent:
        """A client connects to a running guest: stop it for the debugger."""
        self.attached = True
        return self.halt(SIGINT)

    def kill(self) -> None:
        """End the machine, leaving no breakpoint in its memory."""
        if not self.ended:
            self._park_all()
            self.remove_all_breakpoints()
            self._hw.clear()
            self._apply_control(None)
        self.attached = False
        self.machine.stop("killed from GDB")

    # --- registers --------------------------------------------------------------------
    def cpu_state(self, thread: int) -> x86_64.CpuState:
        fd = self.vcpu(thread).fd
        return x86_64.CpuState(fd.get_regs(), fd.get_sregs(), fd.get_fpu())

    def set_cpu_state(self, thread: int, state: x86_64.CpuState, changed: set[str]) -> None:
        fd = self.vcpu(thread).fd
        if "sregs" in changed:
            fd.set_sregs(state.sregs)
        if "regs" in changed:
            fd.set_regs(state.regs)
        if "fpu" in changed:
            fd.set_fpu(state.fpu)

    # --- memory -----------------------------------------------------------------------
    def _paging(self, thread: int) -> tuple[int, int, int, int]:
        s = self.vcpu(thread).fd.get_sregs()
        return int(s.cr0), int(s.cr3), int(s.cr4), int(s.efer)

    def read_memory(self, thread: int, addr: int, length: int) -> bytes:
        """Up to length bytes at a guest-virtual address: stops at the first page that
        is unmapped or not RAM (empty if the first one is). Breakpoints are hidden."""
        cr0, cr3, cr4, efer = self._paging(thread)
        mem = self.machine.memory
        out = bytearray()
        va = addr
        while len(out) < length and va < 1 << 64:
            chunk = min(length - len(out), 0x1000 - (va & 0xFFF))
            gpa = paging.translate(mem, va, cr0, cr3, cr4, efer)
            if gpa is None or not mem.contains(gpa, chunk):
                break
            out += mem.read(gpa, chunk)
            va += chunk
        for bp in self._bps.values():
            if addr <= bp.addr < addr + len(out):
                out[bp.addr - addr] = bp.original
        return bytes(out)

    def write_memory(self, thread: int, addr: int, data: bytes) -> bool:
        """Write at a guest-virtual address (all or nothing); bytes under a planted
        breakpoint become its saved original and the int3 stays."""
        patched = bytearray(data)
        hidden = [bp for bp in self._bps.values() if addr <= bp.addr < addr + len(data)]
        for bp in hidden:
            patched[bp.addr - addr] = INT3
        if not paging.write_virtual(self.machine.memory, addr, bytes(patched),
                                    *self._paging(thread)):
            return False
        for bp in hidden:
            bp.original = data[bp.addr - addr]
        return True

    # --- breakpoints ------------------------------------------------------------------
    def insert_breakpoint(self, thread: int, addr: int) -> bool:
        """Plant an int3 at a guest-virtual address (translated now, with the thread's
        page tables); False if it is not mapped to RAM."""
        if addr in self._bps:
            return True
        mem = self.machine.memory
        gpa = paging.translate(mem, addr, *self._paging(thread))
        if gpa is None or not mem.contains(gpa, 1):
            return False
        self._bps[addr] = Breakpoint(addr, gpa, mem.read_u8(gpa))
        mem.write(gpa, bytes([INT3]))
        return True

    def remove_breakpoint(self, addr: int) -> None:
        bp = self._bps.pop(addr, None)
        mem = self.machine.memory
        if bp is not None and mem.read_u8(bp.gpa) == INT3:
            mem.write(bp.gpa, bytes([bp.original]))

    def remove_all_breakpoints(self) -> None:
        for addr in list(self._bps):
            self.remove_breakpoint(addr)

    @property
    def breakpoints(self) -> list[int]:
        return sorted(self._bps)

    # --- hardware breakpoints and watchpoints ----------------------------------------
    def insert_hw_point(self, kind: int, addr: int, length: int) -> bool:
        """Z1-Z4: take a debug register for every vCPU (applied when they resume);
        False when all four are in use. ValueError if the registers cannot express it
        (a watchpoint not 1/2/4/8 bytes or not aligned)."""
        return self._hw.insert(debugregs.check(kind, addr, length))

    def remove_hw_point(self, kind: int, addr: int, length: int) -> None:
        self._hw.remove(debugregs.check(kind, addr, length))

    @property
    def hw_points(self) -> list[debugregs.HwPoint | None]:
        return list(self._hw.slots)
