"""Loading ELF and multiboot guest images into guest RAM.

Two boot protocols are recognised, in this order:

* **PVH**: an ELF32/ELF64 x86 image carrying a Xen ELF note of type
  XEN_ELFNOTE_PHYS32_ENTRY, whose descriptor is the 32-bit protected-mode entry point.
* **Multiboot v1**: a multiboot header in the first 8 KiB of the file. With flag 16
  (the "a.out kludge") the header's own address fields say what to load where, so the
  file need not be ELF at all; otherwise the file must be ELF and its PT_LOAD segments
  are loaded.

Everything is parsed and checked before a single byte is written, and every problem is
a LoaderError naming the file, so a corrupt or hostile image can neither crash the VMM
nor half-load. Segments are placed at their physical addresses (p_paddr) and must lie
in guest RAM, clear of the few ranges below 1 MiB the VMM writes (placement.py): an
image linked low loads where it was linked.

What does not live here: register setup (the builder and cpu.py), boot information
(arch/x86_64/bootparams.py), bzImage (bzimage.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corevisor.errors import GuestMemoryError, LoaderError, show
from corevisor.loader.placement import check_placement
from corevisor.memory import GuestMemory

ImageKind = Literal["pvh", "multiboot", "bzimage"]

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
ET_DYN = 3
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF

XEN_ELFNOTE_PHYS32_ENTRY = 18

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_PAGE_ALIGN = 1 << 0
MULTIBOOT_MEMORY_INFO = 1 << 1
MULTIBOOT_VIDEO_MODE = 1 << 2
MULTIBOOT_AOUT_KLUDGE = 1 << 16

_E_TYPES = {0: "none", 1: "relocatable", 2: "executable", 3: "shared object", 4: "core"}
_MACHINES = {
    3: "i386",
    8: "MIPS",
    20: "PowerPC",
    40: "ARM",
    62: "x86-64",
    183: "AArch64",
    243: "RISC-V",
}


@dataclass(frozen=True)
class _ElfClass:
    """The layout differences between ELF32 and ELF64, so one parser serves both."""

    name: str
    machine: int
    ehdr: struct.Struct  # e_type .. e_shstrndx (after e_ident)
    phdr: struct.Struct
    addr_limit: int  # addresses are this many bits wide; beyond it they wrap


_ELF32 = _ElfClass(
    "ELF32", EM_386, struct.Struct("<HHIIIIIHHHHHH"), struct.Struct("<IIIIIIII"), 1 << 32
)
_ELF64 = _ElfClass(
    "ELF64", EM_X86_64, struct.Struct("<HHIQQQIHHHHHH"), struct.Struct("<IIQQQQQQ"), 1 << 64
)
assert _ELF32.ehdr.size + 16 == 52 and _ELF32.phdr.size == 32
assert _ELF64.ehdr.size + 16 == 64 and _ELF64.phdr.size == 56


@dataclass(frozen=True)
class _Phdr:
    """One program header, class-independent."""

    index: int
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class _Elf:
    cls: _ElfClass
    entry: int
    phdrs: list[_Phdr]


@dataclass(frozen=True)
class _Segment:
    """A run of guest RAM to fill: filesz bytes from the file, then zeros up to memsz."""

    label: str  # for messages: "segment 1", "multiboot load range"
    gpa: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


@dataclass(frozen=True)
class _Plan:
    """Everything load_image needs, fully validated against the file (not yet the RAM)."""

    kind: ImageKind
    entry: int
    segments: list[_Segment]


@dataclass(frozen=True)
class LoadedImage:
    """Where an image went: the builder turns this into registers and boot info.

    start is the lowest loaded guest-physical address and end is one past the highest
    (bss included), so [start, end) is the RAM the image occupies. boot_header is a
    bzImage's setup header (bzimage.py), which its zero page starts from; empty for ELF.
    """

    path: Path
    kind: ImageKind
    entry: int
    start: int
    end: int
    boot_header: bytes = b""


# --- ELF ----------------------------------------------------------------------------------


def _parse_elf(data: bytes, name: str) -> _Elf:
    """Parse and check the ELF header and program headers of an x86 image."""
    if len(data) < 16:
        raise LoaderError(f"{name}: truncated ELF header ({len(data)} bytes)")
    ei_class, ei_data, ei_version = data[4], data[5], data[6]
    if ei_class == ELFCLASS32:
        cls = _ELF32
    elif ei_class == ELFCLASS64:
        cls = _ELF64
    else:
        raise LoaderError(f"{name}: unknown ELF class {ei_class}")
    if ei_data != ELFDATA2LSB:
        raise LoaderError(f"{name}: {cls.name} image is not little-endian (EI_DATA {ei_data})")
    if ei_version != EV_CURRENT:
        raise LoaderError(f"{name}: unknown ELF version {ei_version}")
    need = 16 + cls.ehdr.size
    if len(data) < need:
        raise LoaderError(f"{name}: truncated {cls.name} header ({len(data)} of {need} bytes)")
    (
        e_type,
        e_machine,
        e_version,
        e_entry,
        e_phoff,
        _shoff,
        _flags,
        _ehsize,
        e_phentsize,
        e_phnum,
        _shentsize,
        _shnum,
        _shstrndx,
    ) = cls.ehdr.unpack_from(data, 16)
    if e_machine != cls.machine:
        arch = _MACHINES.get(e_machine, f"machine {e_machine}")
        want = _MACHINES[cls.machine]
        raise LoaderError(f"{name}: {cls.name} image is for {arch}, not {want}")
    if e_version != EV_CURRENT:
        raise LoaderError(f"{name}: unknown ELF version {e_version}")
    if e_type not in (ET_EXEC, ET_DYN):
        kind = _E_TYPES.get(e_type, f"type {e_type}")
        raise LoaderError(f"{name}: {cls.name} image is not an executable ({kind})")
    if e_phnum == 0:
        raise LoaderError(f"{name}: {cls.name} image has no program headers")
    if e_phnum == PN_XNUM:
        raise LoaderError(f"{name}: {cls.name} image has too many program headers (PN_XNUM)")
    if e_phentsize != cls.phdr.size:
        raise LoaderError(
            f"{name}: {cls.name} program header size is {e_phentsize}, not {cls.phdr.size}"
        )
    table_end = e_phoff + e_phnum * e_phentsize
    if table_end > len(data):
        raise LoaderError(
            f"{name}: program header table ({e_phoff:#x}-{table_end:#x}) is past the end "
            f"of the file ({len(data)} bytes)"
        )

    phdrs = []
    for i in range(e_phnum):
        fields = cls.phdr.unpack_from(data, e_phoff + i * e_phentsize)
        if cls is _ELF32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _pflags, p_align = fields
        else:
            p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = fields
        ph = _Phdr(i, p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)
        if p_offset + p_filesz > len(data):
            raise LoaderError(
                f"{name}: segment {i} file range ({p_offset:#x}-{p_offset + p_filesz:#x}) "
                f"is past the end of the file ({len(data)} bytes)"
            )
        if p_type == PT_LOAD:
            if p_filesz > p_memsz:
                raise LoaderError(
                    f"{name}: segment {i} has more file bytes ({p_filesz:#x}) than memory "
                    f"bytes ({p_memsz:#x})"
                )
            for what, base in (("physical", p_paddr), ("virtual", p_vaddr)):
                if base + p_memsz > cls.addr_limit:
                    raise LoaderError(
                        f"{name}: segment {i} {what} range ({base:#x}+{p_memsz:#x}) wraps "
                        f"around the {cls.addr_limit.bit_length() - 1}-bit address space"
                    )
        phdrs.append(ph)
    return _Elf(cls, e_entry, phdrs)


def _elf_segments(elf: _Elf, name: str) -> list[_Segment]:
    """The non-empty PT_LOAD segments, checked not to overlap one another.

    Overlapping segments would make the result depend on load order (and one segment's
    bss would wipe the other's bytes), so they are refused rather than guessed at.
    """
    segments = [
        _Segment(f"segment {p.index}", p.paddr, p.offset, p.filesz, p.memsz)
        for p in elf.phdrs
        if p.type == PT_LOAD and p.memsz > 0
    ]
    if not segments:
        raise LoaderError(f"{name}: {elf.cls.name} image has no loadable segments")
    ordered = sorted(segments, key=lambda s: s.gpa)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.end > b.gpa:
            raise LoaderError(
                f"{name}: {a.label} ({a.gpa:#x}-{a.end:#x}) overlaps {b.label} "
                f"({b.gpa:#x}-{b.end:#x})"
            )
    return segments


def _find_pvh_entry(data: bytes, elf: _Elf, name: str) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address from the PT_NOTE segments, if there is one."""
    for ph in elf.phdrs:
        if ph.type != PT_NOTE:
            continue
        # Notes are 4-byte aligned, except in segments aligned to 8 (gABI for ELF64,
        # and GNU property notes); offsets are computed the way binutils' readelf does.
        align = 8 if ph.align == 8 else 4
        notes = data[ph.offset : ph.offset + ph.filesz]
        pos = 0
        while pos < len(notes):
            if pos + 12 > len(notes):
                raise LoaderError(f"{name}: truncated note header in segment {ph.index}")
            namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
            name_at = pos + 12
            desc_at = pos + _align_up(12 + namesz, align)
            next_at = _align_up(desc_at + descsz, align)
            if desc_at + descsz > len(notes):
                raise LoaderError(
                    f"{name}: note at offset {pos:#x} in segment {ph.index} "
                    "runs past the end of the segment"
                )
            note_name = notes[name_at : name_at + namesz].rstrip(b"\0")
            if note_name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                desc = notes[desc_at : desc_at + descsz]
                if descsz not in (4, 8):
                    raise LoaderError(
                        f"{name}: PVH entry note has a {descsz}-byte value (expected 4 or 8)"
                    )
                entry = int.from_bytes(desc, "little")
                if entry >= 1 << 32:
                    raise LoaderError(f"{name}: PVH entry {entry:#x} is above 4 GiB")
                return entry
            pos = next_at
    return None


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) & ~(align - 1)


def _elf_entry(elf: _Elf, name: str) -> int:
    """e_entry as a physical address, the way GRUB reads it for multiboot ELF images.

    Kernels linked high (vaddr != paddr) give a virtual e_entry; it is translated
    through the PT_LOAD segment that contains it.
    """
    loads = [p for p in elf.phdrs if p.type == PT_LOAD and p.memsz > 0]
    for p in loads:
        if p.paddr <= elf.entry < p.paddr + p.memsz:
            return elf.entry
    for p in loads:
        if p.vaddr <= elf.entry < p.vaddr + p.memsz:
            entry = elf.entry - p.vaddr + p.paddr
            if entry >= 1 << 32:
                raise LoaderError(f"{name}: multiboot entry {entry:#x} is above 4 GiB")
            return entry
    raise LoaderError(f"{name}: entry point {elf.entry:#x} is not inside any loaded segment")


# --- multiboot ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _MultibootHeader:
    offset: int
    flags: int
    # a.out kludge fields (meaningful only with MULTIBOOT_AOUT_KLUDGE)
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def _find_multiboot(data: bytes, name: str) -> _MultibootHeader | None:
    """The first valid multiboot v1 header in the first 8 KiB, 4-byte aligned."""
    limit = min(len(data), MULTIBOOT_SEARCH)
    for off in range(0, limit - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic != MULTIBOOT_HEADER_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
            continue
        # Bits 0-15 are requirements: refuse what corevisor cannot honour.
        unsupported = flags & 0xFFFF & ~(MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO)
        if unsupported & MULTIBOOT_VIDEO_MODE:
            raise LoaderError(
                f"{name}: multiboot header requests a video mode, which corevisor cannot provide"
            )
        if unsupported:
            raise LoaderError(
                f"{name}: multiboot header requires unknown features (flags {unsupported:#x})"
            )
        if not flags & MULTIBOOT_AOUT_KLUDGE:
            return _MultibootHeader(off, flags)
        if off + 32 > limit:
            raise LoaderError(f"{name}: multiboot header at offset {off:#x} is truncated")
        fields = struct.unpack_from("<IIIII", data, off + 12)
        return _MultibootHeader(off, flags, *fields)
    return None


def _kludge_segment(data: bytes, mb: _MultibootHeader, name: str) -> tuple[_Segment, int]:
    """The one load range (and entry) that multiboot's a.out kludge fields describe."""
    if mb.load_addr > mb.header_addr:
        raise LoaderError(
            f"{name}: multiboot load_addr {mb.load_addr:#x} is above "
            f"header_addr {mb.header_addr:#x}"
        )
    file_offset = mb.offset - (mb.header_addr - mb.load_addr)
    if file_offset < 0:
        raise LoaderError(
            f"{name}: multiboot load_addr {mb.load_addr:#x} lies before the start of the file"
        )
    if mb.load_end_addr == 0:
        load_end = mb.load_addr + (len(data) - file_offset)
    elif mb.load_end_addr < mb.load_addr:
        raise LoaderError(
            f"{name}: multiboot load_end_addr {mb.load_end_addr:#x} is "
            f"below load_addr {mb.load_addr:#x}"
        )
    else:
        load_end = mb.load_end_addr
    filesz = load_end - mb.load_addr
    if file_offset + filesz > len(data):
        raise LoaderError(
            f"{name}: multiboot load range ({mb.load_addr:#x}-{load_end:#x}) needs "
            f"{file_offset + filesz} bytes of file, but the file has {len(data)}"
        )
    if mb.bss_end_addr == 0:
        mem_end = load_end
    elif mb.bss_end_addr < load_end:
        raise LoaderError(
            f"{name}: multiboot bss_end_addr {mb.bss_end_addr:#x} is below "
            f"the end of the loaded data {load_end:#x}"
        )
    else:
        mem_end = mb.bss_end_addr
    if mem_end > 1 << 32:
        raise LoaderError(f"{name}: multiboot load range ends above 4 GiB ({mem_end:#x})")
    if not mb.load_addr <= mb.entry_addr < mem_end:
        raise LoaderError(
            f"{name}: multiboot entry_addr {mb.entry_addr:#x} is outside the "
            f"loaded range ({mb.load_addr:#x}-{mem_end:#x})"
        )
    segment = _Segment(
        "multiboot load range", mb.load_addr, file_offset, filesz, mem_end - mb.load_addr
    )
    return segment, mb.entry_addr


# --- identification and loading -----------------------------------------------------------


def _plan(data: bytes, name: str) -> _Plan:
    """Decide the boot protocol and what goes where; raise LoaderError for anything else."""
    if data[:4] != ELF_MAGIC:
        mb = _find_multiboot(data, name)
        if mb is not None and mb.flags & MULTIBOOT_AOUT_KLUDGE:
            segment, entry = _kludge_segment(data, mb, name)
            return _Plan("multiboot", entry, [segment])
        if mb is not None:
            raise LoaderError(
                f"{name}: not an ELF image (bad magic), and its multiboot "
                "header has no load addresses (flag 16)"
            )
        if len(data) < 4:
            raise LoaderError(f"{name}: not an ELF image (file is only {len(data)} bytes)")
        raise LoaderError(f"{name}: not an ELF image (bad magic)")

    elf = _parse_elf(data, name)
    segments = _elf_segments(elf, name)
    pvh_entry = _find_pvh_entry(data, elf, name)
    if pvh_entry is not None:
        if not any(s.gpa <= pvh_entry < s.end for s in segments):
            raise LoaderError(f"{name}: PVH entry {pvh_entry:#x} is not inside any loaded segment")
        return _Plan("pvh", pvh_entry, segments)
    mb = _find_multiboot(data, name)
    if mb is not None:
        if mb.flags & MULTIBOOT_AOUT_KLUDGE:
            segment, entry = _kludge_segment(data, mb, name)
            return _Plan("multiboot", entry, [segment])
        return _Plan("multiboot", _elf_entry(elf, name), segments)
    raise LoaderError(
        f"{name}: {elf.cls.name} image has neither a PVH entry note nor a multiboot header"
    )


def identify_image(data: bytes, name: str) -> ImageKind:
    """Say which boot protocol an image uses, checking it fully but loading nothing.

    name is only used in error messages (normally the file name).
    """
    return _plan(data, name).kind


def load_image(mem: GuestMemory, path: Path, data: bytes) -> LoadedImage:
    """Copy a PVH or multiboot image (data, read from path by loader.read_image, which
    bounds it) into guest RAM at its physical addresses.

    Nothing is written unless every segment fits, so a failed load leaves RAM as it was.
    """
    name = show(path)  # safe to print, whatever bytes the path holds
    plan = _plan(data, name)
    for seg in plan.segments:
        check_placement(mem, name, seg.label, seg.gpa, seg.end)
    try:
        for seg in plan.segments:
            mem.write(seg.gpa, data[seg.offset : seg.offset + seg.filesz])
            if seg.memsz > seg.filesz:
                mem.fill(seg.gpa + seg.filesz, seg.memsz - seg.filesz, 0)
    except GuestMemoryError as e:  # pragma: no cover - check_placement rules this out
        raise LoaderError(f"{name}: {e}") from e
    return LoadedImage(
        path=path,
        kind=plan.kind,
        entry=plan.entry,
        start=min(s.gpa for s in plan.segments),
        end=max(s.end for s in plan.segments),
    )
