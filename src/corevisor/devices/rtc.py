"""The MC146818 RTC / CMOS at ports 0x70-0x71: wall-clock time and 128 bytes of NVRAM.

Offset 0 is the index port (bits 0-6 select a register, bit 7 disables NMI; it is
write-only and reads as 0xFF), offset 1 the data port. Registers 0x00-0x09 (seconds,
alarm seconds, minutes, alarm minutes, hours, alarm hours, weekday, day, month, year)
and the century at 0x32 are computed from the host clock in UTC on every read, encoded
in BCD or binary and 12/24-hour form as register B (bits 2 and 1) asks. The guest's
clock is the host clock plus an offset: a guest writing a time register moves the offset,
never the host clock (QEMU does the same). While register B.SET is 1 the clock is frozen
so the guest can write all fields consistently; clearing SET starts it from those values.

Update-in-progress: register A bit 7 (UIP) is 1 during the last 244 microseconds of
every guest second (the length of the real chip's pre-update warning, and what QEMU
emulates), 0 otherwise and while SET is 1. Always-0 would also satisfy modern Linux, but
some firmware and older kernels wait for a UIP edge to synchronise to the second.

Register C (interrupt flags) always reads 0 and register D reads 0x80 (VRT, battery
good): no interrupt line is wired (the constructor takes none), so no periodic, alarm or
update-ended events are modelled. The alarm registers and the rest of CMOS RAM are
plain storage.

Written values that are not valid times (0xFF in BCD, month 13) are clamped to the
nearest valid value rather than refused, since guest writes must never raise; the
weekday is derived from the date, so weekday writes are ignored.

What does not live here: the port addresses (bus.py) and CMOS contents firmware
expects (memory size at 0x34/0x35, ...), which the builder can write through ``write``.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from corevisor.errors import DeviceError

__all__ = ["Rtc", "RtcState", "CMOS_SIZE"]

_INDEX = 0
_DATA = 1

CMOS_SIZE = 128

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32

_TIME_REGISTERS = frozenset(
    {REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY}
)

A_UIP = 0x80
B_SET = 0x80
B_BINARY = 0x04  # DM: 1 = binary, 0 = BCD
B_24H = 0x02
D_VRT = 0x80
HOUR_PM = 0x80  # in 12-hour mode

# 32.768 kHz time base, 1024 Hz periodic rate: what firmware programs.
_DEFAULT_A = 0x26
_DEFAULT_B = B_24H
_UIP_WINDOW = 244e-6  # seconds of UIP=1 before each second boundary

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_YEAR = 1970
_MAX_YEAR = 9999


@dataclass(frozen=True)
class RtcState:
    """The RTC's state as plain values.

    ``offset`` is guest time minus host time in seconds, so a restored guest's clock
    keeps following wall time (like QEMU's ``base=utc``). ``frozen`` holds the guest
    time fields (second, minute, hour, day, month, year) while B.SET is 1, else None.
    ``ram`` is all 128 CMOS bytes; the bytes at time and status registers are unused.
    """

    index: int = 0
    nmi_disabled: bool = False
    offset: float = 0.0
    reg_a: int = _DEFAULT_A
    reg_b: int = _DEFAULT_B
    frozen: tuple[int, ...] | None = None
    ram: bytes = bytes(CMOS_SIZE)


def _to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


class Rtc:
    """The MC146818 model (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._index = 0
        self._nmi_disabled = False
        self._offset = 0.0
        self._reg_a = _DEFAULT_A
        self._reg_b = _DEFAULT_B
        # Guest time fields while B.SET is 1: [sec, min, hour, day, month, year].
        self._frozen: list[int] | None = None
        self._ram = bytearray(CMOS_SIZE)

    @property
    def nmi_disabled(self) -> bool:
        """Bit 7 of the last index-port write (the PC's NMI mask)."""
        return self._nmi_disabled

    # ------------------------------------------------------------------ bus interface

    def read(self, offset: int, size: int) -> bytes:
        """Read ports; a wide access reads consecutive ports."""
        return bytes([self._read_port(offset + i) for i in range(max(size, 0))])

    def write(self, offset: int, data: bytes) -> None:
        """Write ports; a wide access writes consecutive ports."""
        for i, value in enumerate(data):
            self._write_port(offset + i, value)

    # ------------------------------------------------------------------ snapshot

    def save(self) -> RtcState:
        """Capture the RTC state."""
        frozen = self._frozen
        return RtcState(
            index=self._index,
            nmi_disabled=self._nmi_disabled,
            offset=self._offset,
            reg_a=self._reg_a,
            reg_b=self._reg_b,
            frozen=None if frozen is None else tuple(frozen),
            ram=bytes(self._ram),
        )

    def restore(self, state: RtcState) -> None:
        """Load a saved state after checking it."""
        if not isinstance(state, RtcState):
            raise DeviceError(f"rtc: cannot restore from {type(state).__name__}")
        if type(state.index) is not int or not 0 <= state.index < CMOS_SIZE:
            raise DeviceError(f"rtc state: index={state.index!r} is not 0..127")
        if type(state.nmi_disabled) is not bool:
            raise DeviceError("rtc state: nmi_disabled is not a bool")
        if not isinstance(state.offset, int | float) or not math.isfinite(state.offset):
            raise DeviceError(f"rtc state: offset={state.offset!r} is not a finite number")
        for name in ("reg_a", "reg_b"):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise DeviceError(f"rtc state: {name}={value!r} is not a byte")
        if state.reg_a & A_UIP:
            raise DeviceError("rtc state: reg_a has UIP set (it is computed, not stored)")
        if type(state.ram) is not bytes or len(state.ram) != CMOS_SIZE:
            raise DeviceError(f"rtc state: ram must be {CMOS_SIZE} bytes")
        if (state.frozen is not None) != bool(state.reg_b & B_SET):
            raise DeviceError("rtc state: frozen fields must be present exactly when B.SET is 1")
        if state.frozen is not None:
            _check_fields(state.frozen)
        try:
            self._guest_datetime(self._clock() + float(state.offset))
        except OverflowError:
            raise DeviceError(f"rtc state: offset={state.offset!r} is out of range") from None
        self._index = state.index
        self._nmi_disabled = state.nmi_disabled
        self._offset = float(state.offset)
        self._reg_a = state.reg_a
        self._reg_b = state.reg_b
        self._frozen = None if state.frozen is None else list(state.frozen)
        self._ram = bytearray(state.ram)

    # ------------------------------------------------------------------ ports

    def _read_port(self, offset: int) -> int:
        if offset == _DATA:
            return self._read_register(self._index)
        return 0xFF  # the index port is write-only; anything else is not ours

    def _write_port(self, offset: int, value: int) -> None:
        if offset == _INDEX:
            self._index = value & 0x7F
            self._nmi_disabled = bool(value & 0x80)
        elif offset == _DATA:
            self._write_register(self._index, value)

    # ------------------------------------------------------------------ registers

    def _read_register(self, index: int) -> int:
        if index in _TIME_REGISTERS:
            return self._read_time(index)
        if index == REG_A:
            return self._reg_a | (A_UIP if self._update_in_progress() else 0)
        if index == REG_B:
            return self._reg_b
        if index == REG_C:
            return 0
        if index == REG_D:
            return D_VRT
        return self._ram[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in _TIME_REGISTERS:
            self._write_time(index, value)
        elif index == REG_A:
            self._reg_a = value & ~A_UIP
        elif index == REG_B:
            self._write_b(value)
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self._ram[index] = value

    def _write_b(self, value: int) -> None:
        if value & B_SET and self._frozen is None:
            self._frozen = self._current_fields()  # stop the clock
        elif not value & B_SET and self._frozen is not None:
            self._set_guest_time(self._frozen)  # start it from what the guest wrote
            self._frozen = None
        self._reg_b = value

    # ------------------------------------------------------------------ time

    def _guest_datetime(self, seconds: float) -> datetime:
        return _EPOCH + timedelta(seconds=seconds)

    def _guest_now(self) -> float:
        return self._clock() + self._offset

    def _current_fields(self) -> list[int]:
        """Guest time as [sec, min, hour, day, month, year] (frozen or running)."""
        if self._frozen is not None:
            return list(self._frozen)
        try:
            t = self._guest_datetime(self._guest_now())
        except OverflowError:
            # The host clock ran past year 9999 with our offset; pin to the last second.
            return [59, 59, 23, 31, 12, _MAX_YEAR]
        return [t.second, t.minute, t.hour, t.day, t.month, t.year]

    def _set_guest_time(self, fields: list[int]) -> None:
        sec, minute, hour, day, month, year = _normalised(fields)
        target = datetime(year, month, day, hour, minute, sec, tzinfo=UTC)
        now = self._guest_now()
        # Keep the fraction of the current second so the next tick comes when it would have.
        fraction = now - math.floor(now) if math.isfinite(now) else 0.0
        self._offset = (target - _EPOCH).total_seconds() + fraction - self._clock()

    def _update_in_progress(self) -> bool:
        if self._frozen is not None:
            return False
        now = self._guest_now()
        return now - math.floor(now) >= 1.0 - _UIP_WINDOW

    def _encode(self, value: int) -> int:
        return value if self._reg_b & B_BINARY else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._reg_b & B_BINARY else _from_bcd(value)

    def _read_time(self, index: int) -> int:
        sec, minute, hour, day, month, year = self._current_fields()
        if index == REG_SECONDS:
            return self._encode(sec)
        if index == REG_MINUTES:
            return self._encode(minute)
        if index == REG_HOURS:
            if self._reg_b & B_24H:
                return self._encode(hour)
            hour12 = hour % 12 or 12
            return self._encode(hour12) | (HOUR_PM if hour >= 12 else 0)
        if index == REG_WEEKDAY:
            _, _, _, day, month, year = _normalised((sec, minute, hour, day, month, year))
            return self._encode((calendar.weekday(year, month, day) + 1) % 7 + 1)  # Sun=1
        if index == REG_DAY:
            return self._encode(day)
        if index == REG_MONTH:
            return self._encode(month)
        if index == REG_YEAR:
            return self._encode(year % 100)
        return self._encode(year // 100)  # REG_CENTURY

    def _write_time(self, index: int, value: int) -> None:
        fields = self._current_fields()
        if index == REG_SECONDS:
            fields[0] = self._decode(value)
        elif index == REG_MINUTES:
            fields[1] = self._decode(value)
        elif index == REG_HOURS:
            if self._reg_b & B_24H:
                fields[2] = self._decode(value)
            else:
                hour12 = self._decode(value & ~HOUR_PM) % 12  # 12 AM is hour 0
                fields[2] = hour12 + (12 if value & HOUR_PM else 0)
        elif index == REG_DAY:
            fields[3] = self._decode(value)
        elif index == REG_MONTH:
            fields[4] = self._decode(value)
        elif index == REG_YEAR:
            fields[5] = fields[5] // 100 * 100 + self._decode(value) % 100
        elif index == REG_CENTURY:
            fields[5] = self._decode(value) * 100 + fields[5] % 100
        else:
            return  # REG_WEEKDAY: derived from the date
        # Each field is kept in its own range now; whether the day exists in that month is
        # settled when the clock runs (so a guest may write day 31 before month 3).
        fields = [
            _clamp(v, low, high) for v, (low, high) in zip(fields, _FIELD_RANGES, strict=True)
        ]
        if self._frozen is not None:
            self._frozen = fields  # kept raw until SET clears, so field order is free
        else:
            self._set_guest_time(fields)


# Valid range of each guest time field: sec, min, hour, day, month, year.
_FIELD_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (_MIN_YEAR, _MAX_YEAR))


def _normalised(fields: list[int] | tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """Clamp guest-written fields into a valid date: writes must never raise."""
    sec, minute, hour, day, month, year = fields
    year = _clamp(year, _MIN_YEAR, _MAX_YEAR)
    month = _clamp(month, 1, 12)
    day = _clamp(day, 1, calendar.monthrange(year, month)[1])
    return _clamp(sec, 0, 59), _clamp(minute, 0, 59), _clamp(hour, 0, 23), day, month, year


def _check_fields(frozen: object) -> None:
    if (
        not isinstance(frozen, tuple)
        or len(frozen) != len(_FIELD_RANGES)
        or any(
            type(v) is not int or not low <= v <= high
            for v, (low, high) in zip(frozen, _FIELD_RANGES, strict=True)
        )
    ):
        raise DeviceError(f"rtc state: frozen={frozen!r} is not (sec, min, hour, day, month, year)")
