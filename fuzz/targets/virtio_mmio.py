"""The virtio-mmio v2 transport's registers (features, status, queue layout, notify,
interrupt ack, device config) driving real devices (rng, blk on a 64 KiB image file,
console) over 2 MiB of guest RAM whose first 64 KiB the fuzzer also writes.

Nothing may escape: a hostile driver gets DEVICE_NEEDS_RESET, never an exception.
Invariants: every read returns the size asked for, and the transport's state survives
a save/restore round trip into a fresh transport for the same device.
"""

from __future__ import annotations

import functools
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from corevisor.virtio.blk import Blk
from corevisor.virtio.console import Console
from corevisor.virtio.device import VirtioDevice
from corevisor.virtio.mmio import REG, VirtioMmio
from corevisor.virtio.rng import Rng
from fuzz.common import Cursor, guest_memory, restores_to_itself

RAM = 2 << 20
_REGS = tuple(v for k, v in vars(REG).items() if k.isupper())
_REGS += (0x104, 0x108, 0x10C, 0x1FF, 0x200, 0xFFC)  # device config, its end, beyond
_VALUES = (0, 1, 2, 3, 4, 8, 0xB, 0xF, 16, 0x1000, 0x2000, 0x3000, 0xFFFFFFFF, 1 << 31)


@functools.cache
def _disk() -> Path:
    path = Path(tempfile.mkdtemp(prefix="corevisor-fuzz-blk-")) / "disk.img"
    path.write_bytes(bytes(64 << 10))
    return path


_DEVICES: tuple[Callable[[], VirtioDevice], ...] = (
    Rng,
    lambda: Blk(_disk(), readonly=True),  # read-only: many fuzz processes may share it
    lambda: Console(lambda data: None),
)


def one_input(data: bytes) -> None:
    mem = guest_memory(RAM)
    c = Cursor(data)
    make = c.pick(_DEVICES)
    reports: list[str] = []
    dev = VirtioMmio(make(), mem, reports.append)
    try:
        mem.fill(0, 0x10000)
        mem.write(0x1000, c.take(c.u(2) % 0x4000))
        while c.left:
            op = c.u(1)
            offset = c.pick(_REGS) if op & 0x40 else c.u(2) % 0x1004
            size = (4, 4, 4, 1, 2, 8, 0, 3)[op & 7]
            if op & 0x80:
                value = c.pick(_VALUES) if op & 0x20 else c.u(4)
                dev.write(offset, struct.pack("<Q", value)[:size])
            elif op & 0x20:
                dev.handle_queue(c.u(1) % len(dev.queues))  # what a kick ends in
                for fd in dev.device.fds():
                    dev.handle_fd(fd)
            else:
                got = dev.read(offset, size)
                assert len(got) == size, (offset, size, got)
        restores_to_itself(dev.save(), VirtioMmio(make(), mem, reports.append))
    finally:
        dev.close()



