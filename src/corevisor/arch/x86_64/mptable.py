"""The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs.

write_mptable places the MP floating pointer and the configuration table at
MPTABLE_ADDR (the start of the EBDA, which e820 reports reserved) and points the BIOS
data area's EBDA word at it, which is where guests (Linux, most small kernels) scan.
The table lists the processors, one ISA bus, one IOAPIC, the ISA IRQ routing and the
LAPIC LINT0/LINT1 wiring; on a machine with PCI also bus 0 as a PCI bus (the ISA bus is
then bus 1, as SeaBIOS numbers them) with each slot's INTx pins (level, active low),
and no ISA entry for the IRQs those share. ACPI tables are in acpi.py; nothing here touches KVM.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from corevisor.arch.x86_64.layout import (
    BDA_EBDA_SEGMENT,
    BIOS_ROM_START,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    MPTABLE_ADDR,
)
from corevisor.errors import ConfigError
from corevisor.memory import GuestMemory

MAX_CPUS = 254  # APIC IDs 0..253; the IOAPIC takes ncpus, and 0xFF is the broadcast ID

MP_SPEC_REV = 4  # version 1.4
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
ISA_BUS_ID = 0  # on a machine without PCI; with PCI, bus 0 is PCI and ISA is bus 1
PCI_BUS_ID = 0

# Entry type codes (MP spec table 4-3).
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

# Interrupt types (MP spec table 4-10).
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3

CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
IOAPIC_ENABLED = 1 << 0
# A family-6 CPU with an FPU and an on-chip APIC: what the spec's processor entry
# expects to see, and all guests look at.
CPU_SIGNATURE = 6 << 8
CPU_FEATURES = (1 << 0) | (1 << 9)

# Floating pointer: signature, config table address, length (16-byte units), spec rev,
# checksum, feature bytes 1-5 (all 0: a configuration table is present, no IMCR).
_FLOATING = struct.Struct("<4sIBBB5s")
# Configuration table header: signature, base table length, spec rev, checksum, OEM ID,
# product ID, OEM table pointer, OEM table size, entry count, LAPIC address,
# extended table length, extended table checksum, reserved.
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
_PROCESSOR = struct.Struct("<BBBBII8s")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTSRC = struct.Struct("<BBHBBBB")  # type, irqtype, flags, src bus, src irq, dst id, dst pin
assert (_FLOATING.size, _HEADER.size, _PROCESSOR.size) == (16, 44, 20)
assert _BUS.size == _IOAPIC.size == _INTSRC.size == 8

DEST_ALL_LAPICS = 0xFF


def _checksum(data: bytes) -> int:
    """The byte that makes data (with a zero checksum field) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    """Fill in the checksum byte at offset, which must be zero on entry."""
    buf = bytearray(data)
    buf[offset] = _checksum(data)
    return bytes(buf)


MP_PCI_LEVEL_LOW = 0x0F  # INTI flags: active low (11), level-triggered (11)


def _irq_routes(irq0_pin: int, pci_irqs: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """(ISA IRQ, IOAPIC pin) pairs for the 16 legacy IRQs, less those PCI INTx uses.

    IRQ2 is the 8259 cascade and never a device interrupt; with IRQ0 on pin 2 it must
    not be listed, or two sources would claim one pin.
    """
    routes = [(0, irq0_pin)]
    routes += [(irq, irq) for irq in range(1, 16) if irq != 2 and irq not in pci_irqs]
    return routes


def mptable_size(ncpus: int, pci_routes: int = 0) -> int:
    """Bytes the floating pointer and configuration table take for ncpus processors
    (and pci_routes PCI interrupt entries: a second bus, fewer ISA entries at most)."""
    return (
        _FLOATING.size
        + _HEADER.size
        + ncpus * _PROCESSOR.size
        + (2 if pci_routes else 1) * _BUS.size
        + _IOAPIC.size
        + (len(_irq_routes(0)) + pci_routes) * _INTSRC.size
        + 2 * _INTSRC.size
    )


def write_mptable(
    mem: GuestMemory,
    ncpus: int,
    *,
    irq0_pin: int = 2,
    pci_routes: Sequence[tuple[int, int, int]] | None = None,
) -> None:
    """Write the MP floating pointer and configuration table for ncpus vCPUs.

    irq0_pin is the IOAPIC input the timer (ISA IRQ 0) is wired to. It must agree with
    the machine's GSI routing: pin 2 is what PC firmware reports and what QEMU installs
    with KVM_SET_GSI_ROUTING; KVM's *default* routing sends GSI 0 to pin 0, so a machine
    that keeps the default routing must pass irq0_pin=0. pci_routes (slot, pin 0-3 for
    INTA-INTD, IOAPIC pin), given on a machine with PCI, adds PCI bus 0.
    """
    if not 1 <= ncpus <= MAX_CPUS:
        raise ConfigError(f"vcpus: {ncpus} is out of range for the MP table (1-{MAX_CPUS})")
    if irq0_pin not in (0, 2):
        raise ConfigError(f"IRQ0 must be on IOAPIC pin 0 or 2, not {irq0_pin}")
    if MPTABLE_ADDR % 16:
        raise AssertionError("the MP floating pointer must be 16-byte aligned")
    routes = tuple(pci_routes) if pci_routes is not None else ()
    if MPTABLE_ADDR + mptable_size(ncpus, len(routes)) > BIOS_ROM_START:
        raise AssertionError("the MP table would run into the BIOS ROM area")

    ioapic_id = ncpus
    isa_bus = PCI_BUS_ID + 1 if pci_routes is not None else ISA_BUS_ID
    entries: list[bytes] = []
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(
            _PROCESSOR.pack(
                MP_PROCESSOR, cpu, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES, bytes(8)
            )
        )
    if pci_routes is not None:
        entries.append(_BUS.pack(MP_BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(_BUS.pack(MP_BUS, isa_bus, b"ISA   "))
    entries.append(_IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_ADDR))
    for slot, pin, gsi in routes:
        # A PCI source IRQ is the device number and the pin (0 = INTA), MP spec D.3.
        entries.append(_INTSRC.pack(MP_INTSRC, MP_INT, MP_PCI_LEVEL_LOW, PCI_BUS_ID,
                                    slot << 2 | pin, ioapic_id, gsi))
    for irq, pin in _irq_routes(irq0_pin, frozenset(gsi for _, _, gsi in routes)):
        # flags 0: polarity and trigger mode conform to the bus (ISA: edge, active high).
        entries.append(_INTSRC.pack(MP_INTSRC, MP_INT, 0, isa_bus, irq, ioapic_id, pin))
    # The LAPIC local inputs: the 8259 (virtual-wire mode) on LINT0, NMI on LINT1.
    entries.append(_INTSRC.pack(MP_LINTSRC, MP_EXTINT, 0, isa_bus, 0, DEST_ALL_LAPICS, 0))
    entries.append(_INTSRC.pack(MP_LINTSRC, MP_NMI, 0, isa_bus, 0, DEST_ALL_LAPICS, 1))

    body = b"".join(entries)
    table_addr = MPTABLE_ADDR + _FLOATING.size
    header = _HEADER.pack(
        b"PCMP",
        _HEADER.size + len(body),
        MP_SPEC_REV,
        0,  # checksum, filled in below
        b"COREVSR ",
        b"corevisor   ",
        0,
        0,
        len(entries),
        LAPIC_ADDR,
        0,
        0,
        0,
    )
    table = _with_checksum(header + body, 7)
    floating = _with_checksum(_FLOATING.pack(b"_MP_", table_addr, 1, MP_SPEC_REV, 0, bytes(5)), 10)

    mem.write(MPTABLE_ADDR, floating)
    mem.write(table_addr, table)
    mem.write(BDA_EBDA_SEGMENT, (MPTABLE_ADDR >> 4).to_bytes(2, "little"))
