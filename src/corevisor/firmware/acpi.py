"""The machine's ACPI tables for firmware to install: QEMU's fw_cfg table loader.

A machine booting through a BIOS does not get tables written into its RAM by the VMM
(the BIOS owns low memory); it gets them the way QEMU gives them to SeaBIOS
(hw/acpi/bios-linker-loader.c, SeaBIOS's fw/romfile_loader.c): two fw_cfg files with
the tables — ``etc/acpi/rsdp`` (the RSDP, for the F segment where guests scan for it)
and ``etc/acpi/tables`` (everything else, the layout of acpi.build_acpi_tables with
each pointer an offset into the file) — and ``etc/table-loader``, a list of 128-byte
commands the firmware runs: allocate each file in its zone, add the allocated address of
the tables to every pointer field, then recompute every checksum (the firmware adds
minus the sum of the range to the checksum byte, so the result sums to zero whatever
the byte held).

What does not live here: the tables (arch/x86_64/acpi.py), the fw_cfg device and its
other items (devices/fw_cfg.py, fw_cfg.py).
"""

from __future__ import annotations

import struct

from corevisor.arch.x86_64.acpi import RSDP_XSDT, AcpiTables

__all__ = ["loader_files", "RSDP_FILE", "TABLES_FILE", "LOADER_FILE"]

RSDP_FILE = "etc/acpi/rsdp"
TABLES_FILE = "etc/acpi/tables"
LOADER_FILE = "etc/table-loader"
COMMAND_SIZE = 128
_ALLOCATE, _ADD_POINTER, _ADD_CHECKSUM = 1, 2, 3
ZONE_HIGH, ZONE_FSEG = 1, 2
_NAME = 56


def _name(file: str) -> bytes:
    return file.encode("ascii").ljust(_NAME, b"\0")


def _command(kind: int, body: bytes) -> bytes:
    return struct.pack("<I", kind) + body.ljust(COMMAND_SIZE - 4, b"\0")


def allocate(file: str, align: int, zone: int) -> bytes:
    return _command(_ALLOCATE, _name(file) + struct.pack("<IB", align, zone))


def add_pointer(dest: str, src: str, offset: int, size: int) -> bytes:
    return _command(_ADD_POINTER, _name(dest) + _name(src) + struct.pack("<IB", offset, size))


def add_checksum(file: str, offset: int, start: int, length: int) -> bytes:
    return _command(_ADD_CHECKSUM, _name(file) + struct.pack("<III", offset, start, length))


def loader_files(tables: AcpiTables) -> dict[str, bytes]:
    """The three fw_cfg files that give firmware the machine's tables."""
    commands = [
        allocate(RSDP_FILE, 16, ZONE_FSEG),
        allocate(TABLES_FILE, 64, ZONE_HIGH),  # the FACS, first, is 64-byte aligned
    ]
    commands += [add_pointer(TABLES_FILE, TABLES_FILE, off, size) for off, size in tables.pointers]
    commands.append(add_pointer(RSDP_FILE, TABLES_FILE, RSDP_XSDT, 8))
    commands += [add_checksum(TABLES_FILE, at, start, n) for at, start, n in tables.checksums]
    # The RSDP's first checksum (20 bytes) before its extended one (36), which covers it.
    commands += [add_checksum(RSDP_FILE, 8, 0, 20), add_checksum(RSDP_FILE, 32, 0, 36)]
    return {
        RSDP_FILE: tables.rsdp,
        TABLES_FILE: tables.tables,
        LOADER_FILE: b"".join(commands),
    }
