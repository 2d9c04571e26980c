"""The ELF loader (PVH note, multiboot v1 header, a.out kludge; ELF32 and ELF64) on
arbitrary files: identified and loaded into 16 MiB of real guest RAM.

Allowed outcome besides a load: LoaderError. A load must say what it did truthfully:
the kind identify_image gave, an entry and a span inside guest RAM above 1 MiB.
"""

from __future__ import annotations

from pathlib import Path

from corevisor.arch.x86_64.layout import HIGH_MEMORY_START
from corevisor.errors import LoaderError
from corevisor.loader import elf, identify_image
from fuzz.common import guest_memory

RAM = 16 << 20
_NAME = Path("fuzz.elf")


def one_input(data: bytes) -> None:
    mem = guest_memory(RAM)
    try:
        kind = identify_image(data, str(_NAME))
    except LoaderError:
        return
    if kind == "bzimage":
        return  # the bzimage target's
    try:
        img = elf.load_image(mem, _NAME, data)
    except LoaderError:
        return
    assert img.kind == kind
    assert HIGH_MEMORY_START <= img.start <= img.end <= mem.size, img
    assert mem.contains(img.start, img.end - img.start), img
