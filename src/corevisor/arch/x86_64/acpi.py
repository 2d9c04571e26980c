"""ACPI tables describing the configured machine: RSDP, XSDT, FADT, DSDT, MADT.

Generated for each machine (its CPU count, its interrupt controllers) and placed in the
reserved BIOS area at layout.ACPI_ADDR, RSDP first, so a guest finds them through PVH's
start_info.rsdp_paddr or by the classic 0xE0000-0xFFFFF scan. The FADT declares a
hardware-reduced platform (no PM timer, no SCI): what a VMM without ACPI power-management
hardware honestly has. The DSDT describes COM1 and the virtio-mmio devices (aml.py);
other device objects belong there as they are added. What lives elsewhere:
the MP table (mptable.py), the e820 map (bootparams.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from corevisor.arch.x86_64 import aml, layout
from corevisor.errors import ConfigError
from corevisor.memory import GuestMemory

OEM_ID = b"CRVSR "
OEM_TABLE_ID = b"COREVISR"
CREATOR_ID = b"CRVS"
MADT_PCAT_COMPAT = 1  # the machine also has legacy 8259 PICs
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
FADT_BOOT_ARCH_8042 = 1 << 1
FADT_SIZE = 276  # revision 6


def checksum(data: bytes) -> int:
    """The byte that makes data sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the common 36-byte header, body, checksum filled in."""
    length = 36 + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1
    )
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def madt(ncpus: int) -> bytes:
    """MADT: one enabled local APIC per vCPU (APIC ID = index), the IOAPIC, LINT1 = NMI."""
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for i in range(ncpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # processor uid i, APIC id i, enabled
    body += struct.pack("<BBBBII", 1, 12, ncpus, 0, layout.IOAPIC_ADDR, 0)  # IOAPIC, GSI 0
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # NMI on LINT1 of every processor
    return sdt(b"APIC", 5, bytes(body))


def fadt(dsdt_addr: int) -> bytes:
    """FADT revision 6.5 for a hardware-reduced platform with legacy devices and an i8042."""
    body = bytearray(FADT_SIZE - 36)

    def put(offset: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, body, offset - 36, value)

    put(40, "<I", dsdt_addr)  # DSDT (32-bit pointer)
    put(109, "<H", FADT_BOOT_ARCH_LEGACY_DEVICES | FADT_BOOT_ARCH_8042)
    put(112, "<I", FADT_HW_REDUCED_ACPI)
    put(131, "<B", 5)  # FADT minor version
    put(140, "<Q", dsdt_addr)  # X_DSDT
    put(268, "<Q", int.from_bytes(b"CRVSR\0\0\0", "little"))  # hypervisor vendor identity
    return sdt(b"FACP", 6, bytes(body))


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 pointing at the XSDT (no RSDT: ACPI 2.0+ consumers read the XSDT)."""
    first = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0))
    first[8] = checksum(bytes(first))
    full = bytearray(first + struct.pack("<IQB3s", 36, xsdt_addr, 0, b"\0\0\0"))
    full[32] = checksum(bytes(full))
    return bytes(full)


def write_acpi_tables(
    mem: GuestMemory, ncpus: int, virtio_mmio: Sequence[tuple[int, int, int]] = ()
) -> int:
    """Lay out every table at layout.ACPI_ADDR; return the RSDP's address.

    virtio_mmio lists (base, size, gsi) of the virtio-mmio windows, described in the
    DSDT (aml.py) so an ACPI guest finds them without a command line.
    """
    base = layout.ACPI_ADDR
    cursor = base + 64  # the RSDP (36 bytes) goes first, tables 16-byte aligned after it
    blobs: list[tuple[int, bytes]] = []

    def place(table: bytes) -> int:
        nonlocal cursor
        addr = cursor
        blobs.append((addr, table))
        cursor = (cursor + len(table) + 15) & ~15
        return addr

    com1 = (layout.COM1_PORT, layout.COM1_IRQ)
    dsdt_addr = place(sdt(b"DSDT", 2, aml.system_bus(com1, virtio_mmio)))
    fadt_addr = place(fadt(dsdt_addr))
    madt_addr = place(madt(ncpus))
    xsdt_addr = place(sdt(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr)))
    if cursor - base > layout.ACPI_MAX:
        raise ConfigError(f"cpus: {ncpus} CPUs do not fit in the ACPI table area")
    mem.write(base, rsdp(xsdt_addr))
    for addr, table in blobs:
        mem.write(addr, table)
    return base
