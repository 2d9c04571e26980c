"""GuestMemory: bounds-checked access is the software IOMMU; nothing escapes guest RAM."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corevisor.errors import GuestMemoryError
from corevisor.memory import GuestMemory

MIB = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory.anonymous([(0, 2 * MIB), (4 * MIB, MIB)])
    yield m
    m.close()


def test_round_trip_in_each_region(mem: GuestMemory) -> None:
    mem.write(0x1000, b"abc")
    mem.write(4 * MIB + 10, b"xyz")
    assert mem.read(0x1000, 3) == b"abc"
    assert mem.read(4 * MIB + 10, 3) == b"xyz"
    mem.write_u64(8, 0x1122334455667788)
    assert mem.read_u32(8) == 0x55667788
    assert mem.read_u64(8) == 0x1122334455667788


def test_regions_share_one_memfd_and_are_backed_by_it(mem: GuestMemory) -> None:
    import os

    fd = mem.regions[0].fd
    assert mem.regions[1].fd == fd
    mem.write(4 * MIB, b"Q")
    assert os.pread(fd, 1, 2 * MIB) == b"Q"  # second region starts at offset 2 MiB


@pytest.mark.parametrize(
    "gpa,size",
    [(2 * MIB, 1), (2 * MIB - 1, 2), (3 * MIB, 4), (5 * MIB, 1), (-1, 1), (0, -1), (2**64, 1)],
)
def test_access_outside_ram_raises(mem: GuestMemory, gpa: int, size: int) -> None:
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, size)
    if size > 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\0" * size)
    assert not mem.contains(gpa, size)


def test_overlapping_regions_refused() -> None:
    a = GuestMemory.anonymous([(0, MIB)])
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory(a.regions + a.regions)
    a.close()


def test_read_write_obj(mem: GuestMemory) -> None:
    class P(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16)]

    mem.write_obj(0x200, P(7, 9))
    p = mem.read_obj(0x200, P)
    assert (p.a, p.b) == (7, 9)


@given(gpa=st.integers(-(2**64), 2**64), size=st.integers(0, 8 * MIB))
def test_any_access_is_inside_or_refused(gpa: int, size: int) -> None:
    m = GuestMemory.anonymous([(0, MIB)])
    try:
        data = m.read(gpa, size)
    except GuestMemoryError:
        assert not (0 <= gpa and gpa + size <= MIB)
    else:
        assert 0 <= gpa and gpa + size <= MIB and len(data) == size
    finally:
        m.close()
