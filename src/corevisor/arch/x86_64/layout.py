"""Guest-physical memory map (and fixed I/O ports) of an x86-64 corevisor guest: constants only.

Everything the VMM places in guest RAM before boot has its address here, so the
pieces written by different modules (GDT, page tables, boot info, command line,
MP table) can be checked against each other in one place. Code lives elsewhere; the
one function, ram_layout, is here because it *is* the memory map policy.

Low memory (below 1 MiB) belongs to the VMM; images load at or above HIGH_MEMORY_START.
"""

from __future__ import annotations

# Real-mode interrupt vector table and the BIOS data area word that holds the EBDA segment
# (the guest finds the MP floating pointer through it).
REAL_MODE_IVT = 0x0
BDA_EBDA_SEGMENT = 0x40E

# Boot GDT and (empty) IDT used to enter protected/long mode.
BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x520

# PVH start_info or multiboot info (plus its memory map), up to 0x2000 bytes.
BOOT_INFO_ADDR = 0x6000
BOOT_INFO_MAX = 0x2000

# Identity-map page tables for long-mode entry: 4 PDs at 0xB000-0xEFFF map 4 GiB.
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000

# NUL-terminated kernel command line.
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000

# Extended BIOS data area; the MP table lives at its start (e820 reserves it).
EBDA_START = 0x9FC00
MPTABLE_ADDR = 0x9FC00

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

IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# virtio-mmio devices (virtio/attach.py): one 4 KiB window each from the bottom of the
# hole, at most 9 (one per free ISA IRQ).
VIRTIO_MMIO_START = MMIO_HOLE_START
VIRTIO_MMIO_END = VIRTIO_MMIO_START + 9 * 0x1000

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
