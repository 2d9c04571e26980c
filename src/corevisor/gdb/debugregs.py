"""x86 debug registers for GDB's hardware breakpoints and watchpoints (Z1-Z4).

Four slots (DR0-DR3) hold linear addresses; DR7 enables each slot and says what it
watches (RW: 00 execute, 01 write, 11 read or write) and how many bytes (LEN: 00 one,
01 two, 11 four, 10 eight; the address aligned to the length). KVM takes them in
kvm_guest_debug.arch.debugreg[0..3] and [7] with KVM_GUESTDBG_USE_HW_BP, applies them
instead of the guest's own debug registers, and reports a hit as KVM_EXIT_DEBUG with
exception 1 and DR6.Bn set for slot n.

x86 has no read-only data breakpoint: a read watchpoint (Z3) is an access watchpoint
(RW 11) reported as `rwatch`. GDB expects that of x86 targets: a "read" hit whose value
changed was a write, and GDB does not stop for it.

Pure data; no KVM here (target.py applies the result).
"""

from __future__ import annotations

from dataclasses import dataclass

# GDB's Z packet types
EXEC = 1
WRITE = 2
READ = 3
ACCESS = 4

SLOTS = 4
DR7_FIXED = 1 << 10  # reads as one on hardware
DR6_HITS = 0xF  # B0-B3
_RW = {EXEC: 0b00, WRITE: 0b01, READ: 0b11, ACCESS: 0b11}
_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_STOP_KEY = {WRITE: b"watch", READ: b"rwatch", ACCESS: b"awatch"}


@dataclass(frozen=True)
class HwPoint:
    """One slot's content: GDB's Z type, the linear address and the length in bytes."""

    kind: int
    addr: int
    length: int

    def stop_reason(self) -> bytes:
        """The stop reply's reason field for a hit: hwbreak, or watch/rwatch/awatch."""
        if self.kind == EXEC:
            return b"hwbreak:;"
        return b"%s:%x;" % (_STOP_KEY[self.kind], self.addr)


def check(kind: int, addr: int, length: int) -> HwPoint:
    """The point GDB asks for, or ValueError if the debug registers cannot hold it."""
    if kind not in _RW:
        raise ValueError(f"Z{kind} is not a hardware breakpoint or watchpoint")
    if not 0 <= addr < 1 << 64:
        raise ValueError("address out of range")
    if kind == EXEC:
        # GDB's kind for x86 breakpoints is 1 (the int3 size); execute slots are LEN 00.
        return HwPoint(EXEC, addr, 1)
    if length not in _LEN or addr % length:
        raise ValueError("a watchpoint is 1, 2, 4 or 8 bytes, aligned to its length")
    return HwPoint(kind, addr, length)


def dr7_bits(slot: int, point: HwPoint) -> int:
    """DR7's bits for one slot: local enable, RW and LEN."""
    if not 0 <= slot < SLOTS:
        raise ValueError("no such debug register")
    rw = _RW[point.kind]
    length = 0 if point.kind == EXEC else _LEN[point.length]
    return (1 << (2 * slot)) | (rw << (16 + 4 * slot)) | (length << (18 + 4 * slot))


class DebugRegisters:
    """The four slots as GDB fills them; the same for every vCPU (all-stop)."""

    def __init__(self) -> None:
        self.slots: list[HwPoint | None] = [None] * SLOTS

    def insert(self, point: HwPoint) -> bool:
        """Take a free slot (True), or False when all four are in use. Inserting a
        point that is already there is a no-op, as for software breakpoints."""
        if point in self.slots:
            return True
        for i, s in enumerate(self.slots):
            if s is None:
                self.slots[i] = point
                return True
        return False

    def remove(self, point: HwPoint) -> bool:
        """Free the point's slot; False if it was not inserted."""
        if point not in self.slots:
            return False
        self.slots[self.slots.index(point)] = None
        return True

    def clear(self) -> None:
        self.slots = [None] * SLOTS

    def __bool__(self) -> bool:
        return any(s is not None for s in self.slots)

    def dr7(self, skip: int | None = None) -> int:
        """DR7 enabling every used slot (except slot `skip`, for stepping off it)."""
        value = DR7_FIXED
        for i, s in enumerate(self.slots):
            if s is not None and i != skip:
                value |= dr7_bits(i, s)
        return value

    def debugregs(self, skip: int | None = None) -> tuple[int, ...]:
        """kvm_guest_debug.arch.debugreg: DR0-DR3, two unused, DR6, DR7."""
        addrs = [s.addr if s is not None else 0 for s in self.slots]
        return (*addrs, 0, 0, 0, self.dr7(skip))

    def hit(self, dr6: int) -> HwPoint | None:
        """The point whose B bit is set in DR6 (the lowest slot if several); None if no
        used slot fired. Watchpoints win over execute breakpoints: a data hit reported
        with a code hit is the instruction before, whose effect GDB should see."""
        fired = [s for i, s in enumerate(self.slots) if s is not None and dr6 >> i & 1]
        fired.sort(key=lambda s: s.kind == EXEC)
        return fired[0] if fired else None

    def exec_slot(self, addr: int) -> int | None:
        """The slot of an execute breakpoint at addr, if there is one."""
        for i, s in enumerate(self.slots):
            if s is not None and s.kind == EXEC and s.addr == addr:
                return i
        return None
