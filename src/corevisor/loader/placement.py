"""Where a loader may put bytes: in guest RAM, clear of what the VMM writes below 1 MiB.

One check for image segments and multiboot modules (a Linux initrd goes at the top of
RAM, above 1 MiB: initrd.py), so every refusal reads the same way and names both
ranges, e.g.::

    kernel.bin: multiboot load range (0x9000-0x9b000) overlaps the boot information
    (0x9a000-0x9c000)

What does not live here: the ranges themselves (layout.vmm_low_ranges, the one address
map), or deciding where a module goes (modules.py).
"""

from __future__ import annotations

from corevisor.arch.x86_64 import layout
from corevisor.errors import LoaderError
from corevisor.memory import GuestMemory


def size_text(n: int) -> str:
    """A byte count the way a user configured it (64 MiB, not 67108864)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def collision(start: int, end: int, long_mode: bool = False) -> tuple[int, int, str] | None:
    """The first VMM range that [start, end) overlaps, or None."""
    for low, high, what in layout.vmm_low_ranges(long_mode):
        if start < high and low < end:
            return low, high, what
    return None


def check_placement(
    mem: GuestMemory, name: str, label: str, start: int, end: int, long_mode: bool = False
) -> None:
    """Refuse [start, end) if it overlaps a VMM range or is not wholly in guest RAM."""
    where = f"{label} ({start:#x}-{end:#x})"
    hit = collision(start, end, long_mode)
    if hit is not None:
        low, high, what = hit
        raise LoaderError(f"{name}: {where} overlaps {what} ({low:#x}-{high:#x})")
    if not mem.contains(start, end - start):
        raise LoaderError(f"{name}: {where} does not fit in guest RAM ({size_text(mem.size)})")
