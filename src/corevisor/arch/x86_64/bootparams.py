"""Boot information handed to an x86 guest: the e820 map, PVH start_info, multiboot info.

A PVH or multiboot guest learns where its RAM is and what its command line says only
from the structures written here (at BOOT_INFO_ADDR, with the command line at
CMDLINE_ADDR); the builder puts the returned address in ebx. What does not live here:
register setup (cpu.py), the MP table (mptable.py), ACPI (acpi.py), parsing a bzImage
(loader/bzimage.py). The Linux zero page (struct boot_params, for a bzImage's 64-bit
entry) is written here too, in the same area, with rsi instead of ebx pointing at it.

Layouts follow Xen's public/arch-x86/hvm/start_info.h (version 1), the Multiboot
0.6.96 specification, section 3.3, and Linux's Documentation/arch/x86/zero-page.rst
and boot.rst.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from corevisor.arch.x86_64.layout import (
    BOOT_INFO_ADDR,
    BOOT_INFO_MAX,
    CMDLINE_ADDR,
    CMDLINE_MAX,
    EBDA_START,
    HIGH_MEMORY_START,
    MMIO_HOLE_END,
)
from corevisor.errors import ConfigError, LoaderError
from corevisor.memory import GuestMemory

E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class E820Entry:
    """One run of the BIOS-style memory map; type is E820_RAM or E820_RESERVED."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        """One past the last address of the run."""
        return self.addr + self.size


def e820_map(mem: GuestMemory, reserved: Sequence[tuple[int, int]] = ()) -> list[E820Entry]:
    """Describe guest RAM to the guest, hiding the low area the VMM's tables live in.

    The EBDA (where the MP table lives) up to 1 MiB is reported reserved so the guest
    never reuses it as RAM; the MMIO hole between the low region and 4 GiB is simply
    absent, but for the (address, size) ranges in reserved, which are listed reserved
    (the PCI ECAM window: Linux uses MCFG's window only if something reserves it).
    """
    if not mem.regions or mem.regions[0].gpa != 0:
        raise ConfigError("memory: guest RAM must start at guest-physical address 0")
    low_end = mem.regions[0].end
    if low_end < EBDA_START:
        raise ConfigError(f"memory: {low_end} bytes is too small (need at least {EBDA_START})")
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ]
    if low_end > HIGH_MEMORY_START:
        entries.append(E820Entry(HIGH_MEMORY_START, low_end - HIGH_MEMORY_START, E820_RAM))
    for region in mem.regions[1:]:
        if region.gpa >= MMIO_HOLE_END:
            entries.append(E820Entry(region.gpa, region.size, E820_RAM))
    entries += [E820Entry(addr, size, E820_RESERVED) for addr, size in reserved]
    return sorted(entries, key=lambda e: e.addr)


# --- command line -------------------------------------------------------------------------


def _check_cmdline(cmdline: bytes) -> None:
    """Reject command lines the guest would read differently from what the user wrote."""
    if len(cmdline) > CMDLINE_MAX - 1:
        raise LoaderError(
            f"kernel command line is {len(cmdline)} bytes; at most {CMDLINE_MAX - 1} fit"
        )
    if b"\0" in cmdline:
        raise LoaderError("kernel command line contains a NUL byte")


def _write_cstrings(mem: GuestMemory, strings: Sequence[bytes]) -> list[int]:
    """Pack NUL-terminated strings into the command-line area; return their addresses.

    The whole set must fit in CMDLINE_MAX bytes so nothing spills past the area the
    layout reserves for it.
    """
    addrs: list[int] = []
    offset = 0
    for s in strings:
        if b"\0" in s:
            raise LoaderError("module command line contains a NUL byte")
        if offset + len(s) + 1 > CMDLINE_MAX:
            raise LoaderError(f"command lines need more than {CMDLINE_MAX} bytes in total")
        mem.write(CMDLINE_ADDR + offset, s + b"\0")
        addrs.append(CMDLINE_ADDR + offset)
        offset += len(s) + 1
    return addrs


# --- PVH ----------------------------------------------------------------------------------

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1

# struct hvm_start_info (version 1): magic, version, flags, nr_modules, modlist_paddr,
# cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved.
_START_INFO = struct.Struct("<IIIIQQQQII")
# struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
_MODLIST_ENTRY = struct.Struct("<QQQQ")
# struct hvm_memmap_table_entry: addr, size, type, reserved.
_MEMMAP_ENTRY = struct.Struct("<QQII")
assert _START_INFO.size == 56 and _MODLIST_ENTRY.size == 32 and _MEMMAP_ENTRY.size == 24


def write_pvh_boot_info(
    mem: GuestMemory,
    cmdline: bytes,
    rsdp: int = 0,
    modules: Sequence[tuple[int, int, bytes]] = (),
    reserved: Sequence[tuple[int, int]] = (),
) -> int:
    """Write hvm_start_info, its memory map and module list; return its address (for ebx).

    modules are (gpa, size, cmdline) of images the caller already placed in RAM; their
    command lines are packed after the kernel's in the command-line area (an empty one
    is passed as address 0, as the ABI allows). The memory map is the e820 map, whose
    type numbers PVH shares.
    """
    _check_cmdline(cmdline)
    addrs = _write_cstrings(mem, [cmdline, *(m[2] for m in modules if m[2])])
    cmdline_addr, module_cmdlines = addrs[0], iter(addrs[1:])

    memmap = e820_map(mem, reserved)
    memmap_addr = BOOT_INFO_ADDR + _START_INFO.size
    modlist_addr = memmap_addr + len(memmap) * _MEMMAP_ENTRY.size
    end = modlist_addr + len(modules) * _MODLIST_ENTRY.size
    if end > BOOT_INFO_ADDR + BOOT_INFO_MAX:
        raise LoaderError(
            f"PVH boot information needs {end - BOOT_INFO_ADDR} bytes; at most {BOOT_INFO_MAX} fit"
        )

    mem.fill(BOOT_INFO_ADDR, BOOT_INFO_MAX, 0)
    mem.write(
        BOOT_INFO_ADDR,
        _START_INFO.pack(
            XEN_HVM_START_MAGIC_VALUE,
            HVM_START_INFO_VERSION,
            0,  # flags
            len(modules),
            modlist_addr if modules else 0,
            cmdline_addr,
            rsdp,
            memmap_addr,
            len(memmap),
            0,
        ),
    )
    for i, e in enumerate(memmap):
        mem.write(
            memmap_addr + i * _MEMMAP_ENTRY.size, _MEMMAP_ENTRY.pack(e.addr, e.size, e.type, 0)
        )
    for i, (gpa, size, mod_cmdline) in enumerate(modules):
        mod_cmdline_addr = next(module_cmdlines) if mod_cmdline else 0
        mem.write(
            modlist_addr + i * _MODLIST_ENTRY.size,
            _MODLIST_ENTRY.pack(gpa, size, mod_cmdline_addr, 0),
        )
    return BOOT_INFO_ADDR


# --- multiboot v1 -------------------------------------------------------------------------

MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_INFO_CMDLINE = 1 << 2
MULTIBOOT_INFO_MODS = 1 << 3
MULTIBOOT_INFO_MEM_MAP = 1 << 6
MULTIBOOT_INFO_BOOT_LOADER_NAME = 1 << 9
BOOT_LOADER_NAME = b"corevisor"

# The fixed part of struct multiboot_info up to and including the VBE fields (88 bytes);
# flags, mem_lower, mem_upper, cmdline, mods_count, mods_addr, mmap_length, mmap_addr
# and boot_loader_name are filled in.
MULTIBOOT_INFO_SIZE = 88
_MB_INFO_HEAD = struct.Struct("<IIIIIII")  # flags, mem_lower/upper, boot_device, cmdline, mods
_MB_MMAP_OFFSET = 44  # mmap_length, mmap_addr
_MB_MMAP = struct.Struct("<II")
_MB_BOOT_LOADER_NAME_OFFSET = 64
# A multiboot memory map entry: size (of the rest, 20), base_addr, length, type.
_MB_MMAP_ENTRY = struct.Struct("<IQQI")
# A module: mod_start, mod_end (one past the last byte), string, reserved.
_MB_MODULE = struct.Struct("<IIII")
assert _MB_MMAP_ENTRY.size == 24 and _MB_MODULE.size == 16


def write_multiboot_info(
    mem: GuestMemory,
    cmdline: bytes,
    modules: Sequence[tuple[int, int, bytes]] = (),
    reserved: Sequence[tuple[int, int]] = (),
) -> int:
    """Write a multiboot v1 info structure, memory map and module list; return its address.

    mem_lower counts the RAM below the EBDA and mem_upper the RAM from 1 MiB up to the
    first hole, both in KiB, as the spec defines them; the map and then the module list
    follow the info structure. modules are (gpa, size, string) of modules the caller
    placed (loader/modules.py); their strings, the command line and the boot loader
    name go to the command-line area. The caller loads eax with
    MULTIBOOT_BOOTLOADER_MAGIC and ebx with the address.
    """
    _check_cmdline(cmdline)
    addrs = _write_cstrings(mem, [cmdline, BOOT_LOADER_NAME, *(m[2] for m in modules)])
    cmdline_addr, name_addr, module_strings = addrs[0], addrs[1], addrs[2:]

    memmap = e820_map(mem, reserved)
    mmap_addr = BOOT_INFO_ADDR + MULTIBOOT_INFO_SIZE
    mmap_length = len(memmap) * _MB_MMAP_ENTRY.size
    mods_addr = mmap_addr + mmap_length
    if mods_addr + len(modules) * _MB_MODULE.size > BOOT_INFO_ADDR + BOOT_INFO_MAX:
        raise LoaderError(
            f"{len(modules)} multiboot modules do not fit in the boot information area"
        )

    low_end = mem.regions[0].end
    mem_lower = EBDA_START // 1024
    mem_upper = max(0, low_end - HIGH_MEMORY_START) // 1024
    flags = (
        MULTIBOOT_INFO_MEMORY
        | MULTIBOOT_INFO_CMDLINE
        | MULTIBOOT_INFO_MODS
        | MULTIBOOT_INFO_MEM_MAP
        | MULTIBOOT_INFO_BOOT_LOADER_NAME
    )

    mem.fill(BOOT_INFO_ADDR, BOOT_INFO_MAX, 0)
    head = _MB_INFO_HEAD.pack(
        flags, mem_lower, mem_upper, 0, cmdline_addr, len(modules), mods_addr if modules else 0
    )
    mem.write(BOOT_INFO_ADDR, head)
    mem.write(BOOT_INFO_ADDR + _MB_MMAP_OFFSET, _MB_MMAP.pack(mmap_length, mmap_addr))
    mem.write_u32(BOOT_INFO_ADDR + _MB_BOOT_LOADER_NAME_OFFSET, name_addr)
    for i, e in enumerate(memmap):
        entry = _MB_MMAP_ENTRY.pack(_MB_MMAP_ENTRY.size - 4, e.addr, e.size, e.type)
        mem.write(mmap_addr + i * _MB_MMAP_ENTRY.size, entry)
    for i, ((gpa, size, _), string) in enumerate(zip(modules, module_strings, strict=True)):
        mem.write(mods_addr + i * _MB_MODULE.size, _MB_MODULE.pack(gpa, gpa + size, string, 0))
    return BOOT_INFO_ADDR


# --- Linux zero page (struct boot_params) -------------------------------------------------

ZERO_PAGE_SIZE = 0x1000
# Offsets in struct boot_params (zero-page.rst); 0x1f1.. is the setup header (boot.rst).
_ZP_ACPI_RSDP_ADDR = 0x070
_ZP_EXT_RAMDISK_IMAGE = 0x0C0
_ZP_EXT_RAMDISK_SIZE = 0x0C4
_ZP_EXT_CMD_LINE_PTR = 0x0C8
_ZP_E820_ENTRIES = 0x1E8
_ZP_SETUP_HEADER = 0x1F1
_ZP_TYPE_OF_LOADER = 0x210
_ZP_RAMDISK_IMAGE = 0x218
_ZP_RAMDISK_SIZE = 0x21C
_ZP_CMD_LINE_PTR = 0x228
_ZP_CMDLINE_SIZE = 0x238
_ZP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
# "Undefined" boot loader id (boot.rst, type_of_loader): corevisor has no assigned one.
LOADER_TYPE_UNDEFINED = 0xFF
_ZP_E820_ENTRY = struct.Struct("<QQI")
assert _ZP_E820_ENTRY.size == 20
assert _ZP_E820_TABLE + E820_MAX_ENTRIES_ZEROPAGE * _ZP_E820_ENTRY.size <= ZERO_PAGE_SIZE
assert ZERO_PAGE_SIZE <= BOOT_INFO_MAX


def write_zero_page(
    mem: GuestMemory,
    setup_header: bytes,
    cmdline: bytes,
    rsdp: int = 0,
    initrd: tuple[int, int] | None = None,
    reserved: Sequence[tuple[int, int]] = (),
) -> int:
    """Write a bzImage's boot_params; return its address (for rsi at the 64-bit entry).

    The page starts as zeroes plus the image's own setup header, as boot.rst asks, and
    then gets what a boot loader fills in: type_of_loader, the command line pointer,
    the initrd (gpa, size), the e820 map and the RSDP (so the kernel need not scan
    for it). Zero fields mean "no information" to the kernel (no screen, no EDD, no
    EFI), which is what corevisor has to offer.
    """
    end = _ZP_SETUP_HEADER + len(setup_header)
    if len(setup_header) < _ZP_CMDLINE_SIZE + 4 - _ZP_SETUP_HEADER or end > ZERO_PAGE_SIZE:
        raise LoaderError(f"bzImage setup header is {len(setup_header)} bytes, which is bad")
    page = bytearray(ZERO_PAGE_SIZE)
    page[_ZP_SETUP_HEADER:end] = setup_header
    (cmdline_size,) = struct.unpack_from("<I", page, _ZP_CMDLINE_SIZE)
    if len(cmdline) > cmdline_size:
        raise LoaderError(
            f"kernel command line is {len(cmdline)} bytes; this kernel takes at most "
            f"{cmdline_size} (its cmdline_size)"
        )
    _check_cmdline(cmdline)
    (cmdline_addr,) = _write_cstrings(mem, [cmdline])

    memmap = e820_map(mem, reserved)
    if len(memmap) > E820_MAX_ENTRIES_ZEROPAGE:  # pragma: no cover - the map has <= 4
        raise LoaderError(f"e820 map has {len(memmap)} entries; the zero page holds 128")
    page[_ZP_E820_ENTRIES] = len(memmap)
    for i, e in enumerate(memmap):
        _ZP_E820_ENTRY.pack_into(
            page, _ZP_E820_TABLE + i * _ZP_E820_ENTRY.size, e.addr, e.size, e.type
        )

    page[_ZP_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    struct.pack_into("<I", page, _ZP_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, _ZP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        gpa, size = initrd
        struct.pack_into("<II", page, _ZP_RAMDISK_IMAGE, gpa & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<II", page, _ZP_EXT_RAMDISK_IMAGE, gpa >> 32, size >> 32)
    struct.pack_into("<Q", page, _ZP_ACPI_RSDP_ADDR, rsdp)
    mem.fill(BOOT_INFO_ADDR, BOOT_INFO_MAX, 0)
    mem.write(BOOT_INFO_ADDR, page)
    return BOOT_INFO_ADDR
