"""Guest-virtual to guest-physical translation by walking the guest's own page tables.

Used wherever the VMM must look at memory the way the guest's CPU sees it (the
instruction bytes at a faulting rip, the GDB stub's memory reads, writes and
breakpoints). Every table read goes through
GuestMemory, so a hostile guest's page tables can point anywhere without the walk ever
leaving guest RAM: an entry that points outside RAM translates to None.
"""

from __future__ import annotations

from corevisor.errors import GuestMemoryError
from corevisor.memory import GuestMemory

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
_PRESENT = 1
_PS = 1 << 7
_ADDR = ((1 << 52) - 1) & ~0xFFF


def translate(mem: GuestMemory, va: int, cr0: int, cr3: int, cr4: int, efer: int) -> int | None:
    """The guest-physical address of va under the given paging state, or None if unmapped."""
    try:
        if not cr0 & CR0_PG:
            return va & 0xFFFFFFFF if not efer & EFER_LMA else va
        if efer & EFER_LMA:
            levels = 5 if cr4 & CR4_LA57 else 4
            return _walk_long(mem, va, cr3, levels)
        if cr4 & CR4_PAE:
            return _walk_pae(mem, va & 0xFFFFFFFF, cr3)
        return _walk_32(mem, va & 0xFFFFFFFF, cr3, bool(cr4 & CR4_PSE))
    except GuestMemoryError:
        return None


def _walk_long(mem: GuestMemory, va: int, cr3: int, levels: int) -> int | None:
    table = cr3 & _ADDR
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        entry = mem.read_u64(table + ((va >> shift) & 511) * 8)
        if not entry & _PRESENT:
            return None
        if level in (2, 3) and entry & _PS:
            return (entry & _ADDR & ~((1 << shift) - 1)) | (va & ((1 << shift) - 1))
        table = entry & _ADDR
    return table | (va & 0xFFF)


def _walk_pae(mem: GuestMemory, va: int, cr3: int) -> int | None:
    pdpte = mem.read_u64((cr3 & 0xFFFFFFE0) + ((va >> 30) & 3) * 8)
    if not pdpte & _PRESENT:
        return None
    pde = mem.read_u64((pdpte & _ADDR) + ((va >> 21) & 511) * 8)
    if not pde & _PRESENT:
        return None
    if pde & _PS:
        return (pde & _ADDR & ~0x1FFFFF) | (va & 0x1FFFFF)
    pte = mem.read_u64((pde & _ADDR) + ((va >> 12) & 511) * 8)
    return (pte & _ADDR) | (va & 0xFFF) if pte & _PRESENT else None


def _walk_32(mem: GuestMemory, va: int, cr3: int, pse: bool) -> int | None:
    pde = mem.read_u32((cr3 & 0xFFFFF000) + (va >> 22) * 4)
    if not pde & _PRESENT:
        return None
    if pse and pde & _PS:
        return (pde & 0xFFC00000) | (va & 0x3FFFFF)
    pte = mem.read_u32((pde & 0xFFFFF000) + ((va >> 12) & 1023) * 4)
    return (pte & 0xFFFFF000) | (va & 0xFFF) if pte & _PRESENT else None


def read_virtual(
    mem: GuestMemory, va: int, size: int, cr0: int, cr3: int, cr4: int, efer: int
) -> bytes | None:
    """Read size bytes at a guest-virtual address, page by page; None if any is unmapped."""
    out = bytearray()
    while size > 0:
        gpa = translate(mem, va, cr0, cr3, cr4, efer)
        chunk = min(size, 0x1000 - (va & 0xFFF))
        if gpa is None or not mem.contains(gpa, chunk):
            return None
        out += mem.read(gpa, chunk)
        va += chunk
        size -= chunk
    return bytes(out)


def write_virtual(
    mem: GuestMemory, va: int, data: bytes, cr0: int, cr3: int, cr4: int, efer: int
) -> bool:
    """Write data at a guest-virtual address; False (and nothing written) if any page
    of the range is unmapped or outside RAM. Page permissions are not checked: this is
    the debugger's view, which may patch read-only code."""
    chunks: list[tuple[int, int, int]] = []  # (gpa, offset into data, length)
    done = 0
    while done < len(data):
        gpa = translate(mem, va + done, cr0, cr3, cr4, efer)
        chunk = min(len(data) - done, 0x1000 - ((va + done) & 0xFFF))
        if gpa is None or not mem.contains(gpa, chunk):
            return False
        chunks.append((gpa, done, chunk))
        done += chunk
    for gpa, off, length in chunks:
        mem.write(gpa, data[off : off + length])
    return True
