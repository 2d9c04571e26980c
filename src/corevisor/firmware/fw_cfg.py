"""The fw_cfg items a corevisor PC offers, built from its configuration and boot images.

Machine items (machine_items), as QEMU's PC sets them: SIGNATURE and ID come with the
device (devices/fw_cfg.py); NB_CPUS and MAX_CPUS (the APIC ID limit: APIC IDs are
0..cpus-1), RAM_SIZE (all of the guest's RAM), UUID (zeros, as QEMU without -uuid),
NOGRAPHIC = 1, BOOT_MENU = 0, BOOT_DEVICE = 'c' (QEMU's default first boot device),
IRQ0_OVERRIDE = 0 (KVM wires the PIT to IOAPIC pin 0, not 2: firmware building an MP
table or MADT must not add the usual override), the E820 table (arch key 0x8003: a
little-endian count, then the entries) and the files ``etc/e820`` (the entries: u64
address, u64 length, u32 type, packed, little-endian) and ``bootorder`` (newline-
separated firmware paths; empty until there are boot devices with an order).

Boot items (boot_items), for the images the machine was given, with QEMU's meaning
(hw/i386/x86-common.c, multiboot.c): where each piece went and, as DATA items, its
bytes, read from the file on demand (FileSlice) so a kernel or initrd is not held in
the VMM's heap:

* every image: KERNEL_ENTRY, KERNEL_ADDR, KERNEL_SIZE (the RAM it occupies),
  CMDLINE_ADDR, CMDLINE_SIZE (with the NUL) and CMDLINE_DATA;
* a bzImage also KERNEL_DATA (its protected-mode part) and SETUP_ADDR/SIZE/DATA (its
  setup sectors as in the file; SETUP_ADDR is the zero page, which corevisor builds
  from them); a PVH or multiboot image also SETUP_SIZE/DATA = the file's first
  8 KiB, as QEMU gives its PVH option ROM;
* a Linux initrd: INITRD_ADDR, INITRD_SIZE, INITRD_DATA.

What does not live here: the register logic and the file directory (devices/fw_cfg.py),
the e820 map itself (bootparams.py), where things are loaded (loader/).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

from corevisor import inputs
from corevisor.arch.x86_64 import layout
from corevisor.arch.x86_64.bootparams import E820Entry, e820_map
from corevisor.devices import fw_cfg as k
from corevisor.devices.fw_cfg import Item
from corevisor.errors import LoaderError, show
from corevisor.loader import Initrd, LoadedImage
from corevisor.memory import GuestMemory

__all__ = ["FileSlice", "machine_items", "machine_files", "boot_items"]

BOOT_DEVICE_DISK = ord("c")
_E820_ENTRY = struct.Struct("<QQI")
_HEADER_BYTES = 8192  # what QEMU passes as SETUP_DATA for a PVH or multiboot image


class FileSlice:
    """size bytes of a file from offset, read on demand through an fd opened now.

    Reading never raises: a file that shrank, or a read error, reads as zeros (the
    item's size was fixed when it was offered). close() releases the fd.
    """

    def __init__(self, path: Path, offset: int = 0, size: int | None = None) -> None:
        # Through inputs.py: the image or initrd named by the user, checked again on the
        # descriptor that is read (a FIFO swapped in since the config check cannot block).
        opened = inputs.open_file(path, show(path), error=LoaderError)
        self._fd = opened.fd
        total = opened.size
        self._offset = min(offset, total)
        self._size = total - self._offset if size is None else min(size, total - self._offset)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: slice, /) -> bytes:
        start, stop, _ = index.indices(self._size)
        n = max(0, stop - start)
        try:
            data = os.pread(self._fd, n, self._offset + start)
        except OSError:
            data = b""
        return data.ljust(n, b"\0")

    def close(self) -> None:
        os.close(self._fd)


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def machine_items(
    cpus: int, mem: GuestMemory, e820: Sequence[E820Entry] | None = None
) -> dict[int, Item]:
    """The fixed-key items describing the machine (see the module docstring); e820: the
    map to give (default: the one the boot protocols give, e820_map)."""
    entries = e820_map(mem) if e820 is None else e820
    table = _u32(len(entries)) + b"".join(
        _E820_ENTRY.pack(e.addr, e.size, e.type) for e in entries
    )
    return {
        k.FW_CFG_UUID: bytes(16),
        k.FW_CFG_RAM_SIZE: struct.pack("<Q", mem.size),
        k.FW_CFG_NOGRAPHIC: _u16(1),
        k.FW_CFG_NB_CPUS: _u16(cpus),
        k.FW_CFG_MAX_CPUS: _u16(cpus),
        k.FW_CFG_BOOT_DEVICE: _u16(BOOT_DEVICE_DISK),
        k.FW_CFG_BOOT_MENU: _u16(0),
        k.FW_CFG_IRQ0_OVERRIDE: _u32(0),
        k.FW_CFG_E820_TABLE: table,
    }


def machine_files(
    mem: GuestMemory, e820: Sequence[E820Entry] | None = None, bootorder: bytes = b""
) -> dict[str, Item]:
    """The named files describing the machine: etc/e820 and bootorder."""
    entries = e820_map(mem) if e820 is None else e820
    table = b"".join(_E820_ENTRY.pack(e.addr, e.size, e.type) for e in entries)
    return {"etc/e820": table, "bootorder": bootorder}


def boot_items(
    image: LoadedImage,
    cmdline: bytes,
    initrd: tuple[Initrd, Path] | None = None,
) -> tuple[dict[int, Item], list[FileSlice]]:
    """The kernel, command-line and initrd items, and the FileSlices to close later."""
    items: dict[int, Item] = {
        k.FW_CFG_KERNEL_ENTRY: _u32(image.entry),
        k.FW_CFG_KERNEL_ADDR: _u32(image.start),
        k.FW_CFG_KERNEL_SIZE: _u32(image.end - image.start),
        k.FW_CFG_CMDLINE_ADDR: _u32(layout.CMDLINE_ADDR),
        k.FW_CFG_CMDLINE_SIZE: _u32(len(cmdline) + 1),
        k.FW_CFG_CMDLINE_DATA: cmdline + b"\0",
    }
    opened: list[FileSlice] = []
    try:
        if image.kind == "bzimage":
            setup_size = ((image.boot_header[0] or 4) + 1) * 512  # setup_sects at 0x1f1
            setup = FileSlice(image.path, 0, setup_size)
            kernel = FileSlice(image.path, setup_size)
            opened += [setup, kernel]
            items[k.FW_CFG_KERNEL_DATA] = kernel
            items[k.FW_CFG_SETUP_ADDR] = _u32(layout.BOOT_INFO_ADDR)
            items[k.FW_CFG_SETUP_SIZE] = _u32(len(setup))
            items[k.FW_CFG_SETUP_DATA] = setup
        else:
            header = FileSlice(image.path, 0, _HEADER_BYTES)
            opened.append(header)
            items[k.FW_CFG_SETUP_SIZE] = _u32(len(header))
            items[k.FW_CFG_SETUP_DATA] = header
        if initrd is not None:
            placed, path = initrd
            data = FileSlice(path, 0, placed.size)
            opened.append(data)
            items[k.FW_CFG_INITRD_ADDR] = _u32(placed.gpa)
            items[k.FW_CFG_INITRD_SIZE] = _u32(placed.size)
            items[k.FW_CFG_INITRD_DATA] = data
    except OSError as e:
        for f in opened:
            f.close()
        raise LoaderError(f"{e.filename}: cannot reopen for fw_cfg: {e.strerror or e}") from e
    return items, opened
