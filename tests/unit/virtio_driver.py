"""A driver-side fake for virtio tests: lays out split virtqueues in a real GuestMemory.

The one place a fake is right (DESIGN.md convention 12): the real driver is a guest
kernel, which cannot run in a unit test. It does what a virtio driver does, through
the same bytes in guest RAM and the same virtio-mmio registers, and nothing more: a
bump allocator for buffers, descriptor chains (direct or indirect), the available
ring, and reading back the used ring.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from corevisor.memory import GuestMemory
from corevisor.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from corevisor.virtio.mmio import (
    REG,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioMmio,
)
from corevisor.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

MIB = 1 << 20


@dataclass
class FakeQueue:
    """The driver's view of one split virtqueue in guest RAM."""

    mem: GuestMemory
    size: int
    desc: int
    avail: int
    used: int
    free_head: int = 0
    avail_idx: int = 0
    last_used: int = 0

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add_chain(self, bufs: list[tuple[int, int, bool]], indirect_at: int | None = None) -> int:
        """Post (gpa, len, device_writable) buffers as one chain; return its head."""
        head = self.free_head % self.size
        if indirect_at is not None:
            for i, (addr, length, w) in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                )
                self.write_desc(indirect_at, i, addr, length, flags, i + 1)
            self.write_desc(self.desc, head, indirect_at, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.free_head += 1
        else:
            for i, (addr, length, w) in enumerate(bufs):
                idx = (head + i) % self.size
                last = i + 1 == len(bufs)
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(self.desc, idx, addr, length, flags, (idx + 1) % self.size)
            self.free_head += len(bufs)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def get_used(self) -> list[tuple[int, int]]:
        """(head, len) of every used entry since the last call."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)


@dataclass
class FakeDriver:
    """Brings a VirtioMmio up the way Linux's virtio_mmio does, through its registers."""

    dev: VirtioMmio
    mem: GuestMemory
    next_free: int = 0x10000
    queues: list[FakeQueue] = field(default_factory=list)

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next_free + align - 1) & ~(align - 1)
        self.next_free = addr + size
        return addr

    def w32(self, off: int, value: int) -> None:
        self.dev.write(off, struct.pack("<I", value))

    def r32(self, off: int) -> int:
        value: int = struct.unpack("<I", self.dev.read(off, 4))[0]
        return value

    def negotiate(self, features: int | None = None) -> int:
        self.w32(REG.STATUS, 0)
        self.w32(REG.STATUS, STATUS_ACKNOWLEDGE)
        self.w32(REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w32(REG.DEVICE_FEATURES_SEL, sel)
            offered |= self.r32(REG.DEVICE_FEATURES) << (32 * sel)
        want = offered if features is None else features
        for sel in (0, 1):
            self.w32(REG.DRIVER_FEATURES_SEL, sel)
            self.w32(REG.DRIVER_FEATURES, (want >> (32 * sel)) & 0xFFFFFFFF)
        self.w32(REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return want

    def setup_queue(self, index: int, size: int | None = None) -> FakeQueue:
        self.w32(REG.QUEUE_SEL, index)
        size = size or self.r32(REG.QUEUE_NUM_MAX)
        desc = self.alloc(16 * size, 16)
        avail = self.alloc(6 + 2 * size, 2)
        used = self.alloc(6 + 8 * size, 4)
        self.w32(REG.QUEUE_NUM, size)
        for reg, addr in (
            (REG.QUEUE_DESC_LOW, desc),
            (REG.QUEUE_DRIVER_LOW, avail),
            (REG.QUEUE_DEVICE_LOW, used),
        ):
            self.w32(reg, addr & 0xFFFFFFFF)
            self.w32(reg + 4, addr >> 32)
        self.w32(REG.QUEUE_READY, 1)
        q = FakeQueue(self.mem, size, desc, avail, used)
        self.queues.append(q)
        return q

    def start(self, features: int | None = None) -> int:
        """Negotiate, set up every queue, DRIVER_OK; return the features in use."""
        f = self.negotiate(features)
        n = len(self.dev.queues)
        for i in range(n):
            self.setup_queue(i)
        self.w32(
            REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        )
        return f


ALL_RING_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC
