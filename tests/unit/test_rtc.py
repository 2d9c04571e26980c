"""The CMOS RTC read and set the way a guest does it, against an injected clock."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corevisor.devices import Device
from corevisor.devices.rtc import Rtc, RtcState
from corevisor.errors import DeviceError

INDEX = 0
DATA = 1


class FakeClock:
    """A host clock the test moves by hand (the RTC takes any callable)."""

    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now


# A Thursday afternoon on a leap day.
T0 = datetime(2024, 2, 29, 13, 45, 30, 250000, tzinfo=UTC)


def make(when: datetime = T0) -> tuple[Rtc, FakeClock]:
    clock = FakeClock(when)
    return Rtc(clock), clock


def cmos_read(rtc: Rtc, reg: int) -> int:
    rtc.write(INDEX, bytes([reg]))
    return rtc.read(DATA, 1)[0]


def cmos_write(rtc: Rtc, reg: int, value: int) -> None:
    rtc.write(INDEX, bytes([reg]))
    rtc.write(DATA, bytes([value]))


def time_regs(rtc: Rtc) -> list[int]:
    return [cmos_read(rtc, r) for r in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


def test_is_a_device() -> None:
    assert isinstance(make()[0], Device)


def test_bcd_24h_by_default() -> None:
    rtc, _ = make()
    assert cmos_read(rtc, 0x0B) == 0x02
    # sec min hour weekday(Thu=5) day month year century
    assert time_regs(rtc) == [0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_binary_mode() -> None:
    rtc, _ = make()
    cmos_write(rtc, 0x0B, 0x06)
    assert time_regs(rtc) == [30, 45, 13, 5, 29, 2, 24, 20]


def test_12_hour_mode() -> None:
    rtc, _ = make()
    cmos_write(rtc, 0x0B, 0x00)  # BCD, 12h
    assert cmos_read(rtc, 0x04) == 0x80 | 0x01  # 1 PM
    rtc2, _ = make(datetime(2024, 1, 1, 0, 5, tzinfo=UTC))
    cmos_write(rtc2, 0x0B, 0x04)  # binary, 12h
    assert cmos_read(rtc2, 0x04) == 12  # 12 AM


def test_time_follows_the_host_clock() -> None:
    rtc, clock = make()
    clock.now += 61
    assert cmos_read(rtc, 0x00) == 0x31
    assert cmos_read(rtc, 0x02) == 0x46


def test_guest_write_sets_an_offset_not_the_host_clock() -> None:
    rtc, clock = make()
    host_before = clock.now
    cmos_write(rtc, 0x04, 0x08)  # 08h BCD
    assert cmos_read(rtc, 0x04) == 0x08
    assert clock.now == host_before
    clock.now += 3600
    assert cmos_read(rtc, 0x04) == 0x09  # the guest clock keeps running from there
    assert rtc.save().offset == pytest.approx(-5 * 3600)


def test_set_bit_freezes_and_commits_all_fields() -> None:
    rtc, clock = make()
    cmos_write(rtc, 0x0B, 0x82)  # SET, BCD, 24h
    # Write day before month: 31 is not a day of February, fine once March arrives.
    for reg, value in ((0x00, 0x00), (0x02, 0x00), (0x04, 0x12), (0x07, 0x31), (0x08, 0x03),
                       (0x09, 0x30), (0x32, 0x20)):
        cmos_write(rtc, reg, value)
    clock.now += 10  # frozen: no change while SET
    assert cmos_read(rtc, 0x00) == 0x00
    assert cmos_read(rtc, 0x0A) & 0x80 == 0  # no update in progress while SET
    cmos_write(rtc, 0x0B, 0x02)
    clock.now += 5
    assert time_regs(rtc) == [0x05, 0x00, 0x12, 0x01, 0x31, 0x03, 0x30, 0x20]  # Sunday = 1


def test_uip_in_last_244us_of_a_second() -> None:
    rtc, clock = make()
    base = float(int(clock.now))
    clock.now = base + 0.5
    assert cmos_read(rtc, 0x0A) == 0x26
    clock.now = base + 0.9999
    assert cmos_read(rtc, 0x0A) == 0xA6
    cmos_write(rtc, 0x0A, 0xA0)  # UIP is read-only
    clock.now = base + 0.1
    assert cmos_read(rtc, 0x0A) == 0x20


def test_status_registers_c_d() -> None:
    rtc, _ = make()
    assert cmos_read(rtc, 0x0D) == 0x80
    cmos_write(rtc, 0x0D, 0)
    assert cmos_read(rtc, 0x0D) == 0x80
    assert cmos_read(rtc, 0x0C) == 0


def test_cmos_ram_and_alarm_registers() -> None:
    rtc, _ = make()
    for reg in (0x01, 0x03, 0x05, 0x0E, 0x34, 0x7F):
        cmos_write(rtc, reg, reg ^ 0xA5)
    for reg in (0x01, 0x03, 0x05, 0x0E, 0x34, 0x7F):
        assert cmos_read(rtc, reg) == reg ^ 0xA5


def test_index_port_nmi_bit_and_reads() -> None:
    rtc, _ = make()
    rtc.write(INDEX, b"\x8e")  # NMI off, register 0x0E
    assert rtc.nmi_disabled
    rtc.write(DATA, b"\x77")
    rtc.write(INDEX, b"\x0e")
    assert not rtc.nmi_disabled
    assert rtc.read(DATA, 1) == b"\x77"
    assert rtc.read(INDEX, 1) == b"\xff"
    assert rtc.read(5, 2) == b"\xff\xff"


def test_garbage_time_writes_are_clamped() -> None:
    rtc, _ = make()
    cmos_write(rtc, 0x08, 0xFF)  # month "165" in BCD
    assert cmos_read(rtc, 0x08) == 0x12
    assert cmos_read(rtc, 0x07) == 0x29  # Dec 29 exists
    cmos_write(rtc, 0x0B, 0x82)
    cmos_write(rtc, 0x07, 0x99)
    assert cmos_read(rtc, 0x07) == 0x31


def test_save_restore_round_trip() -> None:
    rtc, clock = make()
    cmos_write(rtc, 0x40, 0x12)
    cmos_write(rtc, 0x02, 0x00)
    cmos_write(rtc, 0x0B, 0x86)  # SET, binary
    cmos_write(rtc, 0x04, 5)
    state = rtc.save()
    other = Rtc(clock)
    other.restore(state)
    assert other.save() == state
    assert cmos_read(other, 0x04) == 5
    assert cmos_read(other, 0x40) == 0x12


@pytest.mark.parametrize(
    "change",
    [
        {"index": 128},
        {"ram": b"\x00" * 127},
        {"reg_a": 0x80},
        {"reg_b": 0x80},  # SET without frozen fields
        {"frozen": (0, 0, 0, 1, 1, 2000)},  # frozen fields without SET
        {"reg_b": 0x82, "frozen": (60, 0, 0, 1, 1, 2000)},
        {"offset": float("nan")},
        {"offset": 1e300},
        {"nmi_disabled": 1},
    ],
)
def test_restore_rejects_bad_state(change: dict[str, object]) -> None:
    rtc, _ = make()
    with pytest.raises(DeviceError) as info:
        rtc.restore(dataclasses.replace(RtcState(), **change))  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(-1, 3), st.binary(max_size=4), st.integers(0, 4)),
        max_size=80,
    ),
    st.floats(min_value=0, max_value=4e9),
)
def test_any_guest_access_is_safe(ops: list[tuple[bool, int, bytes, int]], now: float) -> None:
    clock = FakeClock(T0)
    clock.now = now
    rtc = Rtc(clock)
    for is_write, offset, data, size in ops:
        if is_write:
            rtc.write(offset, data)
        else:
            assert len(rtc.read(offset, size)) == size
    for reg in range(128):
        cmos_read(rtc, reg)
    state = rtc.save()
    other = Rtc(clock)
    other.restore(state)
    assert other.save() == state
