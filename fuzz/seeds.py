"""Write the seed corpus (fuzz/corpus/TARGET/seed-*): small valid inputs for each target,
built from the same fixtures the unit tests use, so the fuzzer starts from inputs that
reach deep into each parser. ``python -m fuzz.seeds`` rewrites them; files not named
seed-* (crash reproducers) are left alone.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from fuzz.run import CORPUS


def _elf() -> dict[str, bytes]:
    from tests.unit.test_elf_loader import mb_header, multiboot32, pvh64

    kludge = mb_header(0x3, (0x100000, 0x100000, 0, 0, 0x100020))
    return {"pvh64": pvh64(), "multiboot32": multiboot32(), "kludge": kludge + bytes(64)}


def _bzimage() -> dict[str, bytes]:
    import gzip
    import lzma

    from tests.unit.test_bzimage import make_bzimage
    from tests.unit.test_elf_loader import pvh64

    return {
        "plain": make_bzimage(),
        "gzip": make_bzimage(payload=gzip.compress(pvh64(), mtime=0)),
        "xz": make_bzimage(payload=lzma.compress(pvh64())),
    }


def _system_file() -> dict[str, bytes]:
    one = '[partitions.a]\nimage = "k.elf"\ncpus = 1\nmemory = "16M"\ncmdline = "exit=0"\n'
    two = (
        '[system]\nlog_dir = "logs"\n'
        '[partitions.a]\nimage = "k.elf"\nmemory = "16M"\npin = [0]\nrestart = "restart"\n'
        'watchdog_ms = 500\nblk = [{path = "d.img", readonly = true}]\nrng = true\n'
        '[partitions.b]\nimage = "k.elf"\nmemory = "8M"\nserial = "file:b.log"\n'
        'dedicated = false\ngdb = "127.0.0.1:1234"\n'
        '[channels.c]\nbetween = ["a", "b"]\nsize = "8K"\ndirection = "a->b"\n'
        'doorbell = "thread"\n'
    )
    return {"one": one.encode(), "two": two.encode()}


def _gdb() -> dict[str, bytes]:
    from corevisor.gdb import protocol as p

    session = [b"qSupported:multiprocess+", b"?", b"Hg1", b"g", b"p10", b"m100000,40",
               b"M100000,2:9090", b"X100000,1:\x90", b"Z0,100000,1", b"z0,100000,1",
               b"Z1,100000,1", b"qXfer:features:read:target.xml:0,fff", b"qfThreadInfo",
               b"qThreadExtraInfo,1", b"T1", b"vCont?", b"QStartNoAckMode", b"P0=0100000000000000"]
    stream = b"+".join(p.frame(x) for x in session)
    return {"session": stream, "nack": b"-" + p.frame(b"g") + b"\x03", "bad": b"$g#00"}


def _virtqueue() -> dict[str, bytes]:
    # mode, three placement bytes (defaults), then RAM from 0x1000: a 16-entry table
    # at 0x1000 whose first chain is header/data/status, avail ring at 0x2000 naming it.
    ram = bytearray(0x1400)
    for i, (addr, length, flags) in enumerate(((0x8000, 16, 1), (0x8100, 512, 3),
                                               (0x8400, 1, 2))):
        struct.pack_into("<QIHH", ram, 16 * i, addr, length, flags, i + 1)
    struct.pack_into("<HHH", ram, 0x1000, 0, 1, 0)
    return {"chain": bytes([0x00, 0, 0, 0]) + bytes(ram),
            "event-idx-indirect": bytes([0x03, 0, 0, 0]) + bytes(ram)}


def _virtio_mmio() -> dict[str, bytes]:
    def w(reg: int, value: int) -> bytes:  # a write op with a raw offset and value
        return bytes([0x80 | 0x00]) + struct.pack("<HI", reg, value)

    ops = (w(0x70, 0) + w(0x70, 3) + w(0x24, 1) + w(0x20, 1) + w(0x70, 0xB)
           + w(0x30, 0) + w(0x38, 16) + w(0x80, 0x1000) + w(0x90, 0x2000) + w(0xA0, 0x3000)
           + w(0x44, 1) + w(0x70, 0xF) + bytes([0x20, 0]) + bytes([0x00]) + struct.pack("<H", 0x70))
    return {f"dev{i}": bytes([i]) + struct.pack("<H", 0) + ops for i in range(3)}


def _virtio_pci() -> dict[str, bytes]:
    def cfg(reg: int, value: int, size: int = 4) -> bytes:  # an ECAM write, raw offset
        code = {4: 0, 2: 2, 1: 3}[size]
        return bytes([0x40 | code]) + struct.pack("<I", value) + struct.pack("<H", reg)

    def bar4(off: int, value: int, size: int) -> bytes:  # a BAR 4 write, raw offset
        code = {4: 0, 2: 2, 1: 3}[size]
        return bytes([0x60 | code]) + struct.pack("<I", value) + struct.pack("<H", off)

    ops = (cfg(0x20, 0xE010_0000) + cfg(0x24, 0) + cfg(0x04, 6, 2) + bar4(0x14, 0, 1)
           + bar4(0x14, 3, 1) + bar4(0x08, 1, 4) + bar4(0x0C, 1, 4) + bar4(0x14, 0xB, 1)
           + bar4(0x16, 0, 2) + bar4(0x18, 16, 2) + bar4(0x20, 0x1000, 4)
           + bar4(0x28, 0x2000, 4) + bar4(0x30, 0x3000, 4) + bar4(0x1C, 1, 2)
           + bar4(0x14, 0xF, 1) + bytes([0x50, 0]))
    return {f"dev{i}": bytes([i]) + struct.pack("<H", 0) + ops for i in range(3)}


def _ports() -> dict[str, bytes]:
    from corevisor.hypercall import HYPERCALL_PORT
    from fuzz.targets import ports

    _, port_list = ports._bus()
    hc = port_list.index(HYPERCALL_PORT)
    blocks = bytearray(0x1000)
    for nr in range(9):  # every call of ABI 1.0, and one unknown number
        # console write: gpa 0x1800 (inside the blocks), 16 bytes; others: small args
        args = (0x1800, 16, 0, 0, 0) if nr == 1 else (nr % 3, 100, 0, 0, 0)
        struct.pack_into("<6Q", blocks, 64 * nr, nr, *args)
    calls = b"".join(bytes([0xE2, hc, i]) for i in range(4))  # _GPAS[0..3]: blocks 0..3
    calls += b"".join(bytes([0xE2, hc, 0]) for _ in range(2))
    head = struct.pack("<H", len(blocks)) + bytes(blocks)
    return {"calls": head + calls, "uart-rtc": struct.pack("<H", 0) + _device(8)["walk"]}


def _fw_cfg() -> dict[str, bytes]:
    # select the signature, read it byte by byte; a DMA read of etc/e820 (select bit)
    select = bytes([0, 0])  # op 0, key from the table (0x00)
    reads = bytes([1, 0, 0]) * 4
    dma = bytes([4]) + struct.pack("<I", 0x000A0002 | (0x20 << 16)) + bytes([2, 0])
    return {"signature": bytes([0]) + select + reads, "dma": bytes([0]) + dma + reads}


def _device(span: int) -> dict[str, bytes]:
    return {"walk": bytes(b for off in range(span) for b in (0x80, off, 0x55, 0x00, off)),
            "save": bytes([0x3F, 0]) * 4}


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "elf": _elf,
    "bzimage": _bzimage,
    "system_file": _system_file,
    "gdb_protocol": _gdb,
    "gdb_server": _gdb,
    "virtqueue": _virtqueue,
    "virtio_mmio": _virtio_mmio,
    "virtio_pci": _virtio_pci,
    "ports": _ports,
    "fw_cfg": _fw_cfg,
    "uart": lambda: _device(8),
    "rtc": lambda: _device(2),
    "i8042": lambda: _device(5),
}


def main() -> int:
    for target, make in SEEDS.items():
        d: Path = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for name, data in make().items():
            (d / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(list(d.glob('seed-*')))} seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
