"""The i8042 model as firmware and Linux probe it: commands, answers, reset."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corevisor.devices import Device
from corevisor.devices.i8042 import I8042, OUTPUT_QUEUE_LIMIT, I8042State
from corevisor.errors import DeviceError

DATA = 0
CMD = 4


class Resets:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def make() -> tuple[I8042, Resets]:
    resets = Resets()
    return I8042(resets), resets


def status(dev: I8042) -> int:
    return dev.read(CMD, 1)[0]


def command(dev: I8042, cmd: int) -> None:
    dev.write(CMD, bytes([cmd]))


def answer(dev: I8042) -> int:
    assert status(dev) & 0x01, "expected a byte in the output buffer"
    return dev.read(DATA, 1)[0]


def test_is_a_device() -> None:
    assert isinstance(make()[0], Device)


def test_pulse_reset_calls_on_reset() -> None:
    dev, resets = make()
    command(dev, 0xFE)
    assert resets.count == 1


def test_write_output_port_bit0_clear_resets() -> None:
    dev, resets = make()
    command(dev, 0xD1)
    dev.write(DATA, b"\x03")  # A20 on, reset line high: no reset
    assert resets.count == 0
    command(dev, 0xD1)
    dev.write(DATA, b"\x02")
    assert resets.count == 1
    command(dev, 0xD0)
    assert answer(dev) & 0x01  # the line came back up


def test_self_test_and_interface_test() -> None:
    dev, _ = make()
    assert not status(dev) & 0x01
    command(dev, 0xAA)
    assert answer(dev) == 0x55
    assert not status(dev) & 0x01
    command(dev, 0xAB)
    assert answer(dev) == 0x00
    assert status(dev) & 0x04  # system flag after self test


def test_command_byte_read_write() -> None:
    dev, _ = make()
    command(dev, 0x60)
    dev.write(DATA, b"\x65")
    command(dev, 0x20)
    assert answer(dev) == 0x65


def test_disable_enable_ports_show_in_command_byte() -> None:
    dev, _ = make()
    command(dev, 0xAD)
    command(dev, 0xA7)
    command(dev, 0x20)
    assert answer(dev) & 0x30 == 0x30
    command(dev, 0xAE)
    command(dev, 0xA8)
    command(dev, 0x20)
    assert answer(dev) & 0x30 == 0


def test_status_cmd_bit_tracks_last_port_written() -> None:
    dev, _ = make()
    command(dev, 0xAE)
    assert status(dev) & 0x08
    dev.write(DATA, b"\xf4")  # a keyboard command: no keyboard, no answer
    assert not status(dev) & 0x08
    assert not status(dev) & 0x01


def test_aux_loopback_sets_aux_obf() -> None:
    dev, _ = make()
    command(dev, 0xD3)
    dev.write(DATA, b"\x5a")
    assert status(dev) & 0x21 == 0x21
    assert answer(dev) == 0x5A


def test_empty_buffer_rereads_stale_byte() -> None:
    dev, _ = make()
    command(dev, 0xAA)
    assert answer(dev) == 0x55
    assert dev.read(DATA, 1) == b"\x55"


def test_other_ports() -> None:
    dev, _ = make()
    assert dev.read(1, 1) == b"\x00"
    assert dev.read(5, 1) == b"\xff"


def test_output_queue_is_bounded() -> None:
    dev, _ = make()
    for _ in range(100):
        command(dev, 0xAA)
    assert len(dev.save().output) == OUTPUT_QUEUE_LIMIT


def test_save_restore_round_trip() -> None:
    dev, _ = make()
    command(dev, 0xAA)
    command(dev, 0xD3)
    dev.write(DATA, b"\x11")
    command(dev, 0x60)  # waiting for its parameter
    state = dev.save()
    other, _ = make()
    other.restore(state)
    assert other.save() == state
    other.write(DATA, b"\x00")
    command(other, 0x20)
    assert [answer(other) for _ in range(3)] == [0x55, 0x11, 0x00]


@pytest.mark.parametrize(
    "change",
    [
        {"ctr": 256},
        {"pending_command": 0xAA},
        {"output": b"ab", "output_aux": (False,)},
        {"output": b"a" * 17, "output_aux": (False,) * 17},
        {"last_write_command": 1},
        {"output_aux": (1,), "output": b"a"},
    ],
)
def test_restore_rejects_bad_state(change: dict[str, object]) -> None:
    dev, _ = make()
    with pytest.raises(DeviceError) as info:
        dev.restore(dataclasses.replace(I8042State(), **change))  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(-1, 8), st.binary(max_size=4), st.integers(0, 4))
    )
)
def test_any_guest_access_is_safe(ops: list[tuple[bool, int, bytes, int]]) -> None:
    dev, _ = make()
    for is_write, offset, data, size in ops:
        if is_write:
            dev.write(offset, data)
        else:
            assert len(dev.read(offset, size)) == size
    state = dev.save()
    other, _ = make()
    other.restore(state)
    assert other.save() == state
