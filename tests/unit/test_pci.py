"""PCI register logic without KVM: config space, BARs, capabilities, MSI-X, MSI, the
configuration mechanisms, the host bridge's PAM registers; hostile accesses never raise
and never change what must not change."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corevisor.errors import DeviceError
from corevisor.pci import msi
from corevisor.pci.config import (
    BAR0,
    CAP_ID_MSIX,
    COMMAND,
    COMMAND_IO,
    COMMAND_MEMORY,
    STATUS,
    STATUS_CAP_LIST,
    Bar,
    BarKind,
    BarWindow,
    PciFunction,
)
from corevisor.pci.host import ConfigPorts, Ecam, HostBridge, PciRoot, pam_segments
from corevisor.pci.msix import Msix
from corevisor.pci.routing import default_routes


def _function(**kw: object) -> PciFunction:
    bars = (
        Bar(0, 0x100, BarKind.IO),
        Bar(1, 0x1000, BarKind.MEM32),
        Bar(2, 0x4000, BarKind.MEM64, prefetchable=True),
    )
    return PciFunction(vendor=0x1234, device=0x5678, class_code=0x020000, revision=3,
                       subsystem_vendor=0x1AF4, subsystem=0x1100, interrupt_pin=1, bars=bars,
                       name="test", **kw)  # type: ignore[arg-type]


def test_header_identity_and_read_only_fields() -> None:
    f = _function()
    assert f.read(0, 4) == 0x5678_1234
    assert f.read(0x08, 4) == 0x0200_0003  # class code and revision
    assert f.read(0x2C, 4) == 0x1100_1AF4
    assert f.read(0x3D, 1) == 1
    f.write(0, 4, 0xFFFFFFFF)  # vendor/device are read-only
    f.write(0x08, 4, 0)
    f.write(0x3D, 1, 4)
    assert f.read(0, 4) == 0x5678_1234 and f.read(0x08, 4) == 0x0200_0003
    assert f.read(0x3D, 1) == 1
    f.write(0x3C, 1, 10)  # INTERRUPT_LINE is the firmware's to write
    assert f.read(0x3C, 1) == 10
    assert f.read(0x1000, 4) == 0xFFFFFFFF  # beyond the space
    assert f.read(0x101, 2) == 0xFFFF  # misaligned
    assert f.read(0x200, 4) == 0  # extended space: nothing there


def test_bar_sizing_reads_back_size_and_type_bits() -> None:
    f = _function()
    for reg in range(BAR0, BAR0 + 16, 4):
        f.write(reg, 4, 0xFFFFFFFF)
    assert f.read(BAR0, 4) == 0xFFFFFF01  # 256 ports, I/O
    assert f.read(BAR0 + 4, 4) == 0xFFFFF000  # 4 KiB, 32-bit memory
    assert f.read(BAR0 + 8, 4) == 0xFFFFC00C  # 16 KiB, 64-bit, prefetchable
    assert f.read(BAR0 + 12, 4) == 0xFFFFFFFF  # its upper half: all address bits
    assert f.read(BAR0 + 16, 4) == 0  # no BAR4: nothing writable


def test_windows_follow_command_and_bar_writes() -> None:
    f = _function()
    seen: list[tuple[int, BarWindow | None, BarWindow | None]] = []
    f.on_window = lambda i, old, new: seen.append((i, old, new))
    f.write(BAR0 + 4, 4, 0xE000_1000)
    f.write(BAR0 + 8, 4, 0x0000_4000)
    f.write(BAR0 + 12, 4, 0x1)  # 64-bit: 0x1_0000_4000
    f.write(BAR0, 4, 0xC100)
    assert seen == []  # decoding is off: nothing mapped yet
    f.write(COMMAND, 2, COMMAND_MEMORY)
    assert f.windows() == {1: BarWindow(False, 0xE000_1000, 0x1000),
                           2: BarWindow(False, 0x1_0000_4000, 0x4000)}
    f.write(COMMAND, 2, COMMAND_MEMORY | COMMAND_IO)
    assert f.windows()[0] == BarWindow(True, 0xC100, 0x100)
    seen.clear()
    f.write(BAR0 + 4, 4, 0xE000_2000)  # the guest moves BAR1
    assert seen == [(1, BarWindow(False, 0xE000_1000, 0x1000),
                     BarWindow(False, 0xE000_2000, 0x1000))]
    seen.clear()
    f.write(COMMAND, 2, 0)
    assert [i for i, _, new in seen if new is None] == [0, 1, 2] and f.windows() == {}


def test_place_bar_assigns_and_enables_decoding() -> None:
    f = _function()
    f.place_bar(2, 0x2_0000_0000)
    assert f.bar_address(2) == 0x2_0000_0000 and f.command() & COMMAND_MEMORY
    with pytest.raises(ValueError, match="not size-aligned"):
        f.place_bar(1, 0xE000_0800)


def test_bars_are_checked_when_declared() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        Bar(0, 0x3000, BarKind.MEM32)
    with pytest.raises(ValueError, match="no such BAR"):
        Bar(5, 0x1000, BarKind.MEM64)
    with pytest.raises(ValueError, match="overlaps"):
        PciFunction(vendor=1, device=1, class_code=0, bars=(
            Bar(0, 0x1000, BarKind.MEM64), Bar(1, 0x1000, BarKind.MEM32)))


def test_status_error_bits_clear_by_writing_one() -> None:
    f = _function()
    f.put(STATUS, 2, 0x8000 | STATUS_CAP_LIST)  # a detected parity error
    f.write(STATUS, 2, 0x8000)
    assert f.read(STATUS, 2) == STATUS_CAP_LIST


def test_capability_chain() -> None:
    f = _function()
    a = f.add_capability(0x09, b"\x04abc")
    b = f.add_capability(0x05, bytes(10))
    assert f.read(STATUS, 2) & STATUS_CAP_LIST and f.read(0x34, 1) == a == 0x40
    assert f.read(a, 1) == 0x09 and f.read(a + 1, 1) == b and f.read(b + 1, 1) == 0
    assert b % 4 == 0


def _msix_function() -> tuple[PciFunction, Msix, list[int]]:
    f = PciFunction(vendor=1, device=2, class_code=0, bars=(Bar(1, 0x1000, BarKind.MEM32),))
    sent: list[int] = []
    m = Msix(f, 3, sent.append, table=(1, 0), pba=(1, 0x800))
    return f, m, sent


def _entry(m: Msix, v: int, address: int, data: int, masked: bool) -> None:
    m.table_write(16 * v, struct.pack("<II", address & 0xFFFFFFFF, address >> 32))
    m.table_write(16 * v + 8, struct.pack("<II", data, int(masked)))


def test_msix_capability_layout() -> None:
    f, m, _ = _msix_function()
    cap = f.read(0x34, 1)
    assert f.read(cap, 1) == CAP_ID_MSIX and cap == m.offset
    assert f.read(cap + 2, 2) == 2  # table size - 1
    assert f.read(cap + 4, 4) == 0 | 1  # table at BAR1 offset 0
    assert f.read(cap + 8, 4) == 0x800 | 1  # PBA at BAR1 offset 0x800
    f.write(cap + 4, 4, 0x1234)  # read-only
    assert f.read(cap + 4, 4) == 1


def test_msix_masking_pending_and_delivery() -> None:
    f, m, sent = _msix_function()
    routes: list[int] = []
    m.on_route = routes.append
    assert not m.notify(0)  # MSI-X off: nothing, not even pending
    f.write(m.offset + 2, 2, 0x8000)  # enable
    assert m.enabled
    _entry(m, 1, 0xFEE0_0000, 0x41, masked=True)
    assert m.notify(1) and sent == [] and m.pending(1)
    assert m.pba_read(0, 8) == (1 << 1).to_bytes(8, "little")
    _entry(m, 1, 0xFEE0_0000, 0x41, masked=False)  # unmasking delivers it once
    assert sent == [1] and not m.pending(1) and 1 in routes
    assert m.entry(1) == (0xFEE0_0000, 0x41, False)
    m.notify(1)
    assert sent == [1, 1]
    f.write(m.offset + 2, 2, 0xC000)  # function mask
    m.notify(1)
    assert sent == [1, 1] and m.pending(1)
    f.write(m.offset + 2, 2, 0x8000)
    assert sent == [1, 1, 1]
    assert not m.notify(7)  # no such vector


def test_msix_state_round_trip_and_checks() -> None:
    f, m, sent = _msix_function()
    f.write(m.offset + 2, 2, 0x8000)
    _entry(m, 2, 0xFEE0_1000, 0x55, masked=True)
    m.notify(2)
    state = m.save()
    f2, m2, _ = _msix_function()
    routes: list[int] = []
    m2.on_route = routes.append
    m2.restore(state)
    assert m2.entry(2) == (0xFEE0_1000, 0x55, False) or m2.pending(2)
    assert routes == [0, 1, 2]  # every route announced again
    with pytest.raises(DeviceError, match="vectors"):
        other = Msix(f2, 5, sent.append, table=(1, 0x100), pba=(1, 0x900))
        other.restore(state)


def test_msi_capability_vectors_masking() -> None:
    f = PciFunction(vendor=1, device=2, class_code=0)
    sent: list[int] = []
    cap = msi.Msi(f, 4, sent.append)
    assert not cap.notify(0)
    f.write(cap.offset + 4, 4, 0xFEE0_0000)
    f.write(cap.offset + 12, 2, 0x40)
    f.write(cap.offset + 2, 2, 0x1 | (2 << 4))  # enable, 4 vectors
    assert cap.enabled_vectors() == 4
    assert cap.entry(3) == (0xFEE0_0000, 0x43, False)
    f.write(cap.offset + 16, 4, 0b100)  # mask vector 2
    assert cap.notify(2) and sent == []
    assert f.read(cap.offset + 20, 4) == 0b100  # pending
    f.write(cap.offset + 16, 4, 0)
    assert sent == [2] and f.read(cap.offset + 20, 4) == 0
    assert not cap.notify(4)


def _root() -> tuple[PciRoot, PciFunction, list[str]]:
    root = PciRoot(HostBridge())
    f = _function()
    root.add(f, 3)
    return root, f, []


def test_config_mechanism_one() -> None:
    root, f, _ = _root()
    resets: list[int] = []
    ports = ConfigPorts(root, lambda: resets.append(1))
    ports.write(0, struct.pack("<I", 0x8000_0000 | 3 << 11))
    assert ports.read(4, 4) == struct.pack("<I", 0x5678_1234)
    assert ports.read(6, 2) == struct.pack("<H", 0x5678)  # 0xCFE: the upper half
    assert ports.read(0, 4) == struct.pack("<I", 0x8000_1800)
    ports.write(0, struct.pack("<I", 0x8000_0000 | 4 << 11))  # empty slot
    assert ports.read(4, 4) == b"\xff" * 4
    ports.write(0, struct.pack("<I", 0x8001_0000))  # bus 1: nothing
    assert ports.read(4, 4) == b"\xff" * 4
    ports.write(0, struct.pack("<I", 0))  # not enabled
    assert ports.read(4, 4) == b"\xff" * 4
    ports.write(1, b"\x02")  # 0xCF9 without the reset bit
    assert resets == []
    ports.write(1, b"\x06")
    assert resets == [1]
    ports.write(0, struct.pack("<I", 0x8000_0000 | 3 << 11 | 0x3C))
    ports.write(4, b"\x0b")
    assert f.read(0x3C, 1) == 11
    state = ports.save()
    other = ConfigPorts(root, lambda: None)
    other.restore(state)
    assert other.read(0, 4) == ports.read(0, 4)
    with pytest.raises(DeviceError):
        other.restore(type(state)(0x7F00_0001))


def test_ecam_reaches_the_same_space() -> None:
    root, f, _ = _root()
    ecam = Ecam(root)
    assert ecam.read(3 << 15, 4) == struct.pack("<I", 0x5678_1234)
    assert ecam.read(0, 2) == struct.pack("<H", 0x8086)  # the host bridge
    assert ecam.read(3 << 15 | 1 << 12, 4) == b"\xff" * 4  # function 1: absent
    ecam.write(3 << 15 | 0x3C, b"\x05")
    assert f.read(0x3C, 1) == 5
    assert ecam.read(3 << 15 | 0x101, 2) == b"\xff\xff"  # misaligned


def test_host_bridge_identity_and_pam() -> None:
    hb = HostBridge()
    assert hb.read(0, 4) == 0x1237_8086 and hb.read(0x2C, 4) == 0x1100_1AF4
    seen: list[bytes] = []
    hb.on_pam = seen.append
    hb.write(0x58, 4, 0x0000_3000)  # PAM0 (byte 0x59) as part of a dword write
    assert seen == [bytes([0x30, 0, 0, 0, 0, 0, 0])]
    hb.write(0x5A, 1, 0xFF)  # reserved bits stay 0
    assert hb.pam()[1] == 0x33
    hb.write(0x5A, 1, 0x33)  # unchanged: no new announcement
    assert len(seen) == 2
    segs = pam_segments(hb.pam())
    assert (0xF0000, 0x100000, 3) in segs and (0xC0000, 0xC4000, 3) in segs
    assert (0xC8000, 0xCC000, 0) in segs and len(segs) == 13
    state = hb.save()
    fresh = HostBridge()
    got: list[bytes] = []
    fresh.on_pam = got.append
    fresh.restore(state)
    assert got == [hb.pam()]


def test_restore_refuses_another_device() -> None:
    a, b = _function(), PciFunction(vendor=0x1234, device=0x9999, class_code=0)
    with pytest.raises(DeviceError, match="read-only config byte"):
        b.restore(a.save())


def test_default_routes_are_kvms() -> None:
    routes = default_routes()
    assert len(routes) == 16 * 2 + 8
    ioapic = [(g, pin) for g, _, chip, pin, _ in routes if chip == 2]
    assert ioapic == [(g, g) for g in range(24)]  # the PIT stays on pin 0


# --- hostile accesses ---------------------------------------------------------------------

accesses = st.lists(
    st.tuples(st.integers(-8, 0x1100), st.sampled_from([0, 1, 2, 3, 4, 8]),
              st.integers(0, 2**64 - 1)),
    max_size=60,
)


@settings(deadline=None, max_examples=200)
@given(accesses)
def test_hostile_config_accesses_never_raise_or_change_identity(
    ops: list[tuple[int, int, int]]
) -> None:
    f = _function()
    m = Msix(f, 2, lambda v: None, table=(1, 0), pba=(1, 0x800))
    for offset, size, value in ops:
        f.write(offset, size, value)
        f.read(offset, size)
        m.table_write(offset, value.to_bytes(8, "little")[: max(size, 0)])
        m.table_read(offset, size)
        m.pba_read(offset, size)
    assert f.read(0, 4) == 0x5678_1234 and f.read(0x08, 4) == 0x0200_0003
    for index, bar in f.bars.items():
        assert f.bar_address(index) % bar.size == 0
    assert f.read(m.offset, 1) == CAP_ID_MSIX and f.read(m.offset + 2, 2) & 0x7FF == 1


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.integers(-4, 12), st.binary(max_size=9)), max_size=60))
def test_hostile_port_and_ecam_accesses_never_raise(ops: list[tuple[int, bytes]]) -> None:
    root, _, _ = _root()
    ports = ConfigPorts(root, lambda: None)
    ecam = Ecam(root)
    for offset, data in ops:
        ports.write(offset, data)
        ports.read(offset, len(data))
        ecam.write(offset * 0x1234 & 0xFFFFF, data)
        ecam.read(offset * 0x777 & 0xFFFFF, len(data))
    assert ecam.read(0, 4) == struct.pack("<I", 0x1237_8086)
