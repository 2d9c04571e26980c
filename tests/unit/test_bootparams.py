"""Tests for arch/x86_64/layout.py and bootparams.py: RAM slots, e820, PVH and multiboot info.

The structures are parsed back here with struct, following the C headers (Xen's
start_info.h, the multiboot spec), not with the builder's own definitions, so a layout
mistake in bootparams.py cannot cancel itself out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from corevisor.arch.x86_64 import layout
from corevisor.arch.x86_64.bootparams import (
    BOOT_LOADER_NAME,
    E820_RAM,
    E820_RESERVED,
    MULTIBOOT_BOOTLOADER_MAGIC,
    E820Entry,
    e820_map,
    write_multiboot_info,
    write_pvh_boot_info,
)
from corevisor.errors import LoaderError
from corevisor.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 64 * MiB)])
    yield m
    m.close()


def cstring(mem: GuestMemory, gpa: int) -> bytes:
    data = mem.read(gpa, 0x10000)
    return data[: data.index(b"\0")]


# --- layout ---------------------------------------------------------------------------------


def test_ram_layout_small_and_split_around_the_hole() -> None:
    assert layout.ram_layout(64 * MiB) == [(0, 64 * MiB)]
    assert layout.ram_layout(3 * GiB) == [(0, 3 * GiB)]
    assert layout.ram_layout(5 * GiB) == [(0, 3 * GiB), (4 * GiB, 2 * GiB)]


def test_layout_areas_do_not_overlap() -> None:
    areas = sorted(
        [
            (layout.BOOT_GDT_ADDR, layout.BOOT_IDT_ADDR),
            (layout.BOOT_IDT_ADDR, layout.BOOT_IDT_ADDR + 8),
            (layout.BOOT_INFO_ADDR, layout.BOOT_INFO_ADDR + layout.BOOT_INFO_MAX),
            (layout.PML4_ADDR, layout.PDPT_ADDR),
            (layout.PDPT_ADDR, layout.PD_ADDR),
            (layout.PD_ADDR, layout.PD_ADDR + 4 * 0x1000),
            (layout.CMDLINE_ADDR, layout.CMDLINE_ADDR + layout.CMDLINE_MAX),
            (layout.MPTABLE_ADDR, layout.BIOS_ROM_START),
        ]
    )
    for (_, a_end), (b_start, _) in zip(areas, areas[1:], strict=False):
        assert a_end <= b_start
    assert areas[-1][1] <= layout.HIGH_MEMORY_START


# --- e820 -----------------------------------------------------------------------------------


def test_e820_low_memory_only(mem: GuestMemory) -> None:
    assert e820_map(mem) == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        E820Entry(0x100000, 63 * MiB, E820_RAM),
    ]


def test_e820_with_ram_above_4g() -> None:
    m = GuestMemory.anonymous([(0, 64 * MiB), (4 * GiB, 16 * MiB)])
    try:
        entries = e820_map(m)
    finally:
        m.close()
    assert entries[-1] == E820Entry(4 * GiB, 16 * MiB, E820_RAM)
    assert len(entries) == 4
    for a, b in zip(entries, entries[1:], strict=False):
        assert a.end <= b.addr


# --- PVH ------------------------------------------------------------------------------------


def test_pvh_start_info(mem: GuestMemory) -> None:
    addr = write_pvh_boot_info(mem, b"console=ttyS0 quiet", rsdp=0xE0000)
    assert addr == layout.BOOT_INFO_ADDR
    # struct hvm_start_info, version 1 (56 bytes)
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries,
     reserved) = struct.unpack("<IIIIQQQQII", mem.read(addr, 56))  # fmt: skip
    assert (magic, version, flags, nr_modules, modlist) == (0x336EC578, 1, 0, 0, 0)
    assert rsdp == 0xE0000 and reserved == 0
    assert cmdline == layout.CMDLINE_ADDR
    assert cstring(mem, cmdline) == b"console=ttyS0 quiet"
    assert memmap == addr + 56
    table = [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24)) for i in range(memmap_entries)]
    assert table == [
        (0, 0x9FC00, 1, 0),
        (0x9FC00, 0x60400, 2, 0),
        (0x100000, 63 * MiB, 1, 0),
    ]


def test_pvh_modules(mem: GuestMemory) -> None:
    modules = [(0x800000, 0x1234, b"initrd"), (0x900000, 0x10, b"")]
    addr = write_pvh_boot_info(mem, b"root=/dev/ram0", modules=modules)
    nr_modules, modlist = struct.unpack_from("<IQ", mem.read(addr + 12, 12))
    assert nr_modules == 2
    first = struct.unpack("<QQQQ", mem.read(modlist, 32))
    second = struct.unpack("<QQQQ", mem.read(modlist + 32, 32))
    assert first[:2] == (0x800000, 0x1234) and first[3] == 0
    assert cstring(mem, first[2]) == b"initrd"
    assert second == (0x900000, 0x10, 0, 0)
    assert modlist + 64 <= layout.BOOT_INFO_ADDR + 0x2000


# --- multiboot ------------------------------------------------------------------------------


def test_multiboot_info(mem: GuestMemory) -> None:
    assert MULTIBOOT_BOOTLOADER_MAGIC == 0x2BADB002
    addr = write_multiboot_info(mem, b"hello from the host")
    assert addr == layout.BOOT_INFO_ADDR
    flags, mem_lower, mem_upper, _boot_device, cmdline = struct.unpack("<IIIII", mem.read(addr, 20))
    assert flags & 1 and flags & 4 and flags & 0x40
    assert mem_lower == 639 and mem_upper == 63 * 1024
    assert cstring(mem, cmdline) == b"hello from the host"
    mmap_length, mmap_addr = struct.unpack("<II", mem.read(addr + 44, 8))
    # Walk the map the way a multiboot kernel does: each entry's size excludes itself.
    entries = []
    p = mmap_addr
    while p < mmap_addr + mmap_length:
        size, base, length, kind = struct.unpack("<IQQI", mem.read(p, 24))
        assert size == 20
        entries.append((base, length, kind))
        p += size + 4
    assert p == mmap_addr + mmap_length
    assert entries == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 63 * MiB, 1)]


# --- command line limits --------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_pvh_boot_info, write_multiboot_info])
def test_longest_command_line_fits(mem: GuestMemory, writer: object) -> None:
    # multiboot's boot loader name shares the area with the command line
    name = len(BOOT_LOADER_NAME) + 1 if writer is write_multiboot_info else 0
    line = b"x" * (layout.CMDLINE_MAX - 1 - name)
    addr = writer(mem, line)  # type: ignore[operator]
    assert addr == layout.BOOT_INFO_ADDR
    assert mem.read(layout.CMDLINE_ADDR + len(line), 1) == b"\0"


@pytest.mark.parametrize("writer", [write_pvh_boot_info, write_multiboot_info])
def test_too_long_command_line(mem: GuestMemory, writer: object) -> None:
    too_long = rf"command line is {layout.CMDLINE_MAX} bytes; at most {layout.CMDLINE_MAX - 1} fit"
    with pytest.raises(LoaderError, match=too_long):
        writer(mem, b"x" * layout.CMDLINE_MAX)  # type: ignore[operator]


def test_command_line_with_nul(mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="NUL"):
        write_pvh_boot_info(mem, b"a\0b")
