"""Every ctypes structure, ioctl number and KVM_*/VFIO_* constant corevisor uses.

This is the only module that knows the KVM ABI's numbers and layouts (from
include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h), and VFIO's, for device
passthrough (include/uapi/linux/vfio.h, at the end). Each structure is
checked against its C size at import time, so a layout mistake fails loudly here
instead of corrupting a vCPU later. What does not live here: calling the ioctls
(kvm/ioctls.py) and deciding what values to put in the structures (arch/).
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from enum import IntEnum

# --- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


def _check(cls: type[ctypes.Structure], size: int) -> None:
    actual = ctypes.sizeof(cls)
    assert actual == size, f"{cls.__name__}: sizeof {actual} != {size}"


# --- structures ---------------------------------------------------------------------
class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs_header(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


@functools.cache  # one class per size: building a ctypes class costs ~0.1 ms
def kvm_msrs(n: int) -> type[ctypes.Structure]:
    """A struct kvm_msrs with room for n entries (a flexible array in C)."""

    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * n)]

    return _Msrs


class kvm_msr_list_header(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


@functools.cache
def kvm_cpuid2(n: int) -> type[ctypes.Structure]:
    """A struct kvm_cpuid2 with room for n entries."""

    class _Cpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * n)]

    return _Cpuid2


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("devid", c_uint32),
    ]


class _kvm_irq_routing_u(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", c_uint32 * 8),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    """One GSI's route (KVM_SET_GSI_ROUTING): an irqchip pin or an MSI message."""

    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _kvm_irq_routing_u),
    ]


class kvm_irq_routing(ctypes.Structure):
    """The header of KVM_SET_GSI_ROUTING's argument; `entries` entries follow it
    (irq_routing(n) builds the whole buffer)."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


@functools.cache
def irq_routing(n: int) -> type[ctypes.Structure]:
    """kvm_irq_routing with room for n entries (cached per size)."""
    return type(
        f"kvm_irq_routing_{n}",
        (ctypes.Structure,),
        {"_fields_": [("nr", c_uint32), ("flags", c_uint32),
                      ("entries", kvm_irq_routing_entry * n)]},
    )


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class _events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _events_smi(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _events_smi),
        ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * 1024)]


# Local APIC register offsets in kvm_lapic_state.regs (the xAPIC page layout)
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360


class kvm_ioapic_state(ctypes.Structure):
    """The in-kernel IOAPIC: 24 redirection entries (vector 0-7, delivery mode 8-10,
    mask 16, destination 56-63)."""

    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * 24),
    ]


class kvm_pic_state(ctypes.Structure):
    """One 8259A as KVM models it."""

    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
            "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
            "elcr_mask"
        ).split()
    ]


class _irqchip_union(ctypes.Union):
    _fields_ = [("dummy", c_uint8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    """KVM_GET/SET_IRQCHIP's argument: chip_id says which chip the union holds."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _irqchip_union)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
# Interrupt delivery modes (IOAPIC redirection entries, LAPIC LVT entries: bits 8-10)
APIC_DM_NMI = 0b100
APIC_DM_INIT = 0b101
APIC_LVT_MASKED = 1 << 16


class kvm_guest_debug(ctypes.Structure):
    """KVM_SET_GUEST_DEBUG's argument: KVM_GUESTDBG_* flags and x86 debug registers."""

    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("debugreg", c_uint64 * 8)]


class kvm_debug_exit_arch(ctypes.Structure):
    """kvm_run.debug.arch on x86: which exception (1 = #DB, 3 = #BP) and where."""

    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


class kvm_dirty_log(ctypes.Structure):
    """KVM_GET_DIRTY_LOG: one bit per page of the slot, at the user address dirty_bitmap."""

    _fields_ = [
        ("slot", c_uint32),
        ("padding1", c_uint32),
        ("dirty_bitmap", c_uint64),
    ]


class kvm_clear_dirty_log(ctypes.Structure):
    """KVM_CLEAR_DIRTY_LOG: re-protect the pages set in dirty_bitmap, from first_page on
    (num_pages of them; both multiples of 64 except at the slot's end)."""

    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("dirty_bitmap", c_uint64),
    ]

class kvm_stats_header(ctypes.Structure):
    """The start of a KVM_GET_STATS_FD file: where its id, descriptors and data are."""

    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),  # bytes of the id string and of each descriptor's name
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """One statistic's descriptor; name_size bytes of its NUL-padded name follow it."""

    _fields_ = [
        ("flags", c_uint32),  # KVM_STATS_TYPE_* | KVM_STATS_UNIT_* | KVM_STATS_BASE_*
        ("exponent", ctypes.c_int16),  # value * base**exponent is in the unit
        ("size", c_uint16),  # number of u64 values (buckets for a histogram)
        ("offset", c_uint32),  # from the start of the data block
        ("bucket_size", c_uint32),  # linear histograms only
    ]


for _cls, _size in (
    (kvm_userspace_memory_region, 32),
    (kvm_dirty_log, 16),
    (kvm_clear_dirty_log, 24),
    (kvm_regs, 144),
    (kvm_segment, 24),
    (kvm_dtable, 16),
    (kvm_sregs, 312),
    (kvm_fpu, 416),
    (kvm_msr_entry, 16),
    (kvm_cpuid_entry2, 40),
    (kvm_pit_config, 64),
    (kvm_irq_level, 8),
    (kvm_irqfd, 32),
    (kvm_ioeventfd, 64),
    (kvm_msi, 32),
    (kvm_irq_routing_entry, 48),
    (kvm_irq_routing, 8),
    (kvm_mp_state, 4),
    (kvm_vcpu_events, 64),
    (kvm_enable_cap, 104),
    (kvm_lapic_state, 1024),
    (kvm_ioapic_state, 216),
    (kvm_irqchip, 520),
    (kvm_guest_debug, 72),
    (kvm_debug_exit_arch, 32),
    (kvm_stats_header, 24),
    (kvm_stats_desc, 16),
):
    _check(_cls, _size)
assert kvm_sregs.cr0.offset == 224 and kvm_sregs.efer.offset == 264
assert kvm_vcpu_events.exception_payload.offset == 56
assert kvm_guest_debug.debugreg.offset == 8 and kvm_debug_exit_arch.pc.offset == 8
assert kvm_stats_desc.size.offset == 6 and kvm_stats_desc.bucket_size.offset == 12
assert kvm_stats_header.data_offset.offset == 20
assert kvm_ioapic_state.redirtbl.offset == 24 and kvm_irqchip.chip.offset == 8

# --- ioctl numbers ------------------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_GET_DIRTY_LOG = _iow(0x42, 16)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, 24)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, 8)
KVM_IRQFD = _iow(0x76, 32)
KVM_CREATE_PIT2 = _iow(0x77, 64)
KVM_IOEVENTFD = _iow(0x79, 64)
KVM_ENABLE_CAP = _iow(0xA3, 104)
KVM_SIGNAL_MSI = _iow(0xA5, 32)
KVM_SET_GSI_ROUTING = _iow(0x6A, 8)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, 416)
KVM_SET_FPU = _iow(0x8D, 416)
KVM_GET_LAPIC = _ior(0x8E, 1024)
KVM_SET_LAPIC = _iow(0x8F, 1024)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_MP_STATE = _ior(0x98, 4)
KVM_SET_MP_STATE = _iow(0x99, 4)
KVM_GET_VCPU_EVENTS = _ior(0x9F, 64)
KVM_SET_VCPU_EVENTS = _iow(0xA0, 64)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_SET_GUEST_DEBUG = _iow(0x9B, 72)
KVM_GET_STATS_FD = _io(0xCE)  # vm and vcpu ioctl
KVM_GET_IRQCHIP = _iowr(0x62, 520)
# struct kvm_signal_mask is a u32 length followed by the sigset: the number encodes 4.
KVM_SET_SIGNAL_MASK = _iow(0x8B, 4)
KERNEL_SIGSET_BYTES = 8  # the kernel's sigset_t on x86-64: 64 signals, one bit each

KVM_API_VERSION = 12
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_PIT_SPEAKER_DUMMY = 1
KVM_X86_DISABLE_EXITS_MWAIT = 1 << 0
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2

# kvm_guest_debug.control
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000

# kvm_stats_desc.flags (Documentation/virt/kvm/api.rst, KVM_GET_STATS_FD)
KVM_STATS_TYPE_MASK = 0xF << 0
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_INSTANT = 0x1
KVM_STATS_TYPE_PEAK = 0x2
KVM_STATS_TYPE_LINEAR_HIST = 0x3
KVM_STATS_TYPE_LOG_HIST = 0x4
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BYTES = 0x1 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_SECONDS = 0x2 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_CYCLES = 0x3 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BOOLEAN = 0x4 << KVM_STATS_UNIT_SHIFT
KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW10 = 0x0 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW2 = 0x1 << KVM_STATS_BASE_SHIFT


class Cap(IntEnum):
    """KVM_CAP_* numbers corevisor asks about (kvm/host.py says what each is used for)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    COALESCED_MMIO = 15
    IOMMU = 18
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    X86_ROBUST_SINGLESTEP = 51
    XSAVE = 55
    XCRS = 56
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    SYNC_REGS = 74
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    X86_SMM = 117
    GUEST_DEBUG_HW_BPS = 119
    GUEST_DEBUG_HW_WPS = 120
    SPLIT_IRQCHIP = 121
    IOEVENTFD_ANY_LENGTH = 122
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    NESTED_STATE = 157
    COALESCED_PIO = 162
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    HALT_POLL = 182
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    DIRTY_LOG_RING = 192
    SET_GUEST_DEBUG2 = 195  # answers with the KVM_GUESTDBG_* flags this host supports
    EXIT_HYPERCALL = 201
    BINARY_STATS_FD = 203
    EXIT_ON_EMULATION_FAILURE = 204
    XSAVE2 = 208  # answers with the size of KVM_GET_XSAVE2's buffer
    VM_TSC_CONTROL = 214


class ExitReason(IntEnum):
    """KVM_EXIT_* values of kvm_run.exit_reason."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# kvm_run layout: fixed header, then the exit union at offset 32.
KVM_RUN_IMMEDIATE_EXIT_OFFSET = 1
KVM_RUN_EXIT_REASON_OFFSET = 8
KVM_RUN_EXIT_UNION_OFFSET = 32

# MSR numbers the boot path initialises.
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102


# --- vCPU and VM state (snapshot/state.py) -------------------------------------------
# Structures, ioctl numbers and constants of the state ioctls, kept together in one
# block: XSAVE (and XSAVE2), XCRS, DEBUGREGS, CPUID2, the MSR lists, PIT2 and the KVM
# clock (the irqchip's structures, PICs and IOAPIC, are with the LAPIC's above).
class kvm_xsave(ctypes.Structure):
    """KVM_GET/SET_XSAVE's 4 KiB XSAVE image. With KVM_CAP_XSAVE2 the kernel reads and
    writes KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) bytes instead (a flexible tail)."""

    _fields_ = [("region", c_uint32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_clock_data(ctypes.Structure):
    """KVM_GET/SET_CLOCK: the kvmclock's nanoseconds, and (flags) which extras are valid."""

    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


@functools.cache
def kvm_msr_list(n: int) -> type[ctypes.Structure]:
    """A struct kvm_msr_list with room for n indices (a flexible array in C)."""

    class _MsrList(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * n)]

    return _MsrList


_state_structs: tuple[tuple[type[ctypes.Structure], int], ...] = (
    (kvm_xsave, 4096),
    (kvm_xcr, 16),
    (kvm_xcrs, 392),
    (kvm_debugregs, 128),
    (kvm_clock_data, 48),
    (kvm_pic_state, 16),
    (kvm_pit_channel_state, 24),
    (kvm_pit_state2, 112),
)
for _struct, _struct_size in _state_structs:
    _check(_struct, _struct_size)
assert kvm_xcrs.padding.offset == 264 and kvm_debugregs.flags.offset == 48
assert kvm_clock_data.realtime.offset == 16 and kvm_clock_data.host_tsc.offset == 24
assert kvm_pit_channel_state.count_load_time.offset == 16 and kvm_pit_state2.flags.offset == 72

KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, 4)
KVM_SET_IRQCHIP = _ior(0x63, 520)  # _IOR in the kernel header, although it writes
KVM_SET_CLOCK = _iow(0x7B, 48)
KVM_GET_CLOCK = _ior(0x7C, 48)
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_PIT2 = _ior(0x9F, 112)
KVM_SET_PIT2 = _iow(0xA0, 112)
KVM_GET_DEBUGREGS = _ior(0xA1, 128)
KVM_SET_DEBUGREGS = _iow(0xA2, 128)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_XSAVE = _ior(0xA4, 4096)
KVM_SET_XSAVE = _iow(0xA5, 4096)
KVM_GET_XCRS = _ior(0xA6, 392)
KVM_SET_XCRS = _iow(0xA7, 392)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_XSAVE2 = _ior(0xCF, 4096)  # the buffer is KVM_CAP_XSAVE2 bytes, not 4096
assert KVM_GET_XSAVE2 == 0x9000AECF and KVM_SET_IRQCHIP == 0x8208AE63

# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 1 << 1
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# kvm_vcpu_events.flags: which optional parts of the structure are valid
KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW = 1 << 2
KVM_VCPUEVENT_VALID_SMM = 1 << 3
KVM_VCPUEVENT_VALID_PAYLOAD = 1 << 4
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 1 << 5

# MSRs whose restore order matters (snapshot/state.py)
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_FIRST = 0x4B564D00  # KVM's own paravirtual MSRs: 0x4b564d00 upwards
MSR_KVM_LAST = 0x4B564DFF


# --- VFIO (include/uapi/linux/vfio.h) ----------------------------------------------------
# Device passthrough (vfio/): the container (/dev/vfio/vfio), a group (/dev/vfio/N) and a
# device fd. Every VFIO request is _IO(';', 100 + n): the size is in each structure's
# argsz, not in the number.
VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _vfio(n: int) -> int:
    return (VFIO_TYPE << 8) | (VFIO_BASE + n)


VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3

VFIO_GET_API_VERSION = _vfio(0)
VFIO_CHECK_EXTENSION = _vfio(1)
VFIO_SET_IOMMU = _vfio(2)
VFIO_GROUP_GET_STATUS = _vfio(3)
VFIO_GROUP_SET_CONTAINER = _vfio(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio(6)
VFIO_DEVICE_GET_INFO = _vfio(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio(9)
VFIO_DEVICE_SET_IRQS = _vfio(10)
VFIO_DEVICE_RESET = _vfio(11)
VFIO_IOMMU_MAP_DMA = _vfio(13)
VFIO_IOMMU_UNMAP_DMA = _vfio(14)
assert VFIO_GET_API_VERSION == 0x3B64 and VFIO_IOMMU_MAP_DMA == 0x3B71

# vfio_group_status.flags
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
# vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
# vfio_region_info.flags
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
# vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
# vfio_irq_set.flags: one data type and one action
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
# vfio_iommu_type1_dma_map.flags
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
# A vfio-pci device's region and interrupt indexes
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("num_regions", c_uint32),
        ("num_irqs", c_uint32),
    ]


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("cap_offset", c_uint32),
        ("size", c_uint64),
        ("offset", c_uint64),
    ]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("count", c_uint32),
    ]


class vfio_irq_set(ctypes.Structure):
    """The header of struct vfio_irq_set; its data (count eventfds as s32, or bools)
    follows it in the same buffer (vfio_irq_set_eventfds)."""

    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("start", c_uint32),
        ("count", c_uint32),
    ]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("vaddr", c_uint64),
        ("iova", c_uint64),
        ("size", c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iova", c_uint64),
        ("size", c_uint64),
    ]


@functools.cache
def vfio_irq_set_eventfds(n: int) -> type[ctypes.Structure]:
    """A struct vfio_irq_set followed by n eventfds (a flexible array in C)."""

    class _IrqSet(ctypes.Structure):
        _pack_ = 4
        _fields_ = [("header", vfio_irq_set), ("fds", c_int32 * n)]

    return _IrqSet


for _struct, _struct_size in (
    (vfio_group_status, 8),
    (vfio_device_info, 16),
    (vfio_region_info, 32),
    (vfio_irq_info, 16),
    (vfio_irq_set, 20),
    (vfio_iommu_type1_dma_map, 32),
    (vfio_iommu_type1_dma_unmap, 24),
):
    _check(_struct, _struct_size)
assert vfio_region_info.size.offset == 16 and vfio_iommu_type1_dma_map.iova.offset == 16
assert ctypes.sizeof(vfio_irq_set_eventfds(1)) == 24
