"""Boot GDT descriptors, identity page tables and per-vCPU CPUID, checked bit by bit."""

from __future__ import annotations

from corevisor.arch.x86_64 import cpu, layout
from corevisor.kvm.ioctls import SupportedCpuid
from corevisor.memory import GuestMemory


def test_gdt_descriptors_match_known_encodings() -> None:
    # the classic flat descriptors (as in Linux's boot GDT)
    assert cpu.CODE32.descriptor() == 0x00CF9B000000FFFF
    assert cpu.DATA.descriptor() == 0x00CF93000000FFFF
    assert cpu.CODE64.descriptor() == 0x00AF9B000000FFFF
    assert cpu.TSS.descriptor() == 0x00008B0000000067


def test_boot_gdt_written_with_pvh_selectors() -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    cpu.write_boot_gdt(mem)
    raw = mem.read(layout.BOOT_GDT_ADDR, 40)
    entries = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, 40, 8)]
    assert entries[0] == 0
    assert entries[cpu.CODE32.selector >> 3] == cpu.CODE32.descriptor()
    assert entries[cpu.DATA.selector >> 3] == cpu.DATA.descriptor()
    assert cpu.CODE32.selector == 0x10 and cpu.DATA.selector == 0x18 and cpu.TSS.selector == 0x20
    mem.close()


def test_identity_page_tables_map_4g_with_2m_pages() -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    cr3 = cpu.write_identity_page_tables(mem)

    def walk(va: int) -> int:
        pml4e = mem.read_u64(cr3 + ((va >> 39) & 511) * 8)
        pdpte = mem.read_u64((pml4e & ~0xFFF) + ((va >> 30) & 511) * 8)
        pde = mem.read_u64((pdpte & ~0xFFF) + ((va >> 21) & 511) * 8)
        assert pde & cpu.PTE_PS and pde & cpu.PTE_PRESENT
        return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)

    for va in (0, 0x100000, 0x12345678, 0xFEE00000, 0xFFFFFFFF):
        assert walk(va) == va
    mem.close()


def test_cpuid_gives_each_vcpu_its_apic_id() -> None:
    base = [
        SupportedCpuid(1, 0, 0, 0x806F8, 0x12345678, 0x1, 0x0),
        SupportedCpuid(0xB, 0, 1, 0, 0, 0, 0xFF),
        SupportedCpuid(0, 0, 0, 0xD, 0, 0, 0),
    ]
    for index in (0, 3):
        out = {e.function: e for e in cpu.vcpu_cpuid(base, index, 4)}
        assert out[1].ebx >> 24 == index
        assert (out[1].ebx >> 16) & 0xFF == 4
        assert out[1].ebx & 0xFFFF == 0x5678
        assert out[1].ecx & cpu.CPUID_HYPERVISOR
        assert out[1].edx & cpu.CPUID_HTT
        assert out[0xB].edx == index
        assert out[0] == base[2]


def test_page_walk_matches_identity_tables_and_refuses_unmapped() -> None:
    from corevisor.arch.x86_64 import paging

    mem = GuestMemory.anonymous([(0, 1 << 20)])
    cr3 = cpu.write_identity_page_tables(mem)
    state = dict(cr0=cpu.CR0_PG | cpu.CR0_PE, cr3=cr3, cr4=cpu.CR4_PAE, efer=cpu.EFER_LMA)
    assert paging.translate(mem, 0x12345, **state) == 0x12345
    assert paging.translate(mem, 0xFEE00ABC, **state) == 0xFEE00ABC
    assert paging.translate(mem, 1 << 32, **state) is None  # PDPT entry 4 is empty
    assert paging.translate(mem, 0x777, cr0=0, cr3=0, cr4=0, efer=0) == 0x777
    mem.write(0x3000, b"code")
    assert paging.read_virtual(mem, 0x3000, 4, **state) == b"code"
    # a page table entry pointing outside RAM: the walk says unmapped, never reads host memory
    mem.write_u64(cr3, (0x7000_0000) | 1)
    assert paging.translate(mem, 0x1000, **state) is None
    mem.close()


def test_cpuid_publishes_tsc_and_lapic_rates_in_the_hypervisor_leaf() -> None:
    base = [SupportedCpuid(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)]
    out = {e.function: e for e in cpu.vcpu_cpuid(base, 0, 1, tsc_khz=2_596_142)}
    assert out[0x40000000].eax == cpu.HV_TIMING_LEAF
    assert (out[cpu.HV_TIMING_LEAF].eax, out[cpu.HV_TIMING_LEAF].ebx) == (2_596_142, 1_000_000)
    assert cpu.HV_TIMING_LEAF not in {e.function for e in cpu.vcpu_cpuid(base, 0, 1)}
