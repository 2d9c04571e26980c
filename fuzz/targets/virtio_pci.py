"""The virtio-pci transport and the PCI bus around it: configuration space through ports
0xCF8/0xCFC and ECAM (BARs, COMMAND, the capabilities: MSI-X's control word, virtio's
configuration-access window), the two BARs (MSI-X table and pending bits; common
configuration, ISR, device configuration, notifications), driving real devices (rng,
blk on a 64 KiB read-only image, console) over 2 MiB of guest RAM whose first 64 KiB
the fuzzer also writes.

Nothing may escape: a hostile driver gets DEVICE_NEEDS_RESET, never an exception.
Invariants: every read returns the size asked for; the function's identity never
changes; every BAR stays aligned to its size; the state survives a save/restore round
trip into a fresh function for the same device.
"""

from __future__ import annotations

import struct

from corevisor.pci.host import ConfigPorts, Ecam, HostBridge, PciRoot
from corevisor.virtio.pci import COMMON, ISR, NOTIFY, VirtioPci, device_id
from fuzz.common import Cursor, guest_memory, restores_to_itself
from fuzz.targets.virtio_mmio import _DEVICES

RAM = 2 << 20
SLOT = 1
_OFFSETS = (COMMON + o for o in range(0, 0x38, 2))
_BAR4 = (*_OFFSETS, ISR, NOTIFY, NOTIFY + 4, 0x2000, 0x2004, 0x2010, 0x3FFC, 0x4000)
_CONFIG = (0x04, 0x06, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x3C, 0x40, 0x42, 0x44, 0x48,
           0x4C, 0x50, 0x90, 0x94, 0x98, 0x9C, 0xA0, 0xA2, 0xFC, 0x100, 0xFFC)
_VALUES = (0, 1, 2, 3, 4, 6, 8, 0xF, 0x8000, 0xC000, 0xFFFF, 0x1000, 0xE010_0000,
           0xFFFFFFFF, 1 << 31)


def one_input(data: bytes) -> None:
    mem = guest_memory(RAM)
    c = Cursor(data)
    make = c.pick(_DEVICES)
    reports: list[str] = []
    dev = VirtioPci(make(), mem, reports.append)
    root = PciRoot(HostBridge())
    root.add(dev.function, SLOT)
    ports, ecam = ConfigPorts(root, lambda: None), Ecam(root)
    try:
        mem.fill(0, 0x10000)
        mem.write(0x1000, c.take(c.u(2) % 0x4000))
        while c.left:
            op = c.u(1)
            size = (4, 4, 2, 1, 8, 0, 3, 4)[op & 7]
            value = c.pick(_VALUES) if op & 0x08 else c.u(4)
            raw = struct.pack("<Q", value)[:size]
            kind = (op >> 4) & 7
            if kind == 0:  # configuration space through ECAM
                reg = c.pick(_CONFIG) if op & 0x80 else c.u(2) % 0x1004
                at = SLOT << 15 | reg
                ecam.write(at, raw) if op & 0x40 else _read(ecam.read(at, size), size)
            elif kind == 1:  # through 0xCF8/0xCFC
                reg = c.pick(_CONFIG) if op & 0x80 else c.u(1)
                ports.write(0, struct.pack("<I", 0x8000_0000 | SLOT << 11 | (reg & 0xFC)))
                port = 4 + (reg & 3)
                ports.write(port, raw) if op & 0x40 else _read(ports.read(port, size), size)
            elif kind in (2, 3):  # BAR 4: virtio's registers
                off = c.pick(_BAR4) if op & 0x80 else c.u(2) % 0x4010
                dev.bar_write(4, off, raw) if op & 0x40 else _read(dev.bar_read(4, off, size), size)
            elif kind == 4:  # BAR 1: MSI-X table and PBA
                off = c.u(2) % 0x1010
                dev.bar_write(1, off, raw) if op & 0x40 else _read(dev.bar_read(1, off, size), size)
            else:  # what a kick or a host fd ends in
                dev.handle_queue(c.u(1) % len(dev.queues))
                for fd in dev.device.fds():
                    dev.handle_fd(fd)
        f = dev.function
        assert f.read(0, 2) == 0x1AF4 and f.read(2, 2) == device_id(dev.device.device_type)
        for index, bar in f.bars.items():
            assert f.bar_address(index) % bar.size == 0, (index, f.bar_address(index))
        restores_to_itself(dev.save(), VirtioPci(make(), mem, reports.append))
    finally:
        dev.close()


def _read(got: bytes, size: int) -> None:
    assert len(got) == max(size, 0), (size, got)
