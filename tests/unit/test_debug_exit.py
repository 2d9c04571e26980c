"""isa-debug-exit and the port-0x80 POST-code sink: the two write-mostly ports."""

from __future__ import annotations

import pytest

from corevisor.devices import Device
from corevisor.devices.debug_exit import DebugExit, DebugExitState
from corevisor.devices.postcode import PostCode, PostCodeState
from corevisor.errors import DeviceError


def make() -> tuple[DebugExit, list[int]]:
    exits: list[int] = []
    return DebugExit(exits.append), exits


def test_is_a_device() -> None:
    assert isinstance(make()[0], Device)
    assert isinstance(PostCode(), Device)


@pytest.mark.parametrize(
    ("data", "value"),
    [(b"\x00", 0), (b"\x2a", 42), (b"\x34\x12", 0x1234), (b"\x78\x56\x34\x12", 0x12345678)],
)
def test_write_calls_on_exit_with_little_endian_value(data: bytes, value: int) -> None:
    dev, exits = make()
    dev.write(0, data)
    assert exits == [value]


@pytest.mark.parametrize(("offset", "data"), [(1, b"\x01"), (0, b""), (0, b"\x01\x02\x03")])
def test_other_writes_are_ignored(offset: int, data: bytes) -> None:
    dev, exits = make()
    dev.write(offset, data)
    assert exits == []


def test_reads_float_high() -> None:
    dev, _ = make()
    assert dev.read(0, 1) == b"\xff"
    assert dev.read(0, 4) == b"\xff" * 4
    assert dev.read(3, 0) == b""


def test_debug_exit_save_restore() -> None:
    dev, _ = make()
    dev.restore(dev.save())
    assert dev.save() == DebugExitState()
    with pytest.raises(DeviceError):
        dev.restore(PostCodeState())  # type: ignore[arg-type]


def test_postcode_latches_and_counts() -> None:
    dev = PostCode()
    assert dev.read(0, 1) == b"\x00"
    dev.write(0, b"\x55")
    dev.write(0, b"\xaa")
    assert (dev.last, dev.writes) == (0xAA, 2)
    assert dev.read(0, 1) == b"\xaa"
    dev.write(0, b"\x34\x12")
    assert dev.read(0, 1) == b"\x34"
    assert dev.read(0, 4) == b"\x34\x12\x00\x00"


def test_postcode_save_restore() -> None:
    dev = PostCode()
    dev.write(0, b"\x10")
    other = PostCode()
    other.restore(dev.save())
    assert (other.last, other.writes) == (0x10, 1)
    with pytest.raises(DeviceError):
        other.restore(PostCodeState(last=-1))
    with pytest.raises(DeviceError):
        other.restore(PostCodeState(writes=1.5))  # type: ignore[arg-type]
