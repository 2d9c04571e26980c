"""DR7 encoding, slot allocation and DR6 decoding for GDB's Z1-Z4 (gdb/debugregs.py)."""

from __future__ import annotations

import pytest

from corevisor.gdb import debugregs as d


def test_dr7_bits_per_slot_kind_and_length() -> None:
    # measured on the test host: DR0 = main, DR7 = 0x401 fires as an execute breakpoint
    regs = d.DebugRegisters()
    assert regs.insert(d.check(d.EXEC, 0x101000, 1))
    assert regs.dr7() == 0x401
    assert regs.debugregs() == (0x101000, 0, 0, 0, 0, 0, 0, 0x401)
    # slot n: enable bit 2n, RW at 16 + 4n, LEN at 18 + 4n
    assert d.dr7_bits(0, d.HwPoint(d.WRITE, 0x1000, 4)) == 0x1 | 0b01 << 16 | 0b11 << 18
    assert d.dr7_bits(1, d.HwPoint(d.ACCESS, 0x1000, 1)) == 0x4 | 0b11 << 20 | 0b00 << 22
    assert d.dr7_bits(2, d.HwPoint(d.READ, 0x1000, 8)) == 0x10 | 0b11 << 24 | 0b10 << 26
    assert d.dr7_bits(3, d.HwPoint(d.WRITE, 0x1000, 2)) == 0x40 | 0b01 << 28 | 0b01 << 30
    assert d.dr7_bits(3, d.HwPoint(d.EXEC, 0x1000, 1)) == 0x40


@pytest.mark.parametrize(("length", "code"), [(1, 0b00), (2, 0b01), (4, 0b11), (8, 0b10)])
def test_watch_lengths(length: int, code: int) -> None:
    assert d.dr7_bits(0, d.check(d.WRITE, 0x2000, length)) == 1 | 0b01 << 16 | code << 18


def test_check_refuses_what_the_registers_cannot_hold() -> None:
    for kind, addr, length in [
        (d.WRITE, 0x1001, 4),
        (d.WRITE, 0x1000, 3),
        (d.ACCESS, 0x1000, 16),
        (d.READ, 0x1004, 8),
        (0, 0x1000, 1),
        (5, 0x1000, 1),
        (d.EXEC, 1 << 64, 1),
    ]:
        with pytest.raises(ValueError):
            d.check(kind, addr, length)
    # x86 GDB sends kind 1 for breakpoints; an execute slot is always LEN 00
    assert d.check(d.EXEC, 0x1003, 1) == d.HwPoint(d.EXEC, 0x1003, 1)


def test_four_slots_then_refusal_and_removal_frees_one() -> None:
    regs = d.DebugRegisters()
    assert not regs
    points = [d.check(d.EXEC, 0x1000 + i, 1) for i in range(4)]
    for pt in points:
        assert regs.insert(pt)
    assert regs.insert(points[2])  # already there: no second slot
    fifth = d.check(d.WRITE, 0x3000, 4)
    assert not regs.insert(fifth)
    assert regs.dr7() == 0x400 | 0x55
    assert regs.remove(points[1]) and not regs.remove(points[1])
    assert regs.insert(fifth)
    assert regs.slots[1] == fifth
    assert regs.debugregs()[:4] == (0x1000, 0x3000, 0x1002, 0x1003)
    regs.clear()
    assert not regs and regs.dr7() == 0x400


def test_skip_leaves_one_slot_out_for_stepping_off_it() -> None:
    regs = d.DebugRegisters()
    regs.insert(d.check(d.EXEC, 0x1000, 1))
    regs.insert(d.check(d.EXEC, 0x2000, 1))
    assert regs.exec_slot(0x2000) == 1 and regs.exec_slot(0x3000) is None
    assert regs.dr7(skip=1) == 0x401
    assert regs.debugregs(skip=0)[7] == 0x404


def test_dr6_decoding_and_stop_reasons() -> None:
    regs = d.DebugRegisters()
    hb = d.check(d.EXEC, 0x101000, 1)
    w = d.check(d.WRITE, 0x10FCE4, 4)
    r = d.check(d.READ, 0x10FCE8, 4)
    a = d.check(d.ACCESS, 0x10FCF0, 8)
    for pt in (hb, w, r, a):
        regs.insert(pt)
    assert regs.hit(0xFFFF0FF1) is hb  # measured DR6 of an execute hit in slot 0
    assert regs.hit(0xFFFF0FF2) is w
    assert regs.hit(0xFFFF0FF4) is r and regs.hit(0xFFFF0FF8) is a
    assert regs.hit(0xFFFF4FF0) is None  # BS only: a single step
    assert regs.hit(0xFFFF0FF3) is w  # a data hit wins over an execute hit
    regs.remove(w)
    assert regs.hit(0xFFFF0FF2) is None  # the slot was freed
    assert hb.stop_reason() == b"hwbreak:;"
    assert w.stop_reason() == b"watch:10fce4;"
    assert r.stop_reason() == b"rwatch:10fce8;"
    assert a.stop_reason() == b"awatch:10fcf0;"
