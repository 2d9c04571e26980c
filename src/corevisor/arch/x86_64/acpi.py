"""ACPI tables describing the configured machine: RSDP, XSDT, FADT, FACS, DSDT, MADT, MCFG.

Generated for each machine (its CPU count, its interrupt controllers, its PCI host
bridge) as one relocatable blob (build_acpi_tables): placed by the VMM in the reserved
BIOS area at layout.ACPI_ADDR, RSDP first, so a guest finds them through PVH's
start_info.rsdp_paddr or by the classic 0xE0000-0xFFFFF scan; or, on a machine with
firmware, handed to the firmware through fw_cfg, which places them in its own memory
and patches the pointers (firmware/acpi.py).

The FADT describes a PC with ACPI fixed hardware, not a hardware-reduced platform: the
machine has a PM timer (devices/pm_timer.py) that guests use as a clocksource, and the
spec ignores PM_TMR_BLK when HW_REDUCED_ACPI is set (ACPI 6.5, 4.1 and 5.2.9). Without
that flag the spec requires what an OS then relies on, so the FADT also declares:
the PM1a event and control blocks (devices/pm1.py: SCI_EN always set, S5 = power off),
an SCI (ISA IRQ 9, level, with its MADT interrupt source override, as on QEMU's PCs;
never raised, since no fixed event exists), a FACS (required without HW_REDUCED_ACPI;
its global lock and waking vector are unused; FIRMWARE_CTRL only, not X_FIRMWARE_CTRL
too, or Linux installs it twice), SMI_CMD = 0 (no mode switch: always in
ACPI mode), no C2/C3 states, and TMR_VAL_EXT (a 32-bit timer). The DSDT describes COM1,
the fw_cfg device (QEMU0002, which Linux's qemu_fw_cfg driver binds), pvpanic (QEMU0001,
Linux's pvpanic-mmio), \\_S5, the virtio-mmio devices and the PCI host bridge (aml.py);
the MCFG table its ECAM window. What lives elsewhere: the MP table (mptable.py), the e820
map (bootparams.py), the port numbers (layout.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from corevisor.arch.x86_64 import aml, layout
from corevisor.errors import ConfigError
from corevisor.memory import GuestMemory

OEM_ID = b"CRVSR "
OEM_TABLE_ID = b"COREVISR"
CREATOR_ID = b"CRVS"
MADT_PCAT_COMPAT = 1  # the machine also has legacy 8259 PICs
MADT_ISO_LEVEL_HIGH = 0x000D  # MPS INTI flags: active high (01), level-triggered (11)
MADT_ISO_LEVEL_LOW = 0x000F  # active low (11), level-triggered (11): PCI INTx
# FADT flags (5.2.9, table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8  # the PM timer is 32 bits wide
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_FLAGS = FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT
FADT_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
FADT_BOOT_ARCH_8042 = 1 << 1
FADT_SIZE = 276  # revision 6
FACS_SIZE = 64
FACS_VERSION = 2
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR_LEN = 4
# P_LVL2_LAT > 100 and P_LVL3_LAT > 1000 say "no C2, no C3".
NO_C2_LATENCY = 101
NO_C3_LATENCY = 1001
_GAS_SYSTEM_IO = 1
_GAS_ACCESS_WORD = 2
_GAS_ACCESS_DWORD = 3


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


def madt(ncpus: int, level_low: Sequence[int] = ()) -> bytes:
    """MADT: one enabled local APIC per vCPU (APIC ID = index), the IOAPIC, the SCI's
    override, one level/active-low override per ISA IRQ in level_low (the PCI INTx
    lines, shared and level-triggered), LINT1 = NMI."""
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for i in range(ncpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # processor uid i, APIC id i, enabled
    body += struct.pack("<BBBBII", 1, 12, ncpus, 0, layout.IOAPIC_ADDR, 0)  # IOAPIC, GSI 0
    sci = layout.SCI_IRQ  # the SCI, ISA IRQ 9 = GSI 9, level-triggered, active high
    body += struct.pack("<BBBBIH", 2, 10, 0, sci, sci, MADT_ISO_LEVEL_HIGH)
    for irq in level_low:
        body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, MADT_ISO_LEVEL_LOW)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # NMI on LINT1 of every processor
    return sdt(b"APIC", 5, bytes(body))


def gas(address: int, bit_width: int, access_size: int) -> bytes:
    """A Generic Address Structure for a register block in system I/O space."""
    return struct.pack("<BBBBQ", _GAS_SYSTEM_IO, bit_width, 0, access_size, address)


def facs() -> bytes:
    """FACS: no hardware signature, waking vector or global lock owner (5.2.10)."""
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0,
                       FACS_VERSION, b"", 0, b"")


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    """FADT revision 6.5 for a PC with a PM timer and PM1a blocks (the module docstring)."""
    body = bytearray(FADT_SIZE - 36)

    def put(offset: int, fmt: str, value: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - 36, value)

    put(36, "<I", facs_addr)  # FIRMWARE_CTRL (32-bit, as QEMU: the FACS is below 1 MiB)
    put(40, "<I", dsdt_addr)  # DSDT (32-bit pointer)
    put(46, "<H", layout.SCI_IRQ)  # SCI_INT; SMI_CMD (48) = 0: always in ACPI mode
    put(56, "<I", layout.PM1A_EVT_PORT)
    put(64, "<I", layout.PM1A_CNT_PORT)
    put(76, "<I", layout.PM_TMR_PORT)
    put(88, "<B", PM1_EVT_LEN)
    put(89, "<B", PM1_CNT_LEN)
    put(91, "<B", PM_TMR_LEN)
    put(96, "<H", NO_C2_LATENCY)
    put(98, "<H", NO_C3_LATENCY)
    put(109, "<H", FADT_BOOT_ARCH_LEGACY_DEVICES | FADT_BOOT_ARCH_8042)
    put(112, "<I", FADT_FLAGS)
    put(131, "<B", 5)  # FADT minor version
    # X_FIRMWARE_CTRL (132) stays 0: with both set, Linux installs the FACS twice
    put(140, "<Q", dsdt_addr)  # X_DSDT
    put(148, "12s", gas(layout.PM1A_EVT_PORT, 8 * PM1_EVT_LEN, _GAS_ACCESS_WORD))
    put(172, "12s", gas(layout.PM1A_CNT_PORT, 8 * PM1_CNT_LEN, _GAS_ACCESS_WORD))
    put(208, "12s", gas(layout.PM_TMR_PORT, 8 * PM_TMR_LEN, _GAS_ACCESS_DWORD))
    put(268, "<Q", int.from_bytes(b"CRVSR\0\0\0", "little"))  # hypervisor vendor identity
    return sdt(b"FACP", 6, bytes(body))


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 pointing at the XSDT (no RSDT: ACPI 2.0+ consumers read the XSDT)."""
    first = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0))
    first[8] = checksum(bytes(first))
    full = bytearray(first + struct.pack("<IQB3s", 36, xsdt_addr, 0, b"\0\0\0"))
    full[32] = checksum(bytes(full))
    return bytes(full)


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out for a base address still to be chosen.

    ``tables`` is every table but the RSDP, back to back (the FACS first: it must be
    64-byte aligned, and the blob is placed 64-byte aligned), with each pointer between
    them written as an offset into the blob; ``pointers`` lists those fields (offset,
    size). ``rsdp`` points at the XSDT the same way (its field: RSDP_XSDT). ``checksums``
    are (checksum byte, start, length) of each table in the blob. Placed by the VMM
    (relocate) or by firmware from fw_cfg (firmware/acpi.py: QEMU's table loader).
    """

    tables: bytes
    pointers: tuple[tuple[int, int], ...]
    checksums: tuple[tuple[int, int, int], ...]
    rsdp: bytes

    def relocate(self, tables_at: int) -> tuple[bytes, bytes]:
        """(RSDP, tables) with every pointer made absolute for the blob at tables_at."""
        blob = bytearray(self.tables)
        for offset, size in self.pointers:
            value = int.from_bytes(blob[offset : offset + size], "little") + tables_at
            blob[offset : offset + size] = value.to_bytes(size, "little")
        for at, start, length in self.checksums:
            blob[at] = 0
            blob[at] = checksum(bytes(blob[start : start + length]))
        xsdt = int.from_bytes(self.rsdp[RSDP_XSDT : RSDP_XSDT + 8], "little") + tables_at
        return rsdp(xsdt), bytes(blob)


RSDP_XSDT = 24  # the RSDP's XsdtAddress field
MCFG_ALLOCATION = struct.Struct("<QHBBI")  # base, segment, start bus, end bus, reserved


def mcfg(ecam_base: int) -> bytes:
    """MCFG: one ECAM allocation, segment 0, bus 0 only (PCI Firmware 3.0, 4.1.2)."""
    return sdt(b"MCFG", 1, bytes(8) + MCFG_ALLOCATION.pack(ecam_base, 0, 0, 0, 0))


def build_acpi_tables(
    ncpus: int,
    virtio_mmio: Sequence[tuple[int, int, int]] = (),
    pci: aml.PciHost | None = None,
) -> AcpiTables:
    """Every table of the machine: FACS, DSDT, FADT, MADT, (MCFG), XSDT, and the RSDP.

    virtio_mmio lists (base, size, gsi) of the virtio-mmio windows, described in the
    DSDT (aml.py) so an ACPI guest finds them without a command line; pci describes the
    host bridge (the DSDT's PCI0, the MCFG table, MADT overrides for the INTx lines).
    """
    blob = bytearray()
    pointers: list[tuple[int, int]] = []
    checksums: list[tuple[int, int, int]] = []

    def place(table: bytes, align: int = 16, pointer_fields: Sequence[tuple[int, int]] = ()
              ) -> int:
        at = (len(blob) + align - 1) & ~(align - 1)
        blob.extend(bytes(at - len(blob)))
        blob.extend(table)
        pointers.extend((at + off, size) for off, size in pointer_fields)
        if table[:4] != b"FACS":
            checksums.append((at + 9, at, len(table)))
        return at

    com1 = (layout.COM1_PORT, layout.COM1_IRQ)
    fw_cfg = (layout.FW_CFG_PORT, layout.FW_CFG_PORT_SIZE)
    facs_at = place(facs(), align=64)  # the FACS must be 64-byte aligned
    dsdt = aml.sleep_states() + aml.system_bus(
        com1, virtio_mmio, fw_cfg, layout.PVPANIC_PORT, pci
    )
    dsdt_at = place(sdt(b"DSDT", 2, dsdt))
    fadt_at = place(fadt(dsdt_at, facs_at), pointer_fields=((36, 4), (40, 4), (140, 8)))
    intx = sorted({gsi for _, _, gsi in pci.routes}) if pci is not None else []
    entries = [fadt_at, place(madt(ncpus, level_low=intx))]
    if pci is not None:
        entries.append(place(mcfg(pci.ecam[0])))
    xsdt = sdt(b"XSDT", 1, b"".join(struct.pack("<Q", e) for e in entries))
    xsdt_at = place(xsdt, pointer_fields=tuple((36 + 8 * i, 8) for i in range(len(entries))))
    if len(blob) + 64 > layout.ACPI_MAX:
        raise ConfigError(f"cpus: {ncpus} CPUs do not fit in the ACPI table area")
    return AcpiTables(bytes(blob), tuple(pointers), tuple(checksums), rsdp(xsdt_at))


def write_acpi_tables(
    mem: GuestMemory,
    ncpus: int,
    virtio_mmio: Sequence[tuple[int, int, int]] = (),
    pci: aml.PciHost | None = None,
) -> int:
    """Lay out every table at layout.ACPI_ADDR, RSDP first (where a guest's BIOS-area
    scan finds it), the rest 64 bytes later; return the RSDP's address."""
    base = layout.ACPI_ADDR
    table_rsdp, tables = build_acpi_tables(ncpus, virtio_mmio, pci).relocate(base + 64)
    mem.write(base, table_rsdp)
    mem.write(base + 64, tables)
    return base
