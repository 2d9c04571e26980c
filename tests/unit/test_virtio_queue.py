"""Split virtqueues over real GuestMemory: good chains work, hostile ones raise QueueError."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from corevisor.memory import GuestMemory
from corevisor.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    QueueError,
)
from tests.unit.virtio_driver import MIB, FakeQueue

SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, MIB)])
    yield m
    m.close()


def make(
    mem: GuestMemory, event_idx: bool = False, indirect: bool = True
) -> tuple[Queue, FakeQueue]:
    q = Queue(mem, SIZE)
    q.desc_table, q.avail_ring, q.used_ring = DESC, AVAIL, USED
    q.ready = True
    q.activate(event_idx=event_idx, indirect=indirect)
    return q, FakeQueue(mem, SIZE, DESC, AVAIL, USED)


def test_direct_chain_splits_readable_and_writable(mem: GuestMemory) -> None:
    q, fq = make(mem)
    mem.write(0x8000, b"hello")
    head = fq.add_chain([(0x8000, 5, False), (0x9000, 3, False), (0xA000, 16, True)])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == [(0x8000, 5), (0x9000, 3)]
    assert chain.writable == [(0xA000, 16)]
    assert chain.reader().read(5) == b"hello"
    w = chain.writer()
    w.write(b"x" * 16)
    with pytest.raises(QueueError, match="device-writable"):
        w.write(b"y")
    q.add_used(chain.head, 16)
    assert fq.get_used() == [(head, 16)]
    assert q.pop() is None


def test_reader_spans_segments(mem: GuestMemory) -> None:
    q, fq = make(mem)
    mem.write(0x8000, b"abc")
    mem.write(0x9000, b"defg")
    fq.add_chain([(0x8000, 3, False), (0x9000, 4, False)])
    chain = q.pop()
    assert chain is not None
    r = chain.reader()
    assert r.read(2) == b"ab" and r.read(4) == b"cdef" and r.remaining == 1
    with pytest.raises(QueueError, match="device-readable"):
        r.read(2)


def test_indirect_chain(mem: GuestMemory) -> None:
    q, fq = make(mem)
    fq.add_chain([(0x8000, 4, False), (0xA000, 8, True)], indirect_at=0x5000)
    chain = q.pop()
    assert chain is not None
    assert chain.readable == [(0x8000, 4)] and chain.writable == [(0xA000, 8)]


def test_ring_wraps_past_65535(mem: GuestMemory) -> None:
    q, fq = make(mem)
    q.next_avail = q.next_used = fq.avail_idx = fq.last_used = 0xFFFE
    mem.write(AVAIL + 2, struct.pack("<H", 0xFFFE))
    for _ in range(4):
        fq.free_head = 0
        head = fq.add_chain([(0xA000, 1, True)])
        chain = q.pop()
        assert chain is not None and chain.head == head
        q.add_used(head, 1)
        assert fq.get_used() == [(head, 1)]
    assert q.next_avail == 2


def _raw_desc(
    mem: GuestMemory, table: int, i: int, addr: int, ln: int, flags: int, nxt: int
) -> None:
    mem.write(table + 16 * i, struct.pack("<QIHH", addr, ln, flags, nxt))


@pytest.mark.parametrize(
    "descs,match",
    [
        # a loop: 0 -> 1 -> 0
        ([(0x8000, 1, VIRTQ_DESC_F_NEXT, 1), (0x8000, 1, VIRTQ_DESC_F_NEXT, 0)], "longer than"),
        # next outside the table
        ([(0x8000, 1, VIRTQ_DESC_F_NEXT, SIZE)], "outside a table"),
        # buffer outside RAM
        ([(2 * MIB, 16, 0, 0)], "outside guest RAM"),
        # address + length wraps 2^64
        ([(2**64 - 8, 16, 0, 0)], "wraps"),
        # readable after writable
        ([(0x8000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (0x9000, 1, 0, 0)], "after a"),
        # indirect table length not a multiple of 16
        ([(0x5000, 24, VIRTQ_DESC_F_INDIRECT, 0)], "multiple of 16"),
        ([(0x5000, 0, VIRTQ_DESC_F_INDIRECT, 0)], "multiple of 16"),
        # indirect + next
        ([(0x5000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)], "NEXT"),
        # indirect table outside RAM
        ([(MIB - 8, 16, VIRTQ_DESC_F_INDIRECT, 0)], "outside guest RAM"),
    ],
)
def test_hostile_chains_raise(
    mem: GuestMemory, descs: list[tuple[int, int, int, int]], match: str
) -> None:
    q, fq = make(mem)
    for i, d in enumerate(descs):
        _raw_desc(mem, DESC, i, *d)
    fq.publish(0)
    with pytest.raises(QueueError, match=match):
        q.pop()


def test_nested_indirect_raises(mem: GuestMemory) -> None:
    q, fq = make(mem)
    _raw_desc(mem, 0x5000, 0, 0x6000, 16, VIRTQ_DESC_F_INDIRECT, 0)
    _raw_desc(mem, DESC, 0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT, 0)
    fq.publish(0)
    with pytest.raises(QueueError, match="nested"):
        q.pop()


def test_indirect_without_feature_raises(mem: GuestMemory) -> None:
    q, fq = make(mem, indirect=False)
    fq.add_chain([(0x8000, 4, False)], indirect_at=0x5000)
    with pytest.raises(QueueError, match="VIRTIO_F_INDIRECT_DESC"):
        q.pop()


def test_indirect_loop_caught(mem: GuestMemory) -> None:
    q, fq = make(mem)
    _raw_desc(mem, 0x5000, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1)
    _raw_desc(mem, 0x5000, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0)
    _raw_desc(mem, DESC, 0, 0x5000, 32, VIRTQ_DESC_F_INDIRECT, 0)
    fq.publish(0)
    with pytest.raises(QueueError, match="longer than"):
        q.pop()


def test_head_out_of_range_and_avail_jump(mem: GuestMemory) -> None:
    q, fq = make(mem)
    fq.publish(SIZE + 3)
    with pytest.raises(QueueError, match="names descriptor"):
        q.pop()
    q2, _ = make(mem)
    mem.write(AVAIL + 2, struct.pack("<H", SIZE + 1))
    with pytest.raises(QueueError, match="ahead"):
        q2.pop()


def test_activate_checks_layout(mem: GuestMemory) -> None:
    q = Queue(mem, SIZE)
    q.desc_table, q.avail_ring, q.used_ring = DESC + 8, AVAIL, USED
    with pytest.raises(QueueError, match="aligned"):
        q.activate(False, False)
    q.desc_table, q.used_ring = DESC, MIB - 8
    with pytest.raises(QueueError, match="outside guest RAM"):
        q.activate(False, False)
    q.used_ring, q.size = USED, 6
    with pytest.raises(QueueError, match="power of 2"):
        q.activate(False, False)


def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    q, fq = make(mem)
    fq.add_chain([(0xA000, 1, True)])
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 0)
    assert q.needs_notification()
    mem.write(AVAIL, struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT))
    assert not q.needs_notification()


def test_event_idx_suppression(mem: GuestMemory) -> None:
    q, fq = make(mem, event_idx=True)
    assert q.pop() is None
    assert fq.avail_event() == 0  # the device asks to be kicked for the first entry
    heads = [fq.add_chain([(0xA000 + 16 * i, 1, True)]) for i in range(3)]
    for h in heads:
        chain = q.pop()
        assert chain is not None and chain.head == h
    assert fq.avail_event() == 3
    fq.set_used_event(1)  # driver: interrupt me once entry 1 is used
    q.add_used(heads[0], 1)
    assert q.needs_notification()  # first notification always goes out
    q.add_used(heads[1], 1)
    assert q.needs_notification()  # used idx passed used_event (1)
    q.add_used(heads[2], 1)
    assert not q.needs_notification()  # used_event 1 already signalled
    fq.set_used_event(3)
    q.add_used(heads[0], 1)
    assert q.needs_notification()


def test_save_restore_round_trip(mem: GuestMemory) -> None:
    q, fq = make(mem, event_idx=True)
    fq.add_chain([(0xA000, 1, True)])
    assert q.pop() is not None
    state = q.save()
    q2 = Queue(mem, SIZE)
    q2.restore(state)
    assert q2.save() == state
    bad = Queue(mem, 16)
    with pytest.raises(Exception, match="max_size"):
        bad.restore(state)
