"""Placing an initrd (initramfs archive) in guest RAM for a Linux kernel.

The initrd goes as high as it may, page-aligned: below the end of the RAM under the
MMIO hole (both boot protocols hand over 32-bit addresses by default) and, for a
bzImage, at or below its header's initrd_addr_max. High placement keeps it clear of
the kernel, which decompresses and allocates upwards from its load address; it must
not reach down into [image.start, image.end). The same rule (top of low RAM) is what
QEMU and Firecracker use.

What does not live here: telling the kernel where it is (bootparams.py: the zero
page's ramdisk_image/size, or a PVH module entry), or building the archive
(initramfs.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from corevisor import inputs
from corevisor.errors import LoaderError, show
from corevisor.loader.elf import LoadedImage
from corevisor.memory import GuestMemory

PAGE = 0x1000
# initrd_addr_max, as an offset into a bzImage's setup header (which starts at 0x1f1).
_INITRD_ADDR_MAX = 0x22C - 0x1F1


@dataclass(frozen=True)
class Initrd:
    """Where the initrd went: gpa and its size in bytes."""

    gpa: int
    size: int


def _limit(mem: GuestMemory, image: LoadedImage) -> int:
    """One past the highest byte the initrd may occupy."""
    limit = min(mem.regions[0].end, 1 << 32)
    if image.kind == "bzimage" and len(image.boot_header) >= _INITRD_ADDR_MAX + 4:
        (addr_max,) = struct.unpack_from("<I", image.boot_header, _INITRD_ADDR_MAX)
        limit = min(limit, addr_max + 1)
    return limit


def load_initrd(mem: GuestMemory, path: Path, image: LoadedImage) -> Initrd:
    """Copy the file at path below the image's initrd limit, above the image itself."""
    name = show(path)  # safe to print, whatever bytes the path holds
    if image.kind == "multiboot":
        raise LoaderError(
            f"{name}: an initrd needs a Linux kernel (bzImage or PVH vmlinux); "
            f"{image.path} is a multiboot image"
        )
    limit = _limit(mem, image)
    floor = (image.end + PAGE - 1) & ~(PAGE - 1)
    room = max(0, limit - floor)
    data = inputs.read_file(
        path,
        name,
        limit=room,
        why=f"that fit between the kernel (ends {image.end:#x}) and {limit:#x}; use more memory",
        error=LoaderError,
    )
    if not data:
        raise LoaderError(f"{name}: initrd is empty")
    gpa = (limit - len(data)) & ~(PAGE - 1)
    if gpa < floor:  # pragma: no cover - the bound above rules this out
        raise LoaderError(f"{name}: initrd does not fit above the kernel")
    mem.write(gpa, data)
    return Initrd(gpa, len(data))
