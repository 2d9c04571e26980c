"""Guest-physical memory map (and fixed I/O ports) of an x86-64 corevisor guest: constants only.

Everything the VMM places in guest RAM before boot has its address here, so the
pieces written by different modules (GDT, page tables, boot info, command line,
MP table) can be checked against each other in one place. Code lives elsewhere; the
one function, ram_layout, is here because it *is* the memory map policy.

Below 1 MiB the VMM writes only a few ranges (vmm_low_ranges lists them); an image may
load anywhere else in RAM, including below 1 MiB as images made for QEMU and GRUB
sometimes are. The movable boot data (page tables, boot information, command lines) sits
in one block at the top of conventional memory, just under the EBDA, out of the way of
images linked low, which grow upwards from their load address.
"""

from __future__ import annotations

# Real-mode interrupt vector table and the BIOS data area word that holds the EBDA segment
# (the guest finds the MP floating pointer through it).
REAL_MODE_IVT = 0x0
BDA_EBDA_SEGMENT = 0x40E

# Boot GDT and (empty) IDT used to enter protected/long mode.
BOOT_GDT_ADDR = 0x500
# (the GDT is 5 descriptors, 0x500-0x527: the IDT follows it rather than overwriting
# its TSS descriptor)
BOOT_IDT_ADDR = 0x528

BOOT_IDT_END = BOOT_IDT_ADDR + 8

# The boot block, 0x94000-0x9FC00: identity-map page tables for long-mode entry (a
# bzImage only; 4 PDs at 0x96000-0x99FFF map 4 GiB), then the PVH start_info, multiboot
# info or zero page (with its memory map and module list), then the command lines.
PML4_ADDR = 0x94000
PDPT_ADDR = 0x95000
PD_ADDR = 0x96000
PAGE_TABLES_END = PD_ADDR + 4 * 0x1000

BOOT_INFO_ADDR = 0x9A000
BOOT_INFO_MAX = 0x2000

# NUL-terminated command lines: the kernel's, then each module's.
CMDLINE_ADDR = 0x9C000
CMDLINE_MAX = 0x3C00

# Extended BIOS data area; the MP table lives at its start (e820 reserves it).
EBDA_START = 0x9FC00
MPTABLE_ADDR = 0x9FC00
assert CMDLINE_ADDR + CMDLINE_MAX == EBDA_START and PAGE_TABLES_END == BOOT_INFO_ADDR

VGA_HOLE_START = 0xA0000
# ACPI tables: RSDP first (where a guest's BIOS-area scan finds it), then the tables.
ACPI_ADDR = 0xE0000
ACPI_MAX = 0x10000
BIOS_ROM_START = 0xF0000
HIGH_MEMORY_START = 0x100000

# 32-bit PCI/MMIO hole: no RAM between 3 GiB and 4 GiB.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000

# The PC's first serial port: I/O base and ISA IRQ (builder attaches it, the DSDT describes it)
COM1_PORT = 0x3F8
COM1_IRQ = 4
# The paravirtual ports of docs/paravirt-abi.md: hypercalls (hypercall.py) and channel
# doorbells (channel.py).
HYPERCALL_PORT = 0x500
DOORBELL_PORT = 0x504
# pvpanic (devices/pvpanic.py; "QEMU0001" in the DSDT, which says where it is): a guest
# kernel reports its panic here. QEMU's 0x505 is inside the doorbell port.
PVPANIC_PORT = 0x508

# QEMU's fw_cfg on x86: selector 0x510, data 0x511, DMA address 0x514-0x51B (devices/fw_cfg.py).
FW_CFG_PORT = 0x510
FW_CFG_PORT_SIZE = 12
# ACPI fixed hardware (the FADT points here; ports as on QEMU's q35): PM1a event block
# 0x600-0x603, PM1a control block 0x604-0x605 (devices/pm1.py), PM timer 0x608-0x60B
# (devices/pm_timer.py). The SCI is ISA IRQ 9, level-triggered, as on PCs.
PM1A_EVT_PORT = 0x600
PM1A_CNT_PORT = 0x604
PM_TMR_PORT = 0x608
SCI_IRQ = 9

# A BIOS ROM (firmware/bios.py) ends at 4 GiB, where the reset vector (0xFFFFFFF0) is,
# and its last 128 KiB are also at 0xE0000-0xFFFFF; it must stay above the VT-x real-mode
# TSS (VTX_TSS_ADDR, 3 pages), so at most 256 KiB (SeaBIOS's bios-256k.bin).
VTX_TSS_ADDR = 0xFFFB_D000
BIOS_MIN_SIZE = 64 << 10
BIOS_MAX_SIZE = 256 << 10
BIOS_LOW_SIZE = 128 << 10
BIOS_LOW_START = 0x10_0000 - BIOS_LOW_SIZE
SHADOW_START = 0xC0000  # the 440FX's PAM-controlled shadow RAM: 0xC0000-0xFFFFF
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# virtio-mmio devices (virtio/attach.py): one 4 KiB window each from the bottom of the
# hole, at most 9 (one per free ISA IRQ).
VIRTIO_MMIO_START = MMIO_HOLE_START
VIRTIO_MMIO_END = VIRTIO_MMIO_START + 9 * 0x1000

# Kept free of corevisor's own devices, for device models users write (userdev/,
# docs/devices.md): a user device may sit anywhere the machine's map is free, and these
# ranges stay free (tests/unit/test_userdev.py checks the map).
USER_DEVICE_PORTS = (0x700, 0x800)
USER_DEVICE_MMIO = (0xC100_0000, 0xD000_0000)  # above the virtio windows, below channels

# PCI (pci/), on a machine with PCI devices or firmware (resources.machine_map claims these
# only there): the ECAM window of bus 0 (ACPI MCFG; e820 reserves it), the 32-bit window
# BARs are placed in, from just above ECAM up to the IOAPIC (SeaBIOS, too, places BARs
# downwards from 0xFEC00000: fw/pciinit.c), a 64-bit window above RAM for the BARs that
# do not fit below 4 GiB (pci64_window), and the I/O port window of I/O BARs (0xC000 up,
# where SeaBIOS puts them). The ports 0xCF8-0xCFF are configuration mechanism #1.
PCI_CONFIG_PORT = 0xCF8
PCI_ECAM_START = 0xE000_0000
PCI_ECAM_SIZE = 1 << 20  # bus 0 only
PCI_MMIO32_START = PCI_ECAM_START + PCI_ECAM_SIZE
PCI_MMIO32_END = IOAPIC_ADDR
PCI_MMIO64_SIZE = 32 << 30
PCI_IO_START = 0xC000
PCI_IO_END = 0x10000
# PCI INTx: the 440FX's swizzle, as SeaBIOS programs it (fw/pciinit.c pci_irqs): PIRQ
# A-D on ISA IRQs 10, 10, 11, 11, slot s pin p (1 = INTA) on PIRQ (s - 1 + p - 1) & 3.
# Level-triggered, active low (the MADT overrides say so).
PCI_PIRQ_GSIS = (10, 10, 11, 11)


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The GSI of INTx pin (1..4 = INTA..INTD) of the device in slot."""
    return PCI_PIRQ_GSIS[(slot - 1 + pin - 1) & 3]


def pci64_window(memory_size: int) -> tuple[int, int]:
    """[start, end) of the 64-bit PCI window: from the first GiB boundary above RAM."""
    top = max(MMIO_HOLE_END, MMIO_HOLE_END + memory_size - MMIO_HOLE_START)
    start = -(-top // (1 << 30)) * (1 << 30)
    return start, start + PCI_MMIO64_SIZE


# Areas nothing else (a channel) may be mapped over: the virtio windows; from the IOAPIC
# to 4 GiB, the IOAPIC, LAPIC, the VT-x real-mode TSS (builder.py) and the reset vector.
FIXED_MMIO = (
    (VIRTIO_MMIO_START, VIRTIO_MMIO_END, "the virtio-mmio device windows"),
    (IOAPIC_ADDR, MMIO_HOLE_END, "the IOAPIC/LAPIC/firmware area"),
)

# Inter-partition channels (channel.py) are placed from here up, in the MMIO hole where
# no partition has RAM (docs/paravirt-abi.md); a system file may place them elsewhere.
CHANNEL_AREA_START = 0xD000_0000
CHANNEL_AREA_END = IOAPIC_ADDR
# Highest guest-physical address a channel may end at: 39 bits, the least an x86-64
# host CPU has.
MAX_GPA = 1 << 39


def vmm_low_ranges(long_mode: bool) -> tuple[tuple[int, int, str], ...]:
    """The ranges below 1 MiB the VMM writes before boot, as (start, end, what).

    An image segment, module or initrd overlapping one of them is refused (loader/);
    everything else below 1 MiB is the guest's. long_mode: the boot needs the page
    tables (a bzImage's 64-bit entry).
    """
    ranges = [
        (BDA_EBDA_SEGMENT, BDA_EBDA_SEGMENT + 2, "the BIOS data area's EBDA pointer"),
        (BOOT_GDT_ADDR, BOOT_IDT_END, "the boot GDT and IDT"),
        (BOOT_INFO_ADDR, BOOT_INFO_ADDR + BOOT_INFO_MAX, "the boot information"),
        (CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX, "the command lines"),
        (EBDA_START, HIGH_MEMORY_START, "the EBDA, VGA hole, ACPI tables and BIOS area"),
    ]
    if long_mode:
        ranges.insert(2, (PML4_ADDR, PAGE_TABLES_END, "the long-mode page tables"))
    return tuple(ranges)


def ram_layout(memory_size: int) -> list[tuple[int, int]]:
    """Split memory_size bytes of RAM into KVM slots around the MMIO hole.

    RAM above 3 GiB is moved above 4 GiB so the LAPIC, IOAPIC and device MMIO windows
    below 4 GiB are never shadowed by RAM.
    """
    if memory_size <= 0:
        raise ValueError(f"memory size must be positive, not {memory_size}")
    low = min(memory_size, MMIO_HOLE_START)
    layout = [(0, low)]
    if memory_size > MMIO_HOLE_START:
        layout.append((MMIO_HOLE_END, memory_size - MMIO_HOLE_START))
    return layout
