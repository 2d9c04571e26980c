"""pvpanic: how a guest kernel reports its panic (register logic, no KVM)."""

from __future__ import annotations

import pytest

from corevisor.devices import Device
from corevisor.devices.debug_exit import DebugExitState
from corevisor.devices.pvpanic import PVPANIC_CRASH_LOADED, PVPANIC_PANICKED, PvPanic
from corevisor.errors import DeviceError


def test_offers_panicked_only_and_reports_it_once_per_write() -> None:
    calls: list[str] = []
    dev = PvPanic(lambda: calls.append("panic"))
    assert isinstance(dev, Device)
    assert dev.read(0, 1) == bytes([PVPANIC_PANICKED])
    dev.write(0, bytes([PVPANIC_CRASH_LOADED]))  # not offered: ignored
    dev.write(0, b"")
    dev.write(1, bytes([PVPANIC_PANICKED]))  # past the one port
    assert calls == []
    dev.write(0, bytes([PVPANIC_PANICKED]))
    assert calls == ["panic"]


def test_save_restore_refuse_another_devices_state() -> None:
    dev = PvPanic(lambda: None)
    dev.restore(dev.save())
    with pytest.raises(DeviceError, match="pvpanic"):
        dev.restore(DebugExitState())  # type: ignore[arg-type]
