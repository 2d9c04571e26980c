"""Hand-assembled AML (ACPI 6.5, chapter 20) for the few DSDT objects corevisor emits.

Only what the DSDT needs: a Scope(\\_SB) holding one Device per virtio-mmio window with
_HID "LNRO0005" (the ID Linux's virtio_mmio driver matches), _UID and a _CRS of one
Memory32Fixed and one Extended Interrupt descriptor. Bytes are built by small
functions, each named after the AML term it encodes, so a reader can check them
against the specification; tests disassemble the result with `iasl -d`.

What does not live here: the table headers and layout (acpi.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

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


def virtio_mmio_devices(windows: Sequence[tuple[int, int, int]]) -> bytes:
    """Scope(\\_SB) with a LNRO0005 Device per (base, size, gsi) window; b"" for none.

    The interrupt is edge-triggered: the device raises it through a KVM irqfd, which
    pulses the line; Firecracker describes its virtio-mmio devices the same way.
    """
    if not windows:
        return b""
    body = b""
    for i, (base, size, gsi) in enumerate(windows):
        body += device(
            f"VR{i:02X}",
            name("_HID", string("LNRO0005"))
            + name("_UID", integer(i))
            + name("_CRS", resource_template(memory32_fixed(base, size), interrupt(gsi))),
        )
    return scope(b"\x5c" + name_seg("_SB"), body)
