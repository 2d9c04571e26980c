"""The ACPI PM timer (devices/pm_timer.py) and PM1a blocks (devices/pm1.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corevisor.devices.pm1 import SLP_EN, SLP_TYP_S5, Pm1, Pm1State
from corevisor.devices.pm_timer import PM_TIMER_HZ, PmTimer, PmTimerState
from corevisor.errors import DeviceError


class Clock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns


def test_pm_timer_counts_at_3_579545_mhz_and_wraps_at_32_bits() -> None:
    clock = Clock()
    t = PmTimer(clock)
    assert t.read(0, 4) == b"\0\0\0\0"
    clock.ns += 1_000_000_000
    assert int.from_bytes(t.read(0, 4), "little") == PM_TIMER_HZ
    assert t.read(0, 2) == (PM_TIMER_HZ & 0xFFFF).to_bytes(2, "little")
    clock.ns += (2**32 // PM_TIMER_HZ) * 1_000_000_000  # about 20 minutes later: wrapped
    assert int.from_bytes(t.read(0, 4), "little") < 2**32
    assert t.read(1, 4) == b"\xff" * 4 and t.read(0, 3) == b"\xff" * 3
    t.write(0, b"\0\0\0\0")  # read-only


def test_pm_timer_real_clock_never_goes_backwards() -> None:
    t = PmTimer()
    values = [t.count() for _ in range(1000)]
    assert values == sorted(values)


def test_pm_timer_restore_counts_on_from_the_saved_value() -> None:
    clock = Clock()
    t = PmTimer(clock)
    clock.ns += 500_000_000
    state = t.save()
    other = PmTimer(clock)
    clock.ns += 10**9
    other.restore(state)
    assert other.count() == state.count
    clock.ns += 10**9
    assert other.count() == state.count + PM_TIMER_HZ
    for bad in (PmTimerState(-1), PmTimerState(2**32), object()):
        with pytest.raises(DeviceError):
            other.restore(bad)  # type: ignore[arg-type]


def test_pm1_sci_en_always_set_and_s5_powers_off() -> None:
    off: list[bool] = []
    pm = Pm1(lambda: off.append(True))
    assert pm.read(4, 2) == b"\x01\0"  # SCI_EN: always in ACPI mode
    assert pm.read(0, 2) == b"\0\0"  # no fixed event status
    pm.write(2, b"\x21\x01")  # PM1_EN
    assert pm.read(2, 2) == b"\x21\x01"
    pm.write(4, (3 << 10).to_bytes(2, "little"))  # SLP_TYP 3, no SLP_EN: nothing happens
    pm.write(4, (3 << 10 | SLP_EN).to_bytes(2, "little"))  # S3 is not offered
    assert not off
    pm.write(4, (SLP_TYP_S5 << 10 | SLP_EN).to_bytes(2, "little"))
    assert off == [True]
    assert pm.read(4, 2) == (SLP_TYP_S5 << 10 | 1).to_bytes(2, "little")  # SLP_EN reads 0


def test_pm1_byte_writes_to_the_control_high_byte() -> None:
    off: list[bool] = []
    pm = Pm1(lambda: off.append(True))
    pm.write(5, bytes([(SLP_TYP_S5 << 2) | (SLP_EN >> 8)]))
    assert off == [True]


@given(st.lists(st.tuples(st.integers(-2, 8), st.binary(max_size=5)), max_size=40))
def test_pm1_hostile_accesses_never_raise(ops: list[tuple[int, bytes]]) -> None:
    pm = Pm1(lambda: None)
    for offset, data in ops:
        pm.write(offset, data)
        assert len(pm.read(offset, len(data))) == len(data)
    again = Pm1(lambda: None)
    again.restore(pm.save())
    assert again.save() == pm.save()


def test_pm1_restore_refuses_bad_state() -> None:
    pm = Pm1(lambda: None)
    for bad in (Pm1State(enable=1 << 16), Pm1State(control=1), object()):
        with pytest.raises(DeviceError):
            pm.restore(bad)  # type: ignore[arg-type]
