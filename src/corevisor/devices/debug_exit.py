"""QEMU's isa-debug-exit device (port 0xF4): lets a test guest end the VM with a status.

A write of 1, 2 or 4 bytes at offset 0 calls ``on_exit(value)`` with the written bytes
as a little-endian integer. The value is passed on unchanged: QEMU turns it into the
process exit status ``(value << 1) | 1``, and whether corevisor does the same is the
VMM's choice, not the device's. Reads return 0xFF bytes like an empty ISA port.

What does not live here: stopping the machine (machine.py decides what on_exit does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError

__all__ = ["DebugExit", "DebugExitState"]

_EXIT_SIZES = frozenset({1, 2, 4})


@dataclass(frozen=True)
class DebugExitState:
    """The device has no state; the class exists so every device saves the same way."""


class DebugExit:
    """The isa-debug-exit model (see the module docstring)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        """Nothing to read: an unclaimed ISA port floats high."""
        return b"\xff" * max(size, 0)

    def write(self, offset: int, data: bytes) -> None:
        """Report the exit value; other offsets and sizes are ignored as hardware would."""
        if offset == 0 and len(data) in _EXIT_SIZES:
            self._on_exit(int.from_bytes(data, "little"))

    def save(self) -> DebugExitState:
        """Capture the (empty) state."""
        return DebugExitState()

    def restore(self, state: DebugExitState) -> None:
        """Accept only this device's state type, so a mixed-up snapshot is caught."""
        if not isinstance(state, DebugExitState):
            raise DeviceError(f"debug-exit: cannot restore from {type(state).__name__}")
