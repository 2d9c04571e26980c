"""Tests for loader/bzimage.py, loader/initrd.py and the zero page (bootparams.py).

bzImages are assembled here field by field from boot.rst's setup header table (not
from the loader's own offsets), so each malformation is exactly the one named and a
wrong offset in the loader cannot cancel itself out. Debian's real kernel is exercised
in tests/kvm/test_linux.py.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from corevisor.arch.x86_64 import layout
from corevisor.arch.x86_64.bootparams import e820_map, write_zero_page
from corevisor.errors import LoaderError
from corevisor.loader import LoadedImage, identify_image, load_image, load_initrd
from corevisor.loader.bzimage import extract_vmlinux, parse_setup_header
from corevisor.memory import GuestMemory

MiB = 1 << 20
FAKE_ELF = b"\x7fELF" + bytes(range(256)) * 64


def make_bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    loadflags: int = 0x01,
    xloadflags: int = 0x01,
    relocatable: int = 1,
    pref_address: int = 0x100_0000,
    kernel_alignment: int = 0x20_0000,
    init_size: int = 0x80_0000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    payload: bytes = b"",
    boot_flag: int = 0xAA55,
    header_end: int = 0x268,
) -> bytes:
    """A bzImage: boot sector + setup (setup_sects sectors) + a protected-mode kernel.

    The kernel is 0x1000 bytes of marker text followed by the payload (the compressed
    vmlinux, as payload_offset/payload_length describe it).
    """
    setup = bytearray(((setup_sects or 4) + 1) * 512)  # 0 means 4 (boot.rst)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB  # jmp short: its displacement gives the header's length
    setup[0x201] = header_end - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, 0x1000, len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    kernel = (b"startup_32".ljust(0x200, b"\x90") + b"startup_64").ljust(0x1000, b"\xcc")
    return bytes(setup) + kernel + payload


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 64 * MiB)])
    yield m
    m.close()


def load(mem: GuestMemory, tmp_path: Path, data: bytes) -> LoadedImage:
    path = tmp_path / "bzImage"
    path.write_bytes(data)
    return load_image(mem, path)


# --- the setup header and placement ---------------------------------------------------------


def test_relocatable_kernel_goes_to_pref_address(mem: GuestMemory, tmp_path: Path) -> None:
    data = make_bzimage()
    image = load(mem, tmp_path, data)
    assert image.kind == "bzimage"
    assert (image.start, image.entry, image.end) == (0x100_0000, 0x100_0200, 0x180_0000)
    assert mem.read(0x100_0200, 10) == b"startup_64"
    assert mem.read(0x100_0000, 10) == b"startup_32"
    assert image.boot_header == data[0x1F1:0x268]
    assert identify_image(data, "k") == "bzimage"


def test_unaligned_pref_address_is_rounded_up_to_kernel_alignment(
    mem: GuestMemory, tmp_path: Path
) -> None:
    image = load(mem, tmp_path, make_bzimage(pref_address=0x110_0000))
    assert image.start == 0x120_0000


def test_non_relocatable_kernel_goes_to_1mib(mem: GuestMemory, tmp_path: Path) -> None:
    image = load(mem, tmp_path, make_bzimage(relocatable=0))
    assert (image.start, image.entry) == (0x10_0000, 0x10_0200)
    # it decompresses to pref_address by itself, so RAM up to there + init_size is needed
    assert image.end == 0x180_0000


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x7fELF" + bytes(0x300), 'not a Linux bzImage \\(no "HdrS"'),
        (bytes(0x100), "not a Linux bzImage"),
        (make_bzimage(version=0x020B), "boot protocol 2.11 is too old .*needs 2.12"),
        (make_bzimage(loadflags=0), "a zImage"),
        (make_bzimage(xloadflags=0), "no 64-bit entry point"),
        (make_bzimage(boot_flag=0x1234), "bad bzImage boot_flag 0x1234"),
        (make_bzimage(header_end=0x240), "setup header ends at 0x240"),
        (make_bzimage(kernel_alignment=0x30_0000), "not a power of 2"),
        (make_bzimage()[:0x800], "covers the whole file"),
    ],
)
def test_bad_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        parse_setup_header(data, "k")


def test_kernel_too_big_for_ram(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"kernel needs guest RAM up to 0x5000000 .*64 MiB"):
        load(mem, tmp_path, make_bzimage(init_size=0x400_0000))
    assert mem.read(0x100_0000, 16) == bytes(16)  # nothing half-loaded


def test_header_fields_are_parsed() -> None:
    hdr = parse_setup_header(make_bzimage(setup_sects=0, cmdline_size=255), "k")
    assert hdr.setup_sects == 4 and hdr.kernel_offset == 5 * 512  # 0 means 4
    assert hdr.cmdline_size == 255 and hdr.version_text == "2.15"
    assert hdr.initrd_addr_max == 0x7FFF_FFFF


# --- vmlinux extraction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "compress",
    [
        lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
        lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
        gzip.compress,
        bz2.compress,
    ],
    ids=["xz", "lzma", "gzip", "bzip2"],
)
def test_extract_vmlinux(compress: object) -> None:
    assert callable(compress)
    # the kernel build appends the uncompressed size; decompressors must ignore it
    payload = compress(FAKE_ELF) + struct.pack("<I", len(FAKE_ELF))
    assert extract_vmlinux(make_bzimage(payload=payload), "k") == FAKE_ELF


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "payload .* is outside the file"),
        (b"\x02\x21\x4c\x18" + bytes(8), "lz4-compressed"),
        (b"what is this", "unknown payload compression"),
        (gzip.compress(b"not an elf"), "not an ELF vmlinux"),
        (b"\xfd7zXZ\x00" + bytes(20), "corrupt compressed kernel"),
    ],
)
def test_extract_refuses(payload: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        extract_vmlinux(make_bzimage(payload=payload), "k")


# --- zero page ------------------------------------------------------------------------------


def test_zero_page(mem: GuestMemory) -> None:
    header = make_bzimage()[0x1F1:0x268]
    addr = write_zero_page(mem, header, b"console=ttyS0", rsdp=0xE0000, initrd=(0x300_0000, 4321))
    assert addr == layout.BOOT_INFO_ADDR
    zp = mem.read(addr, 4096)
    assert zp[0x1F1:0x210] == header[: 0x210 - 0x1F1]  # the image's own header...
    assert zp[0x22C:0x268] == header[0x22C - 0x1F1 :]  # ...around the fields we fill in
    assert zp[0x210] == 0xFF  # type_of_loader: undefined
    (cmd_line_ptr,) = struct.unpack_from("<I", zp, 0x228)
    assert mem.read(cmd_line_ptr, 14) == b"console=ttyS0\0"
    assert struct.unpack_from("<II", zp, 0x218) == (0x300_0000, 4321)
    assert struct.unpack_from("<III", zp, 0xC0) == (0, 0, 0)  # ext_ramdisk_*, ext_cmd_line_ptr
    assert struct.unpack_from("<Q", zp, 0x70) == (0xE0000,)
    entries = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]
    assert entries == [(e.addr, e.size, e.type) for e in e820_map(mem)]
    assert entries[-1] == (0x10_0000, 63 * MiB, 1)


def test_zero_page_cmdline_longer_than_cmdline_size(mem: GuestMemory) -> None:
    header = make_bzimage(cmdline_size=8)[0x1F1:0x268]
    with pytest.raises(LoaderError, match="10 bytes; this kernel takes at most 8"):
        write_zero_page(mem, header, b"0123456789")


# --- initrd ---------------------------------------------------------------------------------


def test_initrd_goes_to_top_of_ram(mem: GuestMemory, tmp_path: Path) -> None:
    image = load(mem, tmp_path, make_bzimage())
    rd = tmp_path / "initrd"
    rd.write_bytes(b"x" * 5000)
    initrd = load_initrd(mem, rd, image)
    assert initrd.size == 5000 and initrd.gpa == (64 * MiB - 5000) & ~0xFFF
    assert mem.read(initrd.gpa, 5000) == b"x" * 5000


def test_initrd_below_initrd_addr_max(mem: GuestMemory, tmp_path: Path) -> None:
    image = load(mem, tmp_path, make_bzimage(initrd_addr_max=0x1FF_FFFF))
    rd = tmp_path / "initrd"
    rd.write_bytes(b"y" * 100)
    assert load_initrd(mem, rd, image).gpa == 0x1FF_F000


def test_initrd_too_big(mem: GuestMemory, tmp_path: Path) -> None:
    image = load(mem, tmp_path, make_bzimage())
    rd = tmp_path / "initrd"
    rd.write_bytes(bytes(60 * MiB))
    with pytest.raises(LoaderError, match=r"initrd is 60M, more than the 40M that fit between"):
        load_initrd(mem, rd, image)


def test_initrd_refused_for_multiboot_and_missing(mem: GuestMemory, tmp_path: Path) -> None:
    mb = LoadedImage(tmp_path / "mb.elf", "multiboot", 0x100000, 0x100000, 0x101000)
    rd = tmp_path / "initrd"
    rd.write_bytes(b"z")
    with pytest.raises(LoaderError, match="mb.elf is a multiboot image"):
        load_initrd(mem, rd, mb)
    pvh = LoadedImage(tmp_path / "k", "pvh", 0x100000, 0x100000, 0x101000)
    with pytest.raises(LoaderError, match="missing does not exist"):
        load_initrd(mem, tmp_path / "missing", pvh)


# --- a vmlinux-shaped PVH ELF ----------------------------------------------------------------


def test_vmlinux_layout_loads_at_physical_addresses(mem: GuestMemory, tmp_path: Path) -> None:
    """Linux's vmlinux: p_vaddr in the kernel map (or 0 for .data..percpu), p_paddr physical."""
    from tests.unit.test_elf_loader import PT_LOAD, PT_NOTE, Seg, make_elf, xen_note

    text, percpu = b"T" * 0x100, b"P" * 0x80
    data = make_elf(
        [
            Seg(PT_LOAD, 0x100_0000, text, vaddr=0xFFFF_FFFF_8100_0000, memsz=0x1000),
            Seg(PT_LOAD, 0x100_1000, percpu, vaddr=0, memsz=0x2000),
            Seg(PT_NOTE, 0, xen_note(0x100_0040)),
        ],
        entry=0x100_0000,
    )
    image = load(mem, tmp_path, data)
    assert (image.kind, image.entry, image.start, image.end) == (
        "pvh", 0x100_0040, 0x100_0000, 0x100_3000,
    )
    assert mem.read(0x100_0000, 0x100) == text
    assert mem.read(0x100_1000, 0x80) == percpu
    assert mem.read(0x100_1080, 0x10) == bytes(0x10)  # bss cleared
