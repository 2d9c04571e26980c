"""Tiny ELF images assembled in Python for KVM tests that need an odd or hostile guest.

Each image has one PT_LOAD segment with the given machine code and a PVH entry note,
so it boots through the same path as the bundled guests.
"""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100000


def pvh_elf(code: bytes, load_addr: int = LOAD_ADDR, memsz: int | None = None) -> bytes:
    """An ELF64 image whose PVH entry is the first byte of code, loaded at load_addr."""
    ehsize, phentsize = 64, 56
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", load_addr)
    phoff = ehsize
    note_off = phoff + 2 * phentsize
    code_off = (note_off + len(note) + 15) & ~15
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
        2, 62, 1, load_addr, phoff, 0, 0, ehsize, phentsize, 2, 64, 0, 0,
    )
    load = struct.pack(
        "<IIQQQQQQ", 1, 7, code_off, load_addr, load_addr, len(code),
        memsz if memsz is not None else len(code), 0x1000,
    )
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    out = bytearray(ehdr + load + pnote + note)
    out += b"\0" * (code_off - len(out))
    return bytes(out + code)


def out_byte(port: int, value: int) -> bytes:
    """mov al, value; out port, al (port < 256)."""
    return bytes([0xB0, value, 0xE6, port])


def serial_print(text: bytes) -> bytes:
    """Code writing text to COM1 (mov dx, 0x3f8; mov al, c; out dx, al ...)."""
    code = bytes([0x66, 0xBA, 0xF8, 0x03])
    for c in text:
        code += bytes([0xB0, c, 0xEE])
    return code


def exit_with(status: int) -> bytes:
    """Write status to the debug-exit port 0xf4, then hlt."""
    return out_byte(0xF4, status) + b"\xf4"
