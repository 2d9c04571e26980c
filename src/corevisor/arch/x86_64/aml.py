"""Hand-assembled AML (ACPI 6.5, chapter 20) for the few DSDT objects corevisor emits.

Only what the DSDT needs: \\_S5 (the sleep type that powers off, devices/pm1.py), and a
Scope(\\_SB) holding the COM1 UART (PNP0501, its I/O ports and ISA IRQ), the fw_cfg
device (QEMU0002, its I/O ports, as QEMU describes it), pvpanic (QEMU0001, one port),
one Device per virtio-mmio
window with _HID "LNRO0005" (the ID Linux's virtio_mmio driver matches), _UID and a
_CRS of one Memory32Fixed and one Extended Interrupt descriptor, and on a machine with
PCI the host bridge PCI0 (PNP0A08, compatible PNP0A03: its bus number, I/O and memory
windows in _CRS, the INTx routing in _PRT) and a PNP0C02 device reserving the ECAM
window (Linux accepts MCFG's window only if it is reserved there or in e820). Bytes are
built by small functions, each named after the AML term it encodes, so a reader can
check them against the specification; tests disassemble the result with `iasl -d`.

What does not live here: the table headers and layout (acpi.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "pkg_length",
    "name_seg",
    "scope",
    "device",
    "name",
    "string",
    "integer",
    "buffer",
    "memory32_fixed",
    "interrupt",
    "resource_template",
    "virtio_mmio_devices",
    "eisa_id",
    "io_port",
    "irq_no_flags",
    "com_port",
    "fw_cfg_device",
    "pvpanic_device",
    "package",
    "sleep_states",
    "system_bus",
    "PciHost",
    "pci_host_bridge",
    "word_address",
    "dword_memory",
    "qword_memory",
]

# Extended Interrupt descriptor flags (6.4.3.6)
_INT_CONSUMER = 1 << 0
_INT_EDGE = 1 << 1


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of body_len bytes (the encoding counts its own bytes)."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def name_seg(text: str) -> bytes:
    """A 4-character NameSeg, padded with '_' as ASL does."""
    seg = text.ljust(4, "_").encode("ascii")
    if len(seg) != 4:
        raise ValueError(f"AML name segment {text!r} is longer than 4 characters")
    return seg


def scope(path: bytes, body: bytes) -> bytes:
    """ScopeOp PkgLength NameString TermList."""
    inner = path + body
    return b"\x10" + pkg_length(len(inner)) + inner


def device(seg: str, body: bytes) -> bytes:
    """DeviceOp (ExtOpPrefix 0x5B 0x82) PkgLength NameString TermList."""
    inner = name_seg(seg) + body
    return b"\x5b\x82" + pkg_length(len(inner)) + inner


def name(seg: str, data: bytes) -> bytes:
    """NameOp NameString DataRefObject."""
    return b"\x08" + name_seg(seg) + data


def string(text: str) -> bytes:
    return b"\x0d" + text.encode("ascii") + b"\0"


def integer(value: int) -> bytes:
    """The shortest integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWordPrefix)."""
    if value == 0:
        return b"\x00"
    if value == 1:
        return b"\x01"
    for prefix, fmt, limit in ((0x0A, "<B", 1 << 8), (0x0B, "<H", 1 << 16), (0x0C, "<I", 1 << 32)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return b"\x0e" + struct.pack("<Q", value)


def buffer(data: bytes) -> bytes:
    """BufferOp PkgLength BufferSize ByteList."""
    inner = integer(len(data)) + data
    return b"\x11" + pkg_length(len(inner)) + inner


def memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    """Large resource 0x86: 32-bit fixed memory range."""
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, size)


def interrupt(gsi: int, edge: bool = True) -> bytes:
    """Large resource 0x89: one extended interrupt, consumer, active high, exclusive."""
    flags = _INT_CONSUMER | (_INT_EDGE if edge else 0)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


def resource_template(*descriptors: bytes) -> bytes:
    """A ResourceTemplate buffer: the descriptors and an End Tag (checksum 0 = none)."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


def eisa_id(text: str) -> int:
    """EisaId("PNP0501"): three letters in 5 bits each, then four hex digits, as a DWord."""
    letters = (ord(text[0]) - 0x40) << 10 | (ord(text[1]) - 0x40) << 5 | (ord(text[2]) - 0x40)
    raw = letters.to_bytes(2, "big") + int(text[3:], 16).to_bytes(2, "big")
    return int.from_bytes(raw, "little")


def io_port(base: int, length: int) -> bytes:
    """Small resource 0x47: a fixed 16-bit-decoded I/O port range."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, length)


def irq_no_flags(irq: int) -> bytes:
    """Small resource 0x22: one ISA IRQ (edge, active high)."""
    return struct.pack("<BH", 0x22, 1 << irq)


def com_port(seg: str, uid: int, port: int, irq: int) -> bytes:
    """A 16550 UART Device: _HID PNP0501, its eight I/O ports and its ISA IRQ."""
    return device(
        seg,
        name("_HID", integer(eisa_id("PNP0501")))
        + name("_UID", integer(uid))
        + name("_CRS", resource_template(io_port(port, 8), irq_no_flags(irq))),
    )


def package(*values: int) -> bytes:
    """PackageOp PkgLength NumElements PackageElementList, of integers."""
    inner = bytes([len(values)]) + b"".join(integer(v) for v in values)
    return b"\x12" + pkg_length(len(inner)) + inner


def sleep_states() -> bytes:
    """Name(\\_S5, Package{SLP_TYPa, SLP_TYPb, 0, 0}): the one sleep state, power off."""
    from corevisor.devices.pm1 import SLP_TYP_S5

    return name("_S5", package(SLP_TYP_S5, SLP_TYP_S5, 0, 0))


# _STA: present, enabled, functioning, not shown in UI (QEMU's value for fw_cfg)
_STA_PRESENT_HIDDEN = 0xB


def fw_cfg_device(port: int, length: int) -> bytes:
    """Device(FWCF): _HID "QEMU0002", _STA, and its I/O ports (selector, data, DMA)."""
    return device(
        "FWCF",
        name("_HID", string("QEMU0002"))
        + name("_STA", integer(_STA_PRESENT_HIDDEN))
        + name("_CRS", resource_template(io_port(port, length))),
    )


def pvpanic_device(port: int) -> bytes:
    """Device(PEVT): QEMU's pvpanic, _HID "QEMU0001" (Linux's pvpanic-mmio binds it)."""
    return device(
        "PEVT",
        name("_HID", string("QEMU0001")) + name("_CRS", resource_template(io_port(port, 1))),
    )


def system_bus(
    com1: tuple[int, int],
    windows: Sequence[tuple[int, int, int]],
    fw_cfg: tuple[int, int] | None = None,
    pvpanic: int | None = None,
    pci: PciHost | None = None,
) -> bytes:
    """Scope(\\_SB): the COM1 UART (port, irq), fw_cfg (port, length), pvpanic (port),
    virtio-mmio, PCI."""
    fw_cfg_aml = fw_cfg_device(*fw_cfg) if fw_cfg is not None else b""
    pvpanic_aml = pvpanic_device(pvpanic) if pvpanic is not None else b""
    pci_aml = pci_host_bridge(pci) if pci is not None else b""
    return scope(
        b"\x5c" + name_seg("_SB"),
        com_port("COM1", 1, *com1) + fw_cfg_aml + pvpanic_aml + virtio_mmio_devices(windows)
        + pci_aml,
    )


# Address space descriptors (6.4.3.5): resource types and flags.
_RES_MEMORY, _RES_IO, _RES_BUS = 0, 1, 2
_PRODUCER_FIXED = 0x0C  # producer, positive decode, min and max fixed
_IO_ENTIRE_RANGE = 3
_MEM_RW, _MEM_CACHEABLE, _MEM_PREFETCHABLE = 1, 1 << 1, 3 << 1


def word_address(kind: int, start: int, end: int, type_flags: int = 0) -> bytes:
    """Large resource 0x88: a 16-bit bus-number or I/O range [start, end] produced."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, kind, _PRODUCER_FIXED, type_flags, 0, start,
                       end, 0, end - start + 1)


def dword_memory(start: int, end: int, prefetchable: bool = False) -> bytes:
    """Large resource 0x87: a 32-bit memory range [start, end] the bridge forwards."""
    flags = _MEM_RW | (_MEM_PREFETCHABLE if prefetchable else 0)
    return struct.pack("<BHBBBIIIII", 0x87, 23, _RES_MEMORY, _PRODUCER_FIXED, flags, 0, start,
                       end, 0, end - start + 1)


def qword_memory(start: int, end: int) -> bytes:
    """Large resource 0x8A: a 64-bit memory range [start, end] the bridge forwards."""
    return struct.pack("<BHBBBQQQQQ", 0x8A, 43, _RES_MEMORY, _PRODUCER_FIXED,
                       _MEM_RW | _MEM_PREFETCHABLE, 0, start, end, 0, end - start + 1)


def packages(*elements: bytes) -> bytes:
    """PackageOp PkgLength NumElements, of already-encoded elements."""
    inner = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + pkg_length(len(inner)) + inner


@dataclass(frozen=True)
class PciHost:
    """What the DSDT says about the PCI host bridge: its windows and INTx routing."""

    config_port: int  # 0xCF8, 8 ports the bridge itself consumes
    io: tuple[int, int]  # [start, end) of the port window for I/O BARs
    mmio32: tuple[int, int]  # [start, end) below 4 GiB
    mmio64: tuple[int, int]  # [start, end) above RAM
    ecam: tuple[int, int]  # base, size
    routes: tuple[tuple[int, int, int], ...]  # (slot, pin 0-3, GSI)


def pci_host_bridge(pci: PciHost) -> bytes:
    """Device(PCI0) with _HID/_CID/_ADR/_UID/_BBN/_CRS/_PRT, and Device(MRES) (PNP0C02)
    holding the ECAM window (the ports below 0xCF8 and from 0xD00 up go to the bus too,
    as on a PC: legacy devices are subtractively decoded behind it)."""
    crs = resource_template(
        word_address(_RES_BUS, 0, 0),
        io_port(pci.config_port, 8),
        word_address(_RES_IO, 0, pci.config_port - 1, _IO_ENTIRE_RANGE),
        word_address(_RES_IO, 0x0D00, 0xFFFF, _IO_ENTIRE_RANGE),
        dword_memory(0xA0000, 0xBFFFF),
        dword_memory(pci.mmio32[0], pci.mmio32[1] - 1),
        qword_memory(pci.mmio64[0], pci.mmio64[1] - 1),
    )
    prt = packages(*(
        packages(integer(slot << 16 | 0xFFFF), integer(pin), integer(0), integer(gsi))
        for slot, pin, gsi in pci.routes
    ))
    bridge = device(
        "PCI0",
        name("_HID", integer(eisa_id("PNP0A08")))
        + name("_CID", integer(eisa_id("PNP0A03")))
        + name("_ADR", integer(0))
        + name("_UID", integer(0))
        + name("_BBN", integer(0))
        + name("_CRS", crs)
        + name("_PRT", prt),
    )
    reserved = device(
        "MRES",
        name("_HID", integer(eisa_id("PNP0C02")))
        + name("_UID", integer(1))
        + name("_CRS", resource_template(memory32_fixed(*pci.ecam, writable=False))),
    )
    return bridge + reserved


def virtio_mmio_devices(windows: Sequence[tuple[int, int, int]]) -> bytes:
    """A LNRO0005 Device per (base, size, gsi) window; b"" for none.

    The interrupt is edge-triggered: the device raises it through a KVM irqfd, which
    pulses the line; Firecracker describes its virtio-mmio devices the same way.
    """
    body = b""
    for i, (base, size, gsi) in enumerate(windows):
        body += device(
            f"VR{i:02X}",
            name("_HID", string("LNRO0005"))
            + name("_UID", integer(i))
            + name("_CRS", resource_template(memory32_fixed(base, size), interrupt(gsi))),
        )
    return body
