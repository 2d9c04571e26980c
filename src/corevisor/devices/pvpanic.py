"""pvpanic: a guest kernel tells the VMM it panicked (QEMU's device, "QEMU0001" in ACPI).

One byte-wide port. A read returns the events the device supports; the guest's driver
(Linux's pvpanic, from its panic notifier, before the kernel's own reboot-on-panic)
writes the event that happened. corevisor supports PANICKED (bit 0) only, and a write
with it set calls ``on_panic``. CRASH_LOADED (bit 1: a kdump kernel takes over, the
guest keeps running) is not offered, so a guest has no reason to send it, and it is
ignored if one does. The port number comes from the DSDT (aml.pvpanic_device), so
nothing about it is fixed by the protocol.

Without this device, Linux with panic=-1 reboots through the i8042 and its panic looks
like a clean reset (exit status 0); with it, a panic is a crash (exit status 1).

What does not live here: the DSDT entry (aml.py), what a panic does to the machine
(machine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError

__all__ = ["PvPanic", "PvPanicState", "PVPANIC_PANICKED", "PVPANIC_CRASH_LOADED"]

PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1


@dataclass(frozen=True)
class PvPanicState:
    """The device keeps no state: a panic ends the machine at once."""


class PvPanic:
    """The pvpanic port (see the module docstring)."""

    def __init__(self, on_panic: Callable[[], None]) -> None:
        self._on_panic = on_panic

    def read(self, offset: int, size: int) -> bytes:
        """The supported events: PANICKED only."""
        return bytes([PVPANIC_PANICKED]) + b"\0" * max(size - 1, 0) if size > 0 else b""

    def write(self, offset: int, data: bytes) -> None:
        """A write with PANICKED set reports the panic; anything else is ignored."""
        if offset == 0 and data and data[0] & PVPANIC_PANICKED:
            self._on_panic()

    def save(self) -> PvPanicState:
        """Capture the (empty) state."""
        return PvPanicState()

    def restore(self, state: PvPanicState) -> None:
        """Accept only this device's state type, so a mixed-up snapshot is caught."""
        if not isinstance(state, PvPanicState):
            raise DeviceError(f"pvpanic: cannot restore from {type(state).__name__}")
