"""Tests for arch/x86_64/mptable.py: the guest can find the MP table and it says the right thing.

The table is located the way a guest does it (BDA word 0x40E, then a 16-byte-aligned
scan for "_MP_" with a valid checksum) and parsed with struct from the MP spec's
layouts, independently of the builder code.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from corevisor.arch.x86_64 import layout
from corevisor.arch.x86_64.bootparams import E820_RESERVED, e820_map
from corevisor.arch.x86_64.mptable import write_mptable
from corevisor.errors import ConfigError
from corevisor.memory import GuestMemory

MiB = 1 << 20
ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 16 * MiB)])
    yield m
    m.close()


def find_floating_pointer(mem: GuestMemory) -> int:
    """Scan like Linux's smp_scan_config: EBDA (from the BDA), then the top of base memory."""
    ebda = int.from_bytes(mem.read(0x40E, 2), "little") << 4
    for base, length in ((ebda, 0x400), (639 * 0x400, 0x400)):
        for addr in range(base, base + length, 16):
            fp = mem.read(addr, 16)
            if fp[:4] == b"_MP_" and fp[8] == 1 and sum(fp) % 256 == 0:
                return addr
    raise AssertionError("no MP floating pointer found")


def parse(mem: GuestMemory) -> tuple[dict[str, int], list[tuple[int, bytes]]]:
    fp_addr = find_floating_pointer(mem)
    sig, table_addr, length, rev, _csum, f1, _f2 = struct.unpack(
        "<4sIBBBB4s", mem.read(fp_addr, 16)
    )
    assert (sig, length, rev, f1) == (b"_MP_", 1, 4, 0)
    (sig, base_len, rev, _csum, oem, product, oem_ptr, oem_size, count, lapic, ext_len,
     _ext_csum, _res) = struct.unpack("<4sHBB8s12sIHHIHBB", mem.read(table_addr, 44))  # fmt: skip
    assert sig == b"PCMP" and rev == 4
    assert sum(mem.read(table_addr, base_len)) % 256 == 0
    assert (oem_ptr, oem_size, ext_len) == (0, 0, 0)
    entries = []
    p = table_addr + 44
    for _ in range(count):
        kind = mem.read_u8(p)
        size = ENTRY_SIZES[kind]
        entries.append((kind, mem.read(p, size)))
        p += size
    assert p == table_addr + base_len
    info = {"fp": fp_addr, "table": table_addr, "end": p, "lapic": lapic}
    return info, entries


@pytest.mark.parametrize("ncpus", [1, 2, 8, 254])
def test_mptable_contents(mem: GuestMemory, ncpus: int) -> None:
    write_mptable(mem, ncpus)
    info, entries = parse(mem)
    assert info["fp"] == layout.MPTABLE_ADDR and info["fp"] % 16 == 0
    assert info["lapic"] == 0xFEE00000

    cpus = [struct.unpack("<BBBBII8s", e) for k, e in entries if k == 0]
    assert [c[1] for c in cpus] == list(range(ncpus))
    assert all(c[2] == 0x14 and c[3] & 1 for c in cpus)  # LAPIC version, enabled
    assert [c[1] for c in cpus if c[3] & 2] == [0]  # CPU 0 alone is the BSP

    buses = [struct.unpack("<BB6s", e) for k, e in entries if k == 1]
    assert buses == [(1, 0, b"ISA   ")]

    ioapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 2]
    assert ioapics == [(2, ncpus, 0x11, 1, 0xFEC00000)]

    ints = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == 3]
    routes = {irq: pin for (_, itype, _, bus, irq, dst, pin) in ints if itype == 0}
    assert all(bus == 0 and dst == ncpus for (_, _, _, bus, _, dst, _) in ints)
    assert routes == {0: 2, **{i: i for i in range(1, 16) if i != 2}}
    assert len(set(routes.values())) == len(routes)  # no IOAPIC pin claimed twice

    lints = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == 4]
    assert sorted((itype, dst, lint) for (_, itype, _, _, _, dst, lint) in lints) == [
        (1, 0xFF, 1),  # NMI on LINT1 of every LAPIC
        (3, 0xFF, 0),  # ExtINT on LINT0
    ]


def test_irq0_on_pin0_for_default_kvm_routing(mem: GuestMemory) -> None:
    write_mptable(mem, 2, irq0_pin=0)
    _, entries = parse(mem)
    ints = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == 3]
    assert {irq: pin for (_, _, _, _, irq, _, pin) in ints}[0] == 0


def test_mptable_is_in_reserved_memory(mem: GuestMemory) -> None:
    write_mptable(mem, 254)
    info, _ = parse(mem)
    reserved = [e for e in e820_map(mem) if e.type == E820_RESERVED]
    assert any(e.addr <= info["fp"] and info["end"] <= e.end for e in reserved)
    assert info["end"] <= layout.BIOS_ROM_START


@pytest.mark.parametrize("ncpus", [0, 255, -1])
def test_cpu_count_out_of_range(mem: GuestMemory, ncpus: int) -> None:
    with pytest.raises(ConfigError, match=r"out of range for the MP table \(1-254\)"):
        write_mptable(mem, ncpus)


def test_a_pci_machine_lists_bus_0_as_pci_and_its_intx(mem: GuestMemory) -> None:
    """With PCI, bus 0 is PCI and ISA is bus 1 (as SeaBIOS numbers them); each device's
    INTA is an entry (source IRQ = device << 2 | pin, level, active low), and the ISA
    IRQ its line shares is not listed as an ISA interrupt."""
    write_mptable(mem, 1, irq0_pin=0, pci_routes=[(1, 0, 10), (2, 0, 10), (3, 0, 11)])
    buses, ints = mp_buses_and_interrupts(mem)
    assert buses == {0: b"PCI   ", 1: b"ISA   "}
    pci = [(flags, irq, pin) for _, _, flags, bus, irq, _, pin in ints if bus == 0]
    assert pci == [(0x0F, 1 << 2, 10), (0x0F, 2 << 2, 10), (0x0F, 3 << 2, 11)]
    isa = [irq for _, _, _, bus, irq, _, _ in ints if bus == 1]
    assert 10 not in isa and 11 not in isa and 4 in isa


def mp_buses_and_interrupts(
    mem: GuestMemory,
) -> tuple[dict[int, bytes], list[tuple[int, ...]]]:
    """The MP table's buses (id -> type) and I/O interrupt entries, as a guest reads them
    (tests/kvm/test_userdev.py reads a built machine's with it)."""
    ptr = mem.read(layout.MPTABLE_ADDR, 16)
    table_addr = struct.unpack_from("<I", ptr, 4)[0]
    length = struct.unpack_from("<H", mem.read(table_addr + 4, 2))[0]
    table = mem.read(table_addr, length)
    assert sum(table) % 256 == 0
    off = 44
    ints: list[tuple[int, ...]] = []
    buses: dict[int, bytes] = {}
    while off < length:
        kind = table[off]
        if kind == 0:
            off += 20
            continue
        if kind == 1:
            buses[table[off + 1]] = table[off + 2 : off + 8]
        if kind == 3:
            ints.append(struct.unpack_from("<BBHBBBB", table, off))
        off += 8
    return buses, ints
