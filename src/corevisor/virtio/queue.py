"""The split virtqueue (virtio 1.x, 2.7): descriptor chains, available and used rings.

This is the device side of a queue, written for a guest that may be hostile. Every
guest-physical address the driver hands over (the descriptor table, both rings, every
buffer, every indirect table) is touched only through GuestMemory, so nothing outside
the guest's RAM can be read or written. Everything a malicious or broken driver can get
wrong is detected and raised as QueueError, which the transport turns into
DEVICE_NEEDS_RESET for that one device (the VMM and every other device keep running):

- an index (head, ``next``, avail ``idx`` jump) outside the queue,
- a buffer, ring or table outside RAM, or an ``addr + len`` that wraps,
- a chain longer than the queue size (which is also how descriptor loops are caught),
- an indirect descriptor that is nested, combined with NEXT, empty, not a multiple of
  16 bytes long, or used without VIRTIO_F_INDIRECT_DESC,
- a device-readable descriptor after a device-writable one (2.7.4.2),
- a device asking to read more than the readable part or write more than the writable
  part of a chain (ChainReader/ChainWriter), i.e. a request of the wrong shape.

Memory ordering: the rings are shared with a guest running on another CPU. On x86-64
(the only architecture corevisor supports) stores are not reordered with stores and
loads not with loads, which covers "used elements before used idx" and "avail idx
before avail elements". The one reordering x86-TSO allows, a later load passing an
earlier store, matters for VIRTIO_F_EVENT_IDX (publish used idx, then read used_event;
publish avail_event, then re-read avail idx), so those places call _full_fence().

What does not live here: feature negotiation and device status (device.py, mmio.py),
what a request means (blk.py, net.py, ...).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from corevisor.errors import DeviceError, GuestMemoryError
from corevisor.memory import GuestMemory

__all__ = [
    "QueueError",
    "Queue",
    "QueueState",
    "DescriptorChain",
    "ChainReader",
    "ChainWriter",
    "MAX_QUEUE_SIZE",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "DESC_SIZE",
]

MAX_QUEUE_SIZE = 32768  # 2.7: Queue Size is a power of 2, at most 32768
DESC_SIZE = 16
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
_U64 = 1 << 64
_U32 = 1 << 32
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")

_FENCE = threading.Lock()


def _full_fence() -> None:
    """A full memory barrier (store-load included) between two accesses to shared rings.

    Python has no fence primitive; acquiring an uncontended lock runs a lock-prefixed
    read-modify-write in the C library, which x86 defines as a full barrier.
    """
    _FENCE.acquire()
    _FENCE.release()


class QueueError(DeviceError):
    """The driver broke the virtqueue contract; the device must stop and ask for a reset."""


@dataclass(frozen=True)
class QueueState:
    """Everything a queue holds, as plain values (convention 5)."""

    max_size: int
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    signalled_used: int | None
    event_idx: bool
    indirect: bool


@dataclass
class DescriptorChain:
    """One available request: its head index and its buffers split by direction.

    Every (gpa, len) pair here was checked to lie wholly inside guest RAM (writable ones
    inside memory the guest may write), but devices still access them only through
    GuestMemory.
    """

    memory: GuestMemory
    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def reader(self) -> ChainReader:
        return ChainReader(self.memory, self.readable)

    def writer(self) -> ChainWriter:
        return ChainWriter(self.memory, self.writable)


class _ChainCursor:
    """A position in one direction's buffers of a chain: claims bytes strictly in order."""

    def __init__(self, memory: GuestMemory, segments: list[tuple[int, int]]) -> None:
        self._memory = memory
        self._segments = segments
        self._seg = 0
        self._off = 0
        self.remaining = sum(n for _, n in segments)

    def _shortfall(self, size: int) -> str:
        raise NotImplementedError

    def segments(self, size: int) -> list[tuple[int, int]]:
        """Claim size bytes as (gpa, len) pieces; QueueError (before any claim) if short."""
        if size > self.remaining:
            raise QueueError(self._shortfall(size))
        self.remaining -= size
        pieces = []
        while size:
            gpa, n = self._segments[self._seg]
            take = min(n - self._off, size)
            if take:
                pieces.append((gpa + self._off, take))
            size -= take
            self._off += take
            if self._off == n:
                self._seg += 1
                self._off = 0
        return pieces


class ChainReader(_ChainCursor):
    """Sequential reads over the device-readable buffers of a chain."""

    def _shortfall(self, size: int) -> str:
        return f"request needs {size} more device-readable bytes, the chain has {self.remaining}"

    def read(self, size: int) -> bytes:
        """Exactly size bytes, or QueueError if the readable part is shorter."""
        return b"".join(self._memory.read(gpa, n) for gpa, n in self.segments(size))


class ChainWriter(_ChainCursor):
    """Sequential writes into the device-writable buffers of a chain; counts what it wrote."""

    def __init__(self, memory: GuestMemory, segments: list[tuple[int, int]]) -> None:
        super().__init__(memory, segments)
        self.written = 0

    def _shortfall(self, size: int) -> str:
        return f"device must write {size} bytes, the chain has {self.remaining} device-writable"

    def segments(self, size: int) -> list[tuple[int, int]]:
        pieces = super().segments(size)
        self.written += size
        return pieces

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of data, or raise QueueError if the writable part is too short."""
        view = memoryview(data)
        pos = 0
        for gpa, n in self.segments(len(view)):
            self._memory.write(gpa, view[pos : pos + n])
            pos += n


class Queue:
    """One split virtqueue: the driver-configured layout plus the device's ring cursors."""

    def __init__(self, memory: GuestMemory, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise DeviceError(f"virtqueue max size {max_size} is not a power of 2 <= 32768")
        self.memory = memory
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (2.4): not ready, nothing configured."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used: int | None = None
        self.event_idx = False
        self.indirect = False

    # --- set-up ------------------------------------------------------------------------
    def activate(self, event_idx: bool, indirect: bool) -> None:
        """Check the driver's layout before the first use (DRIVER_OK) and fix the features.

        Checking the whole areas once gives the driver one clear error at start-up; the
        per-access checks in GuestMemory still guard every later access.
        """
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 in 1..{self.max_size}")
        areas = (
            ("descriptor table", self.desc_table, 16, DESC_SIZE * size),
            ("available ring", self.avail_ring, 2, 6 + 2 * size),
            ("used ring", self.used_ring, 4, 6 + 8 * size),
        )
        for what, gpa, align, length in areas:
            if gpa % align:
                raise QueueError(f"{what} at {gpa:#x} is not {align}-byte aligned")
            if not self.memory.contains(gpa, length):
                raise QueueError(f"{what} at {gpa:#x}+{length:#x} is outside guest RAM")
        if not self.memory.writable(self.used_ring, 6 + 8 * size):
            raise QueueError(f"used ring at {self.used_ring:#x} is in read-only memory")
        self.event_idx = event_idx
        self.indirect = indirect
        self.signalled_used = None

    # --- the available ring ------------------------------------------------------------
    def _avail_idx(self) -> int:
        return self._read_u16(self.avail_ring + 2)

    def has_available(self) -> bool:
        """True if the driver has made a chain available that pop() has not taken."""
        return self._avail_pending() > 0

    def _avail_pending(self) -> int:
        pending = (self._avail_idx() - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(
                f"available idx moved {pending} entries ahead of the device, "
                f"more than the queue size {self.size}"
            )
        return pending

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, fully validated, or None if there is none."""
        if not self._avail_pending():
            if self.event_idx:
                # Ask for a kick at the next entry, then look again: a driver that
                # published between our read and our write would otherwise never kick.
                self._write_avail_event(self.next_avail)
                _full_fence()
                if not self._avail_pending():
                    return None
            else:
                return None
        slot = self.next_avail % self.size
        head = self._read_u16(self.avail_ring + 4 + 2 * slot)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if self.event_idx:
            self._write_avail_event(self.next_avail)
        return self._walk(head)

    def undo_pop(self) -> None:
        """Give back the last popped chain (a device that could not use it yet, e.g. net RX)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise QueueError(f"available ring names descriptor {head}, queue size is {size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        table, count, index = self.desc_table, size, head
        seen = 0
        indirect = False
        total = 0
        while True:
            seen += 1
            if seen > size:
                raise QueueError(
                    f"descriptor chain from head {head} is longer than the queue size {size} "
                    "(a loop?)"
                )
            addr, length, flags, nxt = _DESC.unpack(
                self._read(table + DESC_SIZE * index, DESC_SIZE)
            )
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise QueueError(f"nested indirect descriptor in chain {head}")
                if not self.indirect:
                    raise QueueError(
                        f"indirect descriptor in chain {head} without VIRTIO_F_INDIRECT_DESC"
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"indirect descriptor in chain {head} also has NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(
                        f"indirect table of chain {head} is {length} bytes, "
                        "not a non-zero multiple of 16"
                    )
                self._check_buffer(addr, length, False, head)
                indirect = True
                table, count, index = addr, length // DESC_SIZE, 0
                continue
            self._check_buffer(addr, length, bool(flags & VIRTQ_DESC_F_WRITE), head)
            total += length
            if total >= _U32:
                raise QueueError(f"descriptor chain {head} is 4 GiB or longer")
            if flags & VIRTQ_DESC_F_WRITE:
                if length:
                    writable.append((addr, length))
            else:
                if writable:
                    raise QueueError(
                        f"chain {head}: device-readable descriptor after a device-writable one"
                    )
                if length:
                    readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(self.memory, head, readable, writable)
            if nxt >= count:
                raise QueueError(f"chain {head}: next {nxt} is outside a table of {count}")
            index = nxt

    def _check_buffer(self, addr: int, length: int, write: bool, head: int) -> None:
        if addr + length > _U64:
            raise QueueError(f"chain {head}: buffer {addr:#x}+{length:#x} wraps the address space")
        if not length:
            return
        ok = self.memory.writable(addr, length) if write else self.memory.contains(addr, length)
        if not ok:
            what = "device-writable buffer" if write else "buffer"
            raise QueueError(f"chain {head}: {what} {addr:#x}+{length:#x} is outside guest RAM")

    # --- the used ring -----------------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Return a chain to the driver with the number of bytes the device wrote."""
        slot = self.next_used % self.size
        elem = self.used_ring + 4 + 8 * slot
        self._write(elem, _USED_ELEM.pack(head, length))
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._write(self.used_ring + 2, _U16.pack(self.next_used))

    def needs_notification(self) -> bool:
        """Should the device interrupt the driver now for the used entries added so far?

        Without EVENT_IDX the driver's NO_INTERRUPT flag decides. With it, interrupt only
        if used_event lies in the window of entries added since the last interrupt
        (vring_need_event, 2.7.10), so a busy driver polling the ring is left alone.
        """
        _full_fence()  # used idx must be visible before we look at the driver's wishes
        if not self.event_idx:
            flags = self._read_u16(self.avail_ring)
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        new = self.next_used
        old = self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        used_event = self._read_u16(self.avail_ring + 4 + 2 * self.size)
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def _write_avail_event(self, value: int) -> None:
        self._write(self.used_ring + 4 + 8 * self.size, _U16.pack(value))

    # --- guarded access ----------------------------------------------------------------
    def _read(self, gpa: int, size: int) -> bytes:
        try:
            return self.memory.read(gpa, size)
        except GuestMemoryError as e:
            raise QueueError(str(e)) from None

    def _read_u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self._read(gpa, 2))[0]
        return value

    def _write(self, gpa: int, data: bytes) -> None:
        try:
            self.memory.write(gpa, data)
        except GuestMemoryError as e:
            raise QueueError(str(e)) from None

    # --- save / restore ----------------------------------------------------------------
    def save(self) -> QueueState:
        return QueueState(
            max_size=self.max_size,
            size=self.size,
            ready=self.ready,
            desc_table=self.desc_table,
            avail_ring=self.avail_ring,
            used_ring=self.used_ring,
            next_avail=self.next_avail,
            next_used=self.next_used,
            signalled_used=self.signalled_used,
            event_idx=self.event_idx,
            indirect=self.indirect,
        )

    def restore(self, state: QueueState) -> None:
        """Take over a saved queue; refuse a state this queue could not have been in."""
        self.check_state(state)
        self.size = state.size
        self.ready = state.ready
        self.desc_table = state.desc_table
        self.avail_ring = state.avail_ring
        self.used_ring = state.used_ring
        self.next_avail = state.next_avail
        self.next_used = state.next_used
        self.signalled_used = state.signalled_used
        self.event_idx = state.event_idx
        self.indirect = state.indirect

    def check_state(self, state: QueueState) -> None:
        """Raise DeviceError unless state is one this queue could have been in."""
        if not isinstance(state, QueueState):
            raise DeviceError(f"virtqueue: cannot restore from {type(state).__name__}")
        if state.max_size != self.max_size:
            raise DeviceError(
                f"virtqueue state: max_size {state.max_size} != this queue's {self.max_size}"
            )
        # Any value the 32-bit QUEUE_NUM register can hold is a state a queue can be in
        # (the driver may write 512 or 0 before enabling it; activate() is what refuses
        # such a layout), so save() of any queue must restore. Found by fuzz/targets/virtqueue.
        if type(state.size) is not int or not 0 <= state.size <= 0xFFFFFFFF:
            raise DeviceError(f"virtqueue state: size {state.size!r} is not a 32-bit value")
        for name in ("desc_table", "avail_ring", "used_ring"):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value < _U64:
                raise DeviceError(f"virtqueue state: {name}={value!r} is not a 64-bit address")
        for name in ("next_avail", "next_used"):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value <= 0xFFFF:
                raise DeviceError(f"virtqueue state: {name}={value!r} is not a 16-bit index")
        if state.signalled_used is not None and (
            type(state.signalled_used) is not int or not 0 <= state.signalled_used <= 0xFFFF
        ):
            raise DeviceError(
                f"virtqueue state: signalled_used={state.signalled_used!r} is not a 16-bit index"
            )
        for name in ("ready", "event_idx", "indirect"):
            if type(getattr(state, name)) is not bool:
                raise DeviceError(f"virtqueue state: {name} is not a bool")
