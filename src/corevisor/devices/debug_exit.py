"""QEMU's isa-debug-exit device (port 0xF4): lets a test guest end the VM with a status.

A write of 1, 2 or 4 bytes at offset 0 calls ``on_exit(value)`` with the written bytes
as a little-endian integer (0 .. 2**32-1), unchanged. Reads return 0xFF bytes like an
empty ISA port.

The value becomes corevisor's process exit status through ``exit_status``, the one
place that mapping lives. A process status has 8 bits, and the shell's own truncation
(``value & 0xFF``) would turn a guest's 256 or 512 into 0, "success", which is the one
answer a failing guest must never get. So 0..255 are the status as written and
anything larger *saturates* at 255: every non-zero value stays non-zero and a larger
value never reads as a smaller one. The stderr line keeps the exact value
(``exit_message``). QEMU instead exits ``(value << 1) | 1``, always odd; corevisor
keeps the value itself so that ``exit=3`` means status 3.

What does not live here: stopping the machine (machine.py decides what on_exit does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError

__all__ = ["DebugExit", "DebugExitState", "exit_status", "exit_message", "MAX_EXIT_STATUS"]

_EXIT_SIZES = frozenset({1, 2, 4})
MAX_EXIT_STATUS = 255


def exit_status(value: int) -> int:
    """The process exit status for a value the guest wrote: itself up to 255, else 255."""
    return min(max(value, 0), MAX_EXIT_STATUS)


def exit_message(value: int) -> str:
    """The line that reports a guest's exit, with the exact value it wrote."""
    status = exit_status(value)
    if status == value:
        return f"guest exited with status {value}"
    return (
        f"guest exited with status {value} ({value:#x}); corevisor exits {status}, "
        f"since a process status cannot be more than {MAX_EXIT_STATUS}"
    )


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
