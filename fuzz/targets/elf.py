"""The ELF loader (PVH note, multiboot v1 header, a.out kludge; ELF32 and ELF64) on
arbitrary files: identified and loaded into 16 MiB of real guest RAM.

Allowed outcome besides a load: LoaderError. A load must say what it did truthfully:
the kind identify_image gave and a span inside guest RAM; an image may sit below 1 MiB
(loader/placement.py) but must never write over a range the VMM fills there, which is
checked by painting those ranges before the load and reading them back after it.
"""

from __future__ import annotations

from pathlib import Path

from corevisor.arch.x86_64 import layout
from corevisor.errors import LoaderError
from corevisor.loader import elf, identify_image
from fuzz.common import guest_memory

RAM = 16 << 20
_NAME = Path("fuzz.elf")
_PAINT = 0xA5


def one_input(data: bytes) -> None:
    mem = guest_memory(RAM)
    try:
        kind = identify_image(data, str(_NAME))
    except LoaderError:
        return
    if kind == "bzimage":
        return  # the bzimage target's
    vmm = layout.vmm_low_ranges(long_mode=False)  # what load_image checks
    for low, high, _ in vmm:
        mem.fill(low, high - low, _PAINT)
    try:
        img = elf.load_image(mem, _NAME, data)
    except LoaderError:
        return
    assert img.kind == kind
    assert 0 <= img.start <= img.end <= mem.size, img
    for low, high, what in vmm:
        assert mem.read(low, high - low) == bytes([_PAINT]) * (high - low), (img, what)
    assert mem.contains(img.start, img.end - img.start), img
