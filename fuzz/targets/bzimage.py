"""The bzImage side of the loader: the setup header parser, placing the kernel in 64 MiB
of guest RAM, the zero page built from that header, and vmlinux extraction (payload
decompression, bounded against decompression bombs).

Allowed outcome besides success: LoaderError.
"""

from __future__ import annotations

from pathlib import Path

from corevisor.arch.x86_64.bootparams import write_zero_page
from corevisor.errors import LoaderError
from corevisor.loader import bzimage
from fuzz.common import guest_memory

RAM = 64 << 20


def one_input(data: bytes) -> None:
    mem = guest_memory(RAM)
    try:
        hdr = bzimage.parse_setup_header(data, "fuzz.bzImage")
    except LoaderError:
        return
    try:
        img = bzimage.load_bzimage(mem, Path("fuzz.bzImage"), data)
        write_zero_page(mem, img.boot_header, b"console=ttyS0", 0xE0000, (0x3000000, 0x1000))
        assert img.start < img.end <= mem.regions[0].end
    except LoaderError:
        pass
    if hdr.payload_length:
        try:
            out = bzimage.extract_vmlinux(data, "fuzz.bzImage")
            assert out.startswith(b"\x7fELF") and len(out) <= bzimage.MAX_VMLINUX
        except LoaderError:
            pass
