"""Bus: address ranges to devices; unclaimed addresses read as all-ones."""

from __future__ import annotations

import pytest

from corevisor.bus import Bus
from corevisor.errors import DeviceError


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, bytes | int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.log.append(("r", offset, size))
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, data))


@pytest.mark.parametrize("dense", [True, False])
def test_dispatch_by_offset(dense: bool) -> None:
    bus = Bus("t", dense=dense)
    a, b = Recorder(), Recorder()
    bus.attach(0x3F8, 8, a, "a")
    bus.attach(0x60, 5, b, "b")
    bus.write(0x3FC, b"\x01")
    assert bus.read(0x64, 1) == b"\x04"
    assert a.log == [("w", 4, b"\x01")]
    assert b.log == [("r", 4, 1)]
    assert bus.read(0x3F7, 2) == b"\xff\xff"
    bus.write(0x400, b"x")
    assert bus.unhandled == 2


@pytest.mark.parametrize("dense", [True, False])
def test_overlap_refused(dense: bool) -> None:
    bus = Bus("t", dense=dense)
    bus.attach(0x100, 0x10, Recorder(), "first")
    with pytest.raises(DeviceError, match="overlaps first"):
        bus.attach(0x10F, 4, Recorder(), "second")
    bus.attach(0x110, 4, Recorder(), "third")
    assert [m.name for m in bus.mappings()] == ["first", "third"]
