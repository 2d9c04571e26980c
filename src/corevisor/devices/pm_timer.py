"""The ACPI power-management timer: a free-running 3.579545 MHz counter at one port.

Reads at offset 0 (any width up to 4 bytes) return the low bits of a 32-bit counter
(the FADT sets TMR_VAL_EXT) that counts at PM_TIMER_HZ. The count is derived from the
host's monotonic clock at each read, so the device needs no thread and no timer, and
it never goes backwards. Writes are ignored: the timer is read-only in the ACPI spec.

No overflow event is modelled: PM1_STS.TMR_STS is never set (devices/pm1.py), which an
OS that uses the timer as a clocksource (Linux's acpi_pm) does not need.

What does not live here: the port (layout.PM_TMR_PORT), its FADT description (acpi.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError

__all__ = ["PmTimer", "PmTimerState", "PM_TIMER_HZ"]

PM_TIMER_HZ = 3_579_545
_MASK = 0xFFFF_FFFF


@dataclass(frozen=True)
class PmTimerState:
    """The counter value at the moment of saving; a restored timer counts on from it."""

    count: int = 0


class PmTimer:
    """The PM timer model (see the module docstring). clock returns nanoseconds."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._base_ns = clock()
        self._base_count = 0

    def count(self) -> int:
        """The 32-bit counter now."""
        elapsed = self._clock() - self._base_ns
        return (self._base_count + elapsed * PM_TIMER_HZ // 1_000_000_000) & _MASK

    def read(self, offset: int, size: int) -> bytes:
        """The counter's low bytes at offset 0; other offsets and sizes float high."""
        if offset == 0 and size in (1, 2, 4):
            return self.count().to_bytes(4, "little")[:size]
        return b"\xff" * max(size, 0)

    def write(self, offset: int, data: bytes) -> None:
        """The timer is read-only."""

    def save(self) -> PmTimerState:
        """Capture the current count."""
        return PmTimerState(self.count())

    def restore(self, state: PmTimerState) -> None:
        """Count on from a saved value."""
        if not isinstance(state, PmTimerState):
            raise DeviceError(f"pm-timer: cannot restore from {type(state).__name__}")
        if type(state.count) is not int or not 0 <= state.count <= _MASK:
            raise DeviceError(f"pm-timer state: count={state.count!r} is not a 32-bit value")
        self._base_ns = self._clock()
        self._base_count = state.count
