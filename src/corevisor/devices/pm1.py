"""ACPI PM1a event and control blocks: what a non-hardware-reduced FADT must point at.

Offsets from the device base (layout.PM1A_EVT_PORT; the control block follows the
event block, as on QEMU's q35):

* 0-1 PM1_STS: status bits, write 1 to clear. No fixed event is ever raised here (no
  power button, no timer overflow, no wake), so it always reads 0.
* 2-3 PM1_EN: enable bits, plain storage (nothing they enable ever fires).
* 4-5 PM1_CNT: SCI_EN (bit 0) reads 1: the machine is always in ACPI mode, which is
  why the FADT has no SMI_CMD to switch modes. SLP_TYP (bits 10-12) is storage; writing
  SLP_EN (bit 13, reads 0) with SLP_TYP = SLP_TYP_S5 (the value the DSDT's _S5 gives)
  powers the machine off through on_poweroff. Other sleep states are not offered
  (no _S1.._S4 in the DSDT), so other SLP_TYP values do nothing.

Accesses of 1 or 2 bytes at any offset are served (ACPICA uses the FADT's widths;
firmware pokes bytes); anything else reads 0xFF and is ignored. The SCI is declared
in the FADT (layout.SCI_IRQ) but never raised: there is no event that would.

What does not live here: the PM timer (pm_timer.py), the FADT (acpi.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError

__all__ = ["Pm1", "Pm1State", "PM1_SIZE", "SLP_TYP_S5"]

PM1_SIZE = 6  # PM1_EVT_LEN 4 + PM1_CNT_LEN 2
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
SLP_TYP_S5 = 5
_EN = 1  # register index (16-bit registers: STS, EN, CNT)
_CNT = 2


@dataclass(frozen=True)
class Pm1State:
    """PM1_EN and the stored PM1_CNT bits (SLP_TYP)."""

    enable: int = 0
    control: int = 0


class Pm1:
    """PM1a event + control blocks (see the module docstring)."""

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._regs = [0, 0, 0]  # STS (always 0), EN, CNT without SCI_EN/SLP_EN

    def _value(self, index: int) -> int:
        return self._regs[index] | (SCI_EN if index == _CNT else 0)

    def read(self, offset: int, size: int) -> bytes:
        """The registers' bytes as a little-endian 6-byte file."""
        if size not in (1, 2) or not 0 <= offset <= PM1_SIZE - size:
            return b"\xff" * max(size, 0)
        raw = b"".join(self._value(i).to_bytes(2, "little") for i in range(3))
        return raw[offset : offset + size]

    def write(self, offset: int, data: bytes) -> None:
        """Merge the written bytes into each 16-bit register they touch, then act."""
        if len(data) not in (1, 2) or not 0 <= offset <= PM1_SIZE - len(data):
            return
        for i, byte in enumerate(data):
            index, shift = divmod(offset + i, 2)
            if index == _EN:
                self._regs[_EN] = self._regs[_EN] & ~(0xFF << 8 * shift) | byte << 8 * shift
            elif index == _CNT:
                self._write_control(byte << 8 * shift, 0xFF << 8 * shift)
            # index 0, PM1_STS: write-1-to-clear of bits that are never set

    def _write_control(self, value: int, mask: int) -> None:
        stored = self._regs[_CNT] & ~mask | value & mask & SLP_TYP_MASK
        self._regs[_CNT] = stored
        if value & mask & SLP_EN and stored >> SLP_TYP_SHIFT == SLP_TYP_S5:
            self._on_poweroff()

    def save(self) -> Pm1State:
        """Capture PM1_EN and PM1_CNT's stored bits."""
        return Pm1State(self._regs[_EN], self._regs[_CNT])

    def restore(self, state: Pm1State) -> None:
        """Load saved registers after checking them."""
        if not isinstance(state, Pm1State):
            raise DeviceError(f"pm1: cannot restore from {type(state).__name__}")
        if type(state.enable) is not int or not 0 <= state.enable <= 0xFFFF:
            raise DeviceError(f"pm1 state: enable={state.enable!r} is not a 16-bit value")
        if type(state.control) is not int or state.control & ~SLP_TYP_MASK:
            raise DeviceError(f"pm1 state: control={state.control!r} has bits PM1_CNT cannot hold")
        self._regs = [0, state.enable, state.control]
