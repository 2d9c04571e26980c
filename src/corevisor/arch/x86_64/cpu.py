"""x86-64 vCPU boot state: segments, the boot GDT, page tables, CPUID and MSRs.

Three entry conventions are supported, as real VMMs do:
  * 32-bit protected mode, paging off (PVH and multiboot entry),
  * 64-bit long mode with identity-mapped page tables (Linux's 64-bit boot protocol), and
  * the reset vector in real mode (a machine with a BIOS).
Only the bootstrap processor gets a boot state; application processors wait in the
in-kernel LAPIC for the guest's own INIT/SIPI. Addresses come from layout.py; nothing
here touches KVM beyond filling the binding structures handed to a VcpuFd.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from corevisor.arch.x86_64 import layout, paging
from corevisor.arch.x86_64.paging import CR0_PG, CR4_PAE, EFER_LMA
from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import SupportedCpuid, VcpuFd
from corevisor.memory import GuestMemory

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
RFLAGS_RESERVED = 1 << 1

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7


@dataclass(frozen=True)
class Segment:
    """A flat segment as both the GDT and KVM's kvm_segment describe it."""

    selector: int
    type: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    dpl: int = 0
    db: int = 1
    s: int = 1
    l: int = 0  # noqa: E741 - the architectural name of the long-mode bit
    g: int = 1
    present: int = 1

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor of this segment."""
        limit = self.limit >> 12 if self.g else self.limit
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = (self.l << 1) | (self.db << 2) | (self.g << 3)
        return (
            (limit & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (flags << 52)
            | (((self.base >> 24) & 0xFF) << 56)
        )

    def to_kvm(self) -> b.kvm_segment:
        return b.kvm_segment(
            base=self.base,
            limit=self.limit,
            selector=self.selector,
            type=self.type,
            present=self.present,
            dpl=self.dpl,
            db=self.db,
            s=self.s,
            l=self.l,
            g=self.g,
        )


# The boot GDT follows the PVH ABI: CS 0x10 (32-bit flat code), DS 0x18, TR 0x20.
CODE64 = Segment(selector=0x08, type=0xB, db=0, l=1)
CODE32 = Segment(selector=0x10, type=0xB)
DATA = Segment(selector=0x18, type=0x3)
TSS = Segment(selector=0x20, type=0xB, limit=0x67, s=0, db=0, g=0)
BOOT_GDT = (CODE64, CODE32, DATA, TSS)


def write_boot_gdt(mem: GuestMemory) -> None:
    """Place the boot GDT (null + BOOT_GDT) and an empty IDT in low guest memory."""
    raw = bytearray(8)
    for seg in BOOT_GDT:
        raw += seg.descriptor().to_bytes(8, "little")
    mem.write(layout.BOOT_GDT_ADDR, raw)
    mem.write(layout.BOOT_IDT_ADDR, bytes(8))


def _flat_sregs(sregs: b.kvm_sregs, code: Segment) -> None:
    sregs.cs = code.to_kvm()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, DATA.to_kvm())
    sregs.tr = TSS.to_kvm()
    sregs.gdt.base = layout.BOOT_GDT_ADDR
    sregs.gdt.limit = 8 * (len(BOOT_GDT) + 1) - 1
    sregs.idt.base = layout.BOOT_IDT_ADDR
    sregs.idt.limit = 0


def setup_protected_mode(vcpu: VcpuFd, mem: GuestMemory, entry: int, eax: int, ebx: int) -> None:
    """Start the vCPU in 32-bit flat protected mode, paging off (PVH / multiboot entry)."""
    write_boot_gdt(mem)
    sregs = vcpu.get_sregs()
    _flat_sregs(sregs, CODE32)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(b.kvm_regs(rax=eax, rbx=ebx, rip=entry, rflags=RFLAGS_RESERVED))


# The reset state (Intel SDM vol. 3, 9.1.1): real mode, CS = F000 with base FFFF0000, so
# the first instruction is fetched at FFFFFFF0 (the BIOS ROM's last 16 bytes).
RESET_CR0 = 0x6000_0010  # CD, NW, ET
RESET_CS = Segment(selector=0xF000, type=0xB, base=0xFFFF_0000, limit=0xFFFF, db=0, g=0)
RESET_DATA = Segment(selector=0, type=0x3, limit=0xFFFF, db=0, g=0)
RESET_RIP = 0xFFF0


def setup_reset_vector(vcpu: VcpuFd) -> None:
    """Put the vCPU in the state a CPU leaves reset in, at the reset vector (a machine with
    a BIOS: firmware/bios.py). KVM creates vCPUs so; this says it, and holds after a
    restore or a debugger's changes too."""
    sregs = vcpu.get_sregs()
    sregs.cs = RESET_CS.to_kvm()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, RESET_DATA.to_kvm())
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.idt.base, sregs.idt.limit = 0, 0xFFFF
    sregs.cr0 = RESET_CR0
    sregs.cr2 = sregs.cr3 = sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(b.kvm_regs(rip=RESET_RIP, rflags=RFLAGS_RESERVED))


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; return the PML4's address (CR3)."""
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITE)
    pdpt = bytearray()
    pd = bytearray()
    for gib in range(4):
        pdpt += (layout.PD_ADDR + gib * 0x1000 | PTE_PRESENT | PTE_WRITE).to_bytes(8, "little")
        for i in range(512):
            addr = (gib << 30) | (i << 21)
            pd += (addr | PTE_PRESENT | PTE_WRITE | PTE_PS).to_bytes(8, "little")
    mem.write(layout.PDPT_ADDR, pdpt)
    mem.write(layout.PD_ADDR, pd)
    return layout.PML4_ADDR


def setup_long_mode(vcpu: VcpuFd, mem: GuestMemory, entry: int, rsi: int) -> None:
    """Start the vCPU in 64-bit mode at entry with identity paging (Linux 64-bit boot)."""
    write_boot_gdt(mem)
    cr3 = write_identity_page_tables(mem)
    sregs = vcpu.get_sregs()
    _flat_sregs(sregs, CODE64)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE
    vcpu.set_sregs(sregs)
    vcpu.set_regs(b.kvm_regs(rsi=rsi, rip=entry, rflags=RFLAGS_RESERVED))


def setup_fpu(vcpu: VcpuFd) -> None:
    """Reset x87/SSE control words to their architectural power-on values."""
    fpu = b.kvm_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


CPUID_HYPERVISOR = 1 << 31  # leaf 1 ECX
CPUID_HTT = 1 << 28  # leaf 1 EDX


HV_TIMING_LEAF = 0x40000010  # EAX: TSC kHz, EBX: LAPIC bus kHz (QEMU/VMware convention)
KVM_LAPIC_BUS_KHZ = 1_000_000  # KVM's LAPIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS = 1)


def vcpu_cpuid(
    supported: list[SupportedCpuid], index: int, ncpus: int, tsc_khz: int = 0
) -> list[SupportedCpuid]:
    """Give one vCPU its own view of CPUID: APIC ID, CPU count, hypervisor bit, timing.

    With tsc_khz, the hypervisor timing leaf publishes the TSC and LAPIC timer rates so
    guests need not calibrate them against the PIT, a measurement host load can skew.
    """
    out = []
    for e in supported:
        if e.function == 0x40000000 and tsc_khz:
            e = replace(e, eax=max(e.eax, HV_TIMING_LEAF))
        elif e.function == HV_TIMING_LEAF:
            continue
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | (index << 24) | (min(ncpus, 255) << 16)
            edx = e.edx | CPUID_HTT if ncpus > 1 else e.edx & ~CPUID_HTT
            e = replace(e, ebx=ebx, ecx=e.ecx | CPUID_HYPERVISOR, edx=edx)
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=index)
        out.append(e)
    if tsc_khz and any(e.function == 0x40000000 for e in supported):
        out.append(SupportedCpuid(HV_TIMING_LEAF, 0, 0, tsc_khz, KVM_LAPIC_BUS_KHZ, 0, 0))
    return out


def boot_msrs() -> dict[int, int]:
    """MSR values a freshly reset CPU has, as Firecracker and QEMU set them at boot."""
    return {
        b.MSR_IA32_SYSENTER_CS: 0,
        b.MSR_IA32_SYSENTER_ESP: 0,
        b.MSR_IA32_SYSENTER_EIP: 0,
        b.MSR_STAR: 0,
        b.MSR_CSTAR: 0,
        b.MSR_KERNEL_GS_BASE: 0,
        b.MSR_SYSCALL_MASK: 0,
        b.MSR_LSTAR: 0,
        b.MSR_IA32_TSC: 0,
        b.MSR_IA32_MISC_ENABLE: 1,  # fast string operations
        b.MSR_MTRR_DEF_TYPE: (1 << 11) | 6,  # MTRRs on, default write-back
    }


def format_registers(vcpu: VcpuFd, mem: GuestMemory | None = None) -> str:
    """A compact register dump for guest-stopped reports, with the bytes at rip."""
    try:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
    except Exception as e:  # noqa: BLE001 - a report must never fail
        return f"(registers unavailable: {e})"
    code = ""
    if mem is not None:
        insn = paging.read_virtual(mem, s.cs.base + r.rip, 16, s.cr0, s.cr3, s.cr4, s.efer)
        code = "\n  code at rip: " + (insn.hex(" ") if insn is not None else "(unmapped)")
    gp = " ".join(
        f"{n}={getattr(r, n):#018x}"
        for n in "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15".split()
    )
    return (
        f"vcpu{vcpu.index}: rip={r.rip:#018x} rflags={r.rflags:#x} cs={s.cs.selector:#x} "
        f"ss={s.ss.selector:#x} cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} "
        f"efer={s.efer:#x}\n  {gp}{code}"
    )
