"""Loading a Linux bzImage by the x86 boot protocol, and extracting the vmlinux inside it.

A bzImage is a small real-mode setup program (setup_sects + 1 sectors, with the *setup
header* at 0x1f1) followed by the protected-mode kernel: a self-decompressing stub
whose payload is the compressed vmlinux ELF. corevisor uses the 64-bit boot protocol
(Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): skip the real-mode code,
copy the protected-mode kernel to its load address, and enter it in long mode at
load address + 0x200 (startup_64) with rsi pointing at the zero page. Firecracker's
linux-loader and kvmtool do the same.

The minimum protocol version is **2.12** (Linux 3.8). Only from 2.12 does a kernel say,
in xloadflags (XLF_KERNEL_64), that the 64-bit entry at +0x200 exists; older headers
would make us jump there on faith. 2.12 also implies everything else we read:
cmdline_size (2.06), payload_offset/length (2.08), pref_address and init_size (2.10).

What lives here: parsing and checking the setup header, placing the protected-mode
kernel, and extract_vmlinux (the payload decompressed with Python's own lzma/gzip/bz2,
or the zstd command). What does not: the zero page (arch/x86_64/bootparams.py), the
initrd (initrd.py), and registers (the builder, with cpu.setup_long_mode).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from corevisor import inputs
from corevisor.arch.x86_64.layout import HIGH_MEMORY_START
from corevisor.errors import GuestMemoryError, LoaderError, show
from corevisor.loader.elf import LoadedImage
from corevisor.memory import GuestMemory

SETUP_HEADER_OFFSET = 0x1F1
HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C  # 2.12: XLF_KERNEL_64 tells us the 64-bit entry exists
ENTRY_64_OFFSET = 0x200  # startup_64, relative to the protected-mode kernel's start
LOADED_HIGH = 1 << 0  # loadflags: protected-mode code goes at 0x100000, not 0x10000
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
# A header that claims more setup sectors than this is corrupt (the field is a byte,
# but real kernels use a few dozen; 0 means the historical 4).
DEFAULT_SETUP_SECTS = 4

# The setup header fields this loader reads, as (offset in the file, struct format);
# offsets follow boot.rst's table, which the zero page (boot_params) shares.
_FIELDS: dict[str, tuple[int, str]] = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "4s"),
    "version": (0x206, "H"),
    "kernel_version": (0x20E, "H"),
    "loadflags": (0x211, "B"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}
# Bounds on what extraction reads and produces: Debian's bzImage is ~8 MiB and its
# vmlinux ~60 MiB; far beyond either is not a kernel.
MAX_BZIMAGE = 256 << 20
MAX_VMLINUX = 1 << 30
HEADER_MIN_END = 0x264  # through init_size: what a 2.12 header must have


@dataclass(frozen=True)
class SetupHeader:
    """The parts of a bzImage's setup header that decide how it is loaded.

    raw is the header exactly as in the file (0x1f1 up to 0x202 + the jump byte), which
    the zero page must start from: the kernel reads its own fields back from there.
    """

    raw: bytes
    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    kernel_version: str

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel (after the boot sector and setup)."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(data: bytes) -> bool:
    """True if data carries a Linux setup header ("HdrS" at 0x202)."""
    return data[0x202:0x206] == HDRS_MAGIC


def _field(data: bytes, name: str) -> int:
    offset, fmt = _FIELDS[name]
    value: int = struct.unpack_from("<" + fmt, data, offset)[0]
    return value


def _kernel_version(data: bytes, pointer: int) -> str:
    """The version string the header points at (offset + 0x200), or "" if unreadable."""
    if pointer == 0:
        return ""
    at = pointer + 0x200
    text = data[at : at + 128].split(b"\0", 1)[0]
    return text.decode("ascii", "replace").split(" ", 1)[0]


def parse_setup_header(data: bytes, name: str) -> SetupHeader:
    """Parse and check a bzImage's setup header; LoaderError names the first problem."""
    if len(data) < 0x206 or not is_bzimage(data):
        raise LoaderError(f'{name}: not a Linux bzImage (no "HdrS" setup header at 0x202)')
    if len(data) < HEADER_MIN_END:
        raise LoaderError(f"{name}: truncated bzImage setup header ({len(data)} bytes)")
    version = _field(data, "version")
    text = f"{version >> 8}.{version & 0xFF:02d}"
    if version < MIN_PROTOCOL:
        raise LoaderError(
            f"{name}: Linux boot protocol {text} is too old (corevisor needs 2.12, Linux 3.8+, "
            "for the 64-bit entry point)"
        )
    if _field(data, "boot_flag") != BOOT_FLAG:
        raise LoaderError(f"{name}: bad bzImage boot_flag {_field(data, 'boot_flag'):#x}")
    header_end = 0x202 + (_field(data, "jump") >> 8)
    if header_end < HEADER_MIN_END or header_end > len(data):
        raise LoaderError(f"{name}: bzImage setup header ends at {header_end:#x}, which is bad")
    loadflags = _field(data, "loadflags")
    if not loadflags & LOADED_HIGH:
        raise LoaderError(f"{name}: a zImage (loaded below 1 MiB), not a bzImage")
    xloadflags = _field(data, "xloadflags")
    if not xloadflags & XLF_KERNEL_64:
        raise LoaderError(f"{name}: kernel has no 64-bit entry point (a 32-bit kernel?)")
    setup_sects = _field(data, "setup_sects") or DEFAULT_SETUP_SECTS
    hdr = SetupHeader(
        raw=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        version=version,
        setup_sects=setup_sects,
        loadflags=loadflags,
        xloadflags=xloadflags,
        initrd_addr_max=_field(data, "initrd_addr_max"),
        kernel_alignment=_field(data, "kernel_alignment"),
        relocatable=bool(_field(data, "relocatable_kernel")),
        cmdline_size=_field(data, "cmdline_size"),
        payload_offset=_field(data, "payload_offset"),
        payload_length=_field(data, "payload_length"),
        pref_address=_field(data, "pref_address"),
        init_size=_field(data, "init_size"),
        kernel_version=_kernel_version(data, _field(data, "kernel_version")),
    )
    if hdr.kernel_offset >= len(data):
        raise LoaderError(
            f"{name}: setup ({hdr.setup_sects} sectors) covers the whole file; no kernel follows"
        )
    if hdr.kernel_alignment & (hdr.kernel_alignment - 1):
        raise LoaderError(f"{name}: kernel_alignment {hdr.kernel_alignment:#x} is not a power of 2")
    return hdr


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:#x} bytes"


def load_address(hdr: SetupHeader) -> int:
    """Where the protected-mode kernel goes.

    A relocatable kernel runs where it is put, so it goes at pref_address (aligned to
    kernel_alignment), where it would decompress to anyway: the decompressor then
    need not move itself. A non-relocatable one goes at the traditional 1 MiB and
    decompresses to its link address (pref_address) on its own.
    """
    if hdr.relocatable and hdr.pref_address >= HIGH_MEMORY_START:
        align = max(hdr.kernel_alignment, 1)
        return (hdr.pref_address + align - 1) & ~(align - 1)
    return HIGH_MEMORY_START


def load_bzimage(mem: GuestMemory, path: Path, data: bytes) -> LoadedImage:
    """Copy a bzImage's protected-mode kernel into guest RAM; return where it went.

    end is the top of what the kernel will use while booting (load address or
    pref_address, whichever is higher, plus init_size): the initrd must stay above it.
    Nothing is written unless all of it fits.
    """
    name = show(path)  # safe to print, whatever bytes the path holds
    hdr = parse_setup_header(data, name)
    kernel = memoryview(data)[hdr.kernel_offset :]
    load = load_address(hdr)
    end = max(load, hdr.pref_address) + max(hdr.init_size, len(kernel))
    ram_end = mem.regions[0].end
    if end > ram_end:
        raise LoaderError(
            f"{name}: kernel needs guest RAM up to {end:#x} (init_size {_size(hdr.init_size)} "
            f"from {max(load, hdr.pref_address):#x}), but the guest has {_size(mem.size)} "
            f"below {ram_end:#x}; use more memory"
        )
    try:
        mem.write(load, kernel)
    except GuestMemoryError as e:  # pragma: no cover - the check above rules this out
        raise LoaderError(f"{name}: {e}") from e
    return LoadedImage(
        path=path,
        kind="bzimage",
        entry=load + ENTRY_64_OFFSET,
        start=load,
        end=end,
        boot_header=hdr.raw,
    )


# --- vmlinux extraction -------------------------------------------------------------------


def _zstd(payload: bytes, name: str) -> bytes:
    """zstd through the zstd command: Python gains compression.zstd only in 3.14."""
    import shutil  # here, not at the top: only extraction needs them, start-up time counts
    import subprocess
    import threading

    tool = shutil.which("zstd")
    if tool is None:
        raise LoaderError(f"{name}: payload is zstd-compressed; install the zstd command")
    # Read its output only up to the bound, so a hostile frame cannot fill our memory.
    with subprocess.Popen(
        [tool, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        feeder = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
        feeder.start()
        out = proc.stdout.read(MAX_VMLINUX + 1)
        if len(out) > MAX_VMLINUX:
            proc.kill()
        err = proc.stderr.read(4096)
        proc.wait()
        feeder.join()
    if proc.returncode != 0 and len(out) <= MAX_VMLINUX:
        raise LoaderError(f"{name}: zstd failed: {err.decode(errors='replace').strip()}")
    return _bounded(out, name)


def _feed(pipe: IO[bytes], payload: bytes) -> None:
    """Write the payload to zstd's stdin (from a thread: its stdout is read meanwhile)."""
    try:
        pipe.write(payload)
        pipe.close()
    except OSError:
        pass  # zstd stopped reading: it failed or was killed past the bound


def _bounded(out: bytes, name: str) -> bytes:
    if len(out) > MAX_VMLINUX:
        raise LoaderError(
            f"{name}: payload decompresses to more than {MAX_VMLINUX >> 20} MiB: not a vmlinux"
        )
    return out


def _decompress(payload: bytes, name: str) -> bytes:
    """Decompress the payload by its magic; the kernel appends its size, which is ignored."""
    import bz2  # only extraction needs the codecs; every VM start imports this module
    import lzma
    import zlib

    # Each decompressor stops one byte past the bound, so a small hostile payload (a
    # "decompression bomb") costs at most MAX_VMLINUX of memory before it is refused.
    limit = MAX_VMLINUX + 1
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            return _bounded(xz.decompress(payload, max_length=limit), name)
        if payload.startswith(b"\x5d\x00\x00"):
            alone = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
            return _bounded(alone.decompress(payload, max_length=limit), name)
        if payload.startswith(b"\x1f\x8b"):
            return _bounded(zlib.decompressobj(wbits=31).decompress(payload, limit), name)
        if payload.startswith(b"BZh"):
            return _bounded(bz2.BZ2Decompressor().decompress(payload, max_length=limit), name)
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as e:
        raise LoaderError(f"{name}: corrupt compressed kernel: {e}") from e
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return _zstd(payload, name)
    kinds = {b"\x02\x21\x4c\x18": "lz4", b"\x89LZO": "lzo"}
    for magic, kind in kinds.items():
        if payload.startswith(magic):
            raise LoaderError(f"{name}: payload is {kind}-compressed, which corevisor cannot read")
    raise LoaderError(f"{name}: unknown payload compression (magic {payload[:4].hex()})")


def extract_vmlinux(data: bytes, name: str) -> bytes:
    """The uncompressed vmlinux ELF inside a bzImage (found by payload_offset/length).

    It carries the kernel's PVH entry note, so it boots by the PVH protocol without the
    decompressor, which on a host that emulates all CPL0 code takes minutes.
    """
    hdr = parse_setup_header(data, name)
    start = hdr.kernel_offset + hdr.payload_offset
    end = start + hdr.payload_length
    if hdr.payload_length == 0 or end > len(data):
        raise LoaderError(
            f"{name}: payload ({start:#x}+{hdr.payload_length:#x}) is outside the file"
        )
    out = _decompress(data[start:end], name)
    if not out.startswith(b"\x7fELF"):
        raise LoaderError(f"{name}: decompressed payload is not an ELF vmlinux")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m corevisor.loader.bzimage BZIMAGE VMLINUX`: write the extracted vmlinux."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m corevisor.loader.bzimage BZIMAGE VMLINUX", file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    try:
        data = inputs.read_file(src, str(src), limit=MAX_BZIMAGE, why="a bzImage can be",
                                error=LoaderError)
        dst.write_bytes(extract_vmlinux(data, str(src)))
    except (OSError, LoaderError) as e:
        print(f"corevisor: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
