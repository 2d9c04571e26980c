"""The CMOS RTC's index/data ports (time registers, BCD/binary, 12/24 h, CMOS RAM) under
random guest accesses, at a fixed host time so a save/restore round trip is exact."""

from __future__ import annotations

from corevisor.devices.rtc import Rtc
from fuzz.common import Cursor, drive_device

_NOW = 1_767_225_600.25  # 2026-01-01 00:00:00.25 UTC


def _make() -> Rtc:
    return Rtc(clock=lambda: _NOW)


def _index(dev: Rtc, c: Cursor) -> None:
    dev.write(0, bytes([c.u(1)]))  # select a register, NMI bit included


def one_input(data: bytes) -> None:
    drive_device(data, _make, 2, _index)
