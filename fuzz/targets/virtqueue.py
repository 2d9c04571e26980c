"""A split virtqueue (virtio/queue.py) over guest RAM the fuzzer writes: descriptor
table, indirect tables, available ring and used ring are its bytes, placed at aligned,
unaligned, edge and outside-RAM addresses, with random size and features. The device
side then pops, reads, writes and returns every chain as a device would.

Allowed: QueueError (the device would then need a reset). Invariants: chains stay in
guest RAM (GuestMemory would refuse otherwise), a chain's lengths add up, and the
queue's state survives save/restore exactly.
"""

from __future__ import annotations

from corevisor.virtio.queue import Queue, QueueError
from fuzz.common import Cursor, guest_memory

RAM = 2 << 20  # the smallest guest; the rings live in its first 64 KiB
MAX_SIZE = 256
_SIZES = (1, 2, 4, 8, 16, 32, 256, 3, 0, 512)
_PLACES = (0x1000, 0x2000, 0x3000, 0x8000, 0x2001, 0x3002, RAM - 8, RAM, 0, 2**64 - 16)
_CHUNK = 4096


def _place(c: Cursor, default: int) -> int:
    sel = c.u(1)
    if sel < 0xC0:
        return default
    if sel < 0xF0:
        return c.pick(_PLACES)
    return c.u(8)


def one_input(data: bytes) -> None:
    mem = guest_memory(RAM)
    c = Cursor(data)
    mode = c.u(1)
    q = Queue(mem, MAX_SIZE)
    q.size = c.pick(_SIZES) if mode & 0x80 else 16
    q.desc_table = _place(c, 0x1000)
    q.avail_ring = _place(c, 0x2000)
    q.used_ring = _place(c, 0x3000)
    mem.fill(0, 0x10000)
    # The rest of the input is RAM: descriptors, rings, indirect tables, data.
    body = c.take(0x10000 - 0x1000)
    mem.write(0x1000, body)
    try:
        q.activate(event_idx=bool(mode & 1), indirect=bool(mode & 2))
        for _ in range(64):
            chain = q.pop()
            if chain is None:
                break
            reader, writer = chain.reader(), chain.writer()
            assert reader.remaining == chain.readable_len
            assert writer.remaining == chain.writable_len
            reader.read(min(reader.remaining, _CHUNK))
            writer.write(bytes(min(writer.remaining, _CHUNK)))
            q.add_used(chain.head, writer.written)
            q.needs_notification()
    except QueueError:
        pass
    state = q.save()
    twin = Queue(mem, MAX_SIZE)
    twin.restore(state)
    assert twin.save() == state
