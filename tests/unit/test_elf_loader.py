"""Tests for loader/elf.py: PVH and multiboot detection, loading, and refusing bad images.

Fixtures come from two places: ELF images assembled byte by byte here (so each
malformation is exactly the one named), and images built from assembly with the host's
gcc and ld (so the parser also meets what a real toolchain emits).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corevisor.errors import LoaderError
from corevisor.loader import LoadedImage, identify_image, load_image
from corevisor.memory import GuestMemory

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]

# --- a small ELF assembler ------------------------------------------------------------------

PT_LOAD, PT_NOTE = 1, 4
EHDR = {32: struct.Struct("<16sHHIIIIIHHHHHH"), 64: struct.Struct("<16sHHIQQQIHHHHHH")}
PHDR = {32: struct.Struct("<IIIIIIII"), 64: struct.Struct("<IIQQQQQQ")}
MACHINE = {32: 3, 64: 62}


@dataclass
class Seg:
    """One program header plus the file bytes it covers."""

    type: int
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None
    align: int = 4


def make_elf(
    segs: list[Seg],
    *,
    bits: int = 64,
    entry: int = 0x100000,
    machine: int | None = None,
    e_type: int = 2,
    ei_data: int = 1,
) -> bytes:
    """Assemble an ELF image: header, program headers, then each segment's bytes (8-aligned)."""
    ehdr, phdr = EHDR[bits], PHDR[bits]
    phoff = ehdr.size
    data_start = phoff + len(segs) * phdr.size
    body = bytearray()
    table = bytearray()
    for s in segs:
        body += bytes(-(data_start + len(body)) % 8)
        off = data_start + len(body)
        memsz = len(s.data) if s.memsz is None else s.memsz
        vaddr = s.paddr if s.vaddr is None else s.vaddr
        if bits == 32:
            table += phdr.pack(s.type, off, vaddr, s.paddr, len(s.data), memsz, 5, s.align)
        else:
            table += phdr.pack(s.type, 5, off, vaddr, s.paddr, len(s.data), memsz, s.align)
        body += s.data
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, ei_data, 1]) + bytes(9)
    head = ehdr.pack(
        ident,
        e_type,
        MACHINE[bits] if machine is None else machine,
        1,
        entry,
        phoff,
        0,
        0,
        ehdr.size,
        phdr.size,
        len(segs),
        0,
        0,
        0,
    )
    return head + bytes(table) + bytes(body)


def xen_note(entry: int, descsz: int = 4, ntype: int = 18) -> bytes:
    desc = entry.to_bytes(descsz, "little")
    return struct.pack("<III", 4, descsz, ntype) + b"Xen\0" + desc + bytes(-descsz % 4)


def mb_header(flags: int = 0x3, kludge: tuple[int, int, int, int, int] | None = None) -> bytes:
    """A multiboot v1 header; kludge = (header, load, load_end, bss_end, entry) addresses."""
    if kludge is not None:
        flags |= 1 << 16
    head = struct.pack("<III", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF)
    return head + (struct.pack("<5I", *kludge) if kludge else b"")


CODE = bytes(range(1, 33))  # 32 recognisable non-zero bytes


def pvh64(entry: int = 0x100010, descsz: int = 4) -> bytes:
    return make_elf(
        [Seg(PT_NOTE, 0, xen_note(entry, descsz)), Seg(PT_LOAD, 0x100000, CODE, memsz=0x2000)]
    )


def multiboot32() -> bytes:
    return make_elf([Seg(PT_LOAD, 0x200000, mb_header() + CODE, memsz=0x1000)], bits=32,
                    entry=0x20000C)  # fmt: skip


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 4 * MiB)])
    m.fill(0, 4 * MiB, 0xAA)  # so a missing bss clear shows
    yield m
    m.close()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- happy paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("descsz", [4, 8])
def test_pvh_note_found_and_loaded(
    mem: GuestMemory, tmp_path: Path, bits: int, descsz: int
) -> None:
    data = make_elf(
        [
            Seg(PT_NOTE, 0, xen_note(0x100010, descsz)),
            Seg(PT_LOAD, 0x100000, CODE, memsz=0x2000),
        ],
        bits=bits,
    )
    assert identify_image(data, "k") == "pvh"
    path = write(tmp_path, "k.elf", data)
    img = load_image(mem, path)
    assert img == LoadedImage(path, "pvh", 0x100010, 0x100000, 0x102000)
    assert mem.read(0x100000, len(CODE)) == CODE
    assert mem.read(0x100000 + len(CODE), 0x2000 - len(CODE)) == bytes(0x2000 - len(CODE))
    assert mem.read(0x102000, 4) == b"\xaa" * 4  # nothing past memsz is touched
    assert mem.read(0xFFFFC, 4) == b"\xaa" * 4


def test_pvh_note_among_other_notes_and_8_aligned_segment(mem: GuestMemory) -> None:
    other = struct.pack("<III", 4, 16, 5) + b"GNU\0" + bytes(16)
    data = make_elf(
        [
            Seg(PT_NOTE, 0, other + xen_note(0x100000, 8), align=8),
            Seg(PT_LOAD, 0x100000, CODE),
        ]
    )
    assert identify_image(data, "k") == "pvh"


def test_multiboot_elf32(mem: GuestMemory, tmp_path: Path) -> None:
    data = multiboot32()
    assert identify_image(data, "mb") == "multiboot"
    img = load_image(mem, write(tmp_path, "mb.elf", data))
    assert (img.kind, img.entry, img.start, img.end) == ("multiboot", 0x20000C, 0x200000, 0x201000)
    assert mem.read(0x200000, 12 + len(CODE)) == mb_header() + CODE
    assert mem.read(0x200000 + 12 + len(CODE), 16) == bytes(16)


def test_multiboot_entry_is_translated_from_virtual(mem: GuestMemory, tmp_path: Path) -> None:
    """Kernels linked high have a virtual e_entry; GRUB (and we) map it through p_vaddr."""
    seg = Seg(PT_LOAD, 0x200000, mb_header() + CODE, vaddr=0xC0200000)
    data = make_elf([seg], bits=32, entry=0xC0200010)
    assert load_image(mem, write(tmp_path, "high.elf", data)).entry == 0x200010


def test_multiboot_aout_kludge_raw_binary(mem: GuestMemory, tmp_path: Path) -> None:
    """A flat binary is bootable through the kludge: load_addr is the file's first byte."""
    header = mb_header(kludge=(0x300000, 0x300000, 0x300000 + 32 + 16, 0x302000, 0x300020))
    data = header + bytes(32 - len(header)) + b"\xf4" * 16 + b"trailing junk"
    assert identify_image(data, "flat.bin") == "multiboot"
    img = load_image(mem, write(tmp_path, "flat.bin", data))
    assert (img.kind, img.entry, img.start, img.end) == ("multiboot", 0x300020, 0x300000, 0x302000)
    assert mem.read(0x300000, 48) == data[:48]
    assert mem.read(0x300030, 0x2000 - 48) == bytes(0x2000 - 48)


def test_pvh_wins_over_multiboot(mem: GuestMemory) -> None:
    data = make_elf(
        [Seg(PT_NOTE, 0, xen_note(0x100000)), Seg(PT_LOAD, 0x100000, mb_header() + CODE)]
    )
    assert identify_image(data, "both") == "pvh"


# --- malformed images -----------------------------------------------------------------------

GOOD = pvh64()
PH1 = 64 + 56  # offset of the PT_LOAD program header in GOOD


BAD_IMAGES: list[tuple[str, bytes, str]] = [
    ("empty", b"", r"not an ELF image \(file is only 0 bytes\)"),
    ("bad magic", b"MZ" + bytes(100), r"not an ELF image \(bad magic\)"),
    ("truncated ident", GOOD[:10], r"truncated ELF header"),
    ("truncated header", GOOD[:40], r"truncated ELF64 header \(40 of 64 bytes\)"),
    ("bad class", patch(GOOD, 4, "B", 3), r"unknown ELF class 3"),
    ("big endian", patch(GOOD, 5, "B", 2), r"not little-endian"),
    ("wrong machine", patch(GOOD, 18, "<H", 183), r"ELF64 image is for AArch64, not x86-64"),
    ("x86-64 in ELF32", make_elf([Seg(PT_LOAD, 0x100000, CODE)], bits=32, machine=62),
     r"ELF32 image is for x86-64, not i386"),
    ("relocatable", patch(GOOD, 16, "<H", 1), r"not an executable \(relocatable\)"),
    ("no phdrs", patch(GOOD, 56, "<H", 0), r"has no program headers"),
    ("bad phentsize", patch(GOOD, 54, "<H", 32), r"program header size is 32, not 56"),
    ("phdrs past EOF", patch(GOOD, 32, "<Q", len(GOOD) - 10),
     r"program header table \(0x[0-9a-f]+-0x[0-9a-f]+\) is past the end of the file"),
    ("segment past EOF", patch(GOOD, PH1 + 32, "<Q", 0x10000),
     r"segment 1 file range \(0x[0-9a-f]+-0x[0-9a-f]+\) is past the end of the file"),
    ("filesz > memsz", patch(GOOD, PH1 + 40, "<Q", 4), r"segment 1 has more file bytes"),
    ("paddr wraps", patch(patch(GOOD, PH1 + 24, "<Q", 2**64 - 0x1000), PH1 + 40, "<Q", 0x2000),
     r"segment 1 physical range .* wraps around the 64-bit address space"),
    ("ELF32 paddr wraps", make_elf([Seg(PT_LOAD, 0xFFFFF000, CODE, memsz=0x2000)], bits=32),
     r"segment 0 physical range .* wraps around the 32-bit address space"),
    ("no entry note", make_elf([Seg(PT_LOAD, 0x100000, CODE)]),
     r"ELF64 image has neither a PVH entry note nor a multiboot header"),
    ("other Xen note only", make_elf([Seg(PT_NOTE, 0, xen_note(0x100000, ntype=6)),
                                      Seg(PT_LOAD, 0x100000, CODE)]),
     r"neither a PVH entry note nor a multiboot header"),
    ("PVH entry outside", pvh64(entry=0x500000),
     r"PVH entry 0x500000 is not inside any loaded segment"),
    ("PVH note odd size", make_elf([Seg(PT_NOTE, 0, xen_note(0x1000, 2)),
                                    Seg(PT_LOAD, 0x100000, CODE)]),
     r"PVH entry note has a 2-byte value \(expected 4 or 8\)"),
    ("PVH entry above 4G", pvh64(entry=0x1_0000_0000, descsz=8), r"PVH entry .* is above 4 GiB"),
    ("truncated note", make_elf([Seg(PT_NOTE, 0, xen_note(0x100000)[:8]),
                                 Seg(PT_LOAD, 0x100000, CODE)]),
     r"truncated note header in segment 0"),
    ("note past segment", make_elf([Seg(PT_NOTE, 0, xen_note(0x100000)[:18]),
                                    Seg(PT_LOAD, 0x100000, CODE)]),
     r"note at offset 0x0 in segment 0 runs past the end of the segment"),
    ("overlapping segments", make_elf([Seg(PT_NOTE, 0, xen_note(0x100000)),
                                       Seg(PT_LOAD, 0x100000, CODE, memsz=0x1000),
                                       Seg(PT_LOAD, 0x100800, CODE)]),
     r"segment 1 \(0x100000-0x101000\) overlaps segment 2 \(0x100800-0x100820\)"),
    ("only empty segments", make_elf([Seg(PT_LOAD, 0x100000, b"")]),
     r"has no loadable segments"),
    ("multiboot wants video", make_elf([Seg(PT_LOAD, 0x100000, mb_header(flags=0x7))], bits=32),
     r"multiboot header requests a video mode"),
    ("multiboot unknown flag", make_elf([Seg(PT_LOAD, 0x100000, mb_header(flags=0x10))],
                                        bits=32),
     r"multiboot header requires unknown features \(flags 0x10\)"),
    ("multiboot entry outside", make_elf([Seg(PT_LOAD, 0x100000, mb_header())], bits=32,
                                         entry=0x400000),
     r"entry point 0x400000 is not inside any loaded segment"),
    ("flat binary without kludge", mb_header() + bytes(64),
     r"not an ELF image \(bad magic\), and its multiboot header has no load addresses"),
    ("kludge load_end past EOF", mb_header(kludge=(0x100000, 0x100000, 0x110000, 0, 0x100000)),
     r"multiboot load range \(0x100000-0x110000\) needs 65536 bytes of file"),
    ("kludge load before file", mb_header(kludge=(0x100000, 0xF0000, 0, 0, 0x100000)),
     r"multiboot load_addr 0xf0000 lies before the start of the file"),
    ("kludge entry outside", mb_header(kludge=(0x100000, 0x100000, 0, 0x101000, 0x200000)),
     r"multiboot entry_addr 0x200000 is outside the loaded range"),
    ("kludge bss before data", mb_header(kludge=(0x100000, 0x100000, 0x100020, 0x100010,
                                                 0x100000)),
     r"multiboot bss_end_addr 0x100010 is below the end of the loaded data"),
]  # fmt: skip


@pytest.mark.parametrize("data,message", [(d, m) for _, d, m in BAD_IMAGES],
                         ids=[i for i, _, _ in BAD_IMAGES])  # fmt: skip
def test_malformed_images_are_refused_with_one_line(data: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=r"^bad\.img: .*" + message) as exc:
        identify_image(data, "bad.img")
    assert "\n" not in str(exc.value)


def test_good_fixture_is_good() -> None:
    """Guards the malformed table above: each case differs from a valid image by one field."""
    assert identify_image(GOOD, "good") == "pvh"
    assert identify_image(multiboot32(), "good") == "multiboot"


# --- placement in guest RAM -----------------------------------------------------------------


def test_segment_that_does_not_fit_in_ram(tmp_path: Path) -> None:
    data = make_elf(
        [Seg(PT_NOTE, 0, xen_note(0x100000)), Seg(PT_LOAD, 0x100000, CODE, memsz=0x4000000)]
    )
    path = write(tmp_path, "hello.elf", data)
    m = GuestMemory.anonymous([(0, 64 * MiB)])
    try:
        with pytest.raises(LoaderError) as exc:
            load_image(m, path)
    finally:
        m.close()
    assert str(exc.value) == (
        f"{path}: segment 1 (0x100000-0x4100000) does not fit in guest RAM (64 MiB)"
    )


def test_segment_below_1mib_loads_where_nothing_of_the_vmm_is(
    mem: GuestMemory, tmp_path: Path
) -> None:
    data = make_elf([Seg(PT_NOTE, 0, xen_note(0x8000)), Seg(PT_LOAD, 0x8000, CODE)])
    image = load_image(mem, write(tmp_path, "low.elf", data))
    assert (image.start, image.end, image.entry) == (0x8000, 0x8020, 0x8000)
    assert mem.read(0x8000, 32) == CODE


@pytest.mark.parametrize(
    ("gpa", "what"),
    [
        (0x9B000, r"the boot information \(0x9a000-0x9c000\)"),
        (0x9C010, r"the command lines \(0x9c000-0x9fc00\)"),
        (0x520, r"the boot GDT and IDT \(0x500-0x530\)"),
        (0xE0000, r"the EBDA, VGA hole, ACPI tables and BIOS area \(0x9fc00-0x100000\)"),
    ],
)
def test_segment_over_what_the_vmm_writes_is_refused_naming_both(
    mem: GuestMemory, tmp_path: Path, gpa: int, what: str
) -> None:
    data = make_elf([Seg(PT_NOTE, 0, xen_note(gpa)), Seg(PT_LOAD, gpa, CODE)])
    where = rf"segment 1 \({gpa:#x}-{gpa + 32:#x}\) overlaps {what}"
    with pytest.raises(LoaderError, match=where):
        load_image(mem, write(tmp_path, "low.elf", data))
    assert mem.read(gpa, 32) == b"\xaa" * 32


def test_failed_load_writes_nothing(mem: GuestMemory, tmp_path: Path) -> None:
    data = make_elf(
        [
            Seg(PT_NOTE, 0, xen_note(0x100000)),
            Seg(PT_LOAD, 0x100000, CODE),
            Seg(PT_LOAD, 0x3FF000, CODE, memsz=0x2000),  # runs past the end of the 4 MiB
        ]
    )
    with pytest.raises(LoaderError, match=r"segment 2 \(0x3ff000-0x401000\) does not fit"):
        load_image(mem, write(tmp_path, "partial.elf", data))
    assert mem.read(0x100000, 32) == b"\xaa" * 32


def test_unreadable_file(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"missing\.elf does not exist"):
        load_image(mem, tmp_path / "missing.elf")


# --- fuzzing --------------------------------------------------------------------------------

FLAT = mb_header(kludge=(0x300000, 0x300000, 0x300030, 0x302000, 0x300020)) + bytes(80)
SEEDS = [GOOD, multiboot32(), pvh64(descsz=8), FLAT]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    # Bias mutations towards the headers, where they change the parse.
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([63, 200, 10_000])))))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images())
def test_mutated_images_raise_only_loader_error(data: bytes) -> None:
    try:
        identify_image(data, "fuzz.elf")
    except LoaderError as e:
        assert "\n" not in str(e)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.elf"
        path.write_bytes(data)
        m = GuestMemory.anonymous([(0, 4 * MiB)])
        try:
            img = load_image(m, path)
            assert 0x100000 <= img.start < img.end <= 4 * MiB
        except LoaderError:
            pass
        finally:
            m.close()


# --- images built by the host toolchain -----------------------------------------------------

LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
  . = 0x100000;
  .boot : { *(.multiboot) *(.note.Xen) }
  .text : { *(.text) }
  .data : { *(.data) }
  .bss : { *(.bss) }
}
"""

PVH_ASM = """
    .pushsection .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
    .popsection

    .text
    .code32
    .globl _start, pvh_start
_start:
pvh_start:
    cli
1:  hlt
    jmp 1b

    .data
    .globl marker
marker: .ascii "corevisor-pvh-marker"

    .bss
    .globl scratch
scratch: .skip 8192
"""

MULTIBOOT_ASM = """
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 0x00000003)

    .text
    .code32
    .globl _start
_start:
    cli
1:  hlt
    jmp 1b

    .data
    .globl marker
marker: .ascii "corevisor-multiboot-marker"

    .bss
    .globl scratch
scratch: .skip 8192
"""


def _build(tmp_path: Path, source: str, bits: int) -> tuple[Path, dict[str, int]]:
    """Assemble and link source; return the image and its symbol table (from nm)."""
    if not all(shutil.which(t) for t in ("gcc", "ld", "nm")):
        pytest.skip("needs gcc, ld and nm from the host toolchain")
    (tmp_path / "img.S").write_text(source)
    (tmp_path / "img.ld").write_text(LINKER_SCRIPT)
    obj, out = tmp_path / "img.o", tmp_path / f"img{bits}.elf"
    emul = "elf_i386" if bits == 32 else "elf_x86_64"
    subprocess.run(["gcc", f"-m{bits}", "-c", str(tmp_path / "img.S"), "-o", str(obj)],
                   check=True)  # fmt: skip
    subprocess.run(["ld", "-m", emul, "-static", "-T", str(tmp_path / "img.ld"), str(obj),
                    "-o", str(out)], check=True)  # fmt: skip
    nm = subprocess.run(["nm", str(out)], check=True, capture_output=True, text=True).stdout
    symbols = {}
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return out, symbols


@pytest.mark.parametrize("bits", [32, 64])
def test_toolchain_pvh_image(mem: GuestMemory, tmp_path: Path, bits: int) -> None:
    path, sym = _build(tmp_path, PVH_ASM, bits)
    assert identify_image(path.read_bytes(), path.name) == "pvh"
    img = load_image(mem, path)
    assert img.kind == "pvh" and img.entry == sym["pvh_start"]
    assert img.start == 0x100000 and img.end >= sym["scratch"] + 8192
    assert mem.read(sym["marker"], 20) == b"corevisor-pvh-marker"
    assert mem.read(sym["scratch"], 8192) == bytes(8192)


def test_toolchain_multiboot_image(mem: GuestMemory, tmp_path: Path) -> None:
    path, sym = _build(tmp_path, MULTIBOOT_ASM, 32)
    assert identify_image(path.read_bytes(), path.name) == "multiboot"
    img = load_image(mem, path)
    assert img.kind == "multiboot" and img.entry == sym["_start"]
    assert mem.read(0x100000, 4) == struct.pack("<I", 0x1BADB002)
    assert mem.read(sym["marker"], 26) == b"corevisor-multiboot-marker"
    assert mem.read(sym["scratch"], 8192) == bytes(8192)


# --- the bundled guests ---------------------------------------------------------------------


@pytest.mark.parametrize("name,kind", [("hello.elf", "pvh"), ("hello-mb.elf", "multiboot")])
def test_bundled_guests_are_identified(name: str, kind: str) -> None:
    path = REPO / "guests" / "build" / name
    if not path.exists():
        pytest.skip(f"guests/build/{name} is not built (run `make -C guests`)")
    assert identify_image(path.read_bytes(), name) == kind
    m = GuestMemory.anonymous([(0, 64 * MiB)])
    try:
        img = load_image(m, path)
    finally:
        m.close()
    assert img.kind == kind and img.start >= 0x100000
