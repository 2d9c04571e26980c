"""Inter-partition channels: shared memory plus doorbells, per docs/paravirt-abi.md.

A Channel owns what must outlive any one partition's VM: the memfd holding the shared
pages and one eventfd per direction a doorbell can ring. Each partition sees the channel
through a ChannelEnd (its index in that partition's channel list, its peer, whether it
may write or ring), which is what the builder wires into a VM and what HC_CHANNEL_INFO
reports. When a partition restarts, its new VM is wired to the same memfd and eventfds,
so the peer notices nothing but a pause.

The doorbell path runs entirely in the host kernel: the ringing VM has an ioeventfd on
port 0x504 matching the channel index, the receiving VM an irqfd on GSI 16 + its index,
both on the same eventfd. The two small devices here only see what the kernel did not
take: writes to a read-only channel (ReadOnlyGuard) and rings no ioeventfd matched
(DoorbellPort). Rings that pass through the VMM (HC_CHANNEL_NOTIFY, the doorbell =
"thread" relay) are counted per receiving partition in ``Channel.passed_on`` (a metric);
kernel-path rings never reach userspace, so nothing here can count them. What does not
live here: parsing and placing channels (config/), the
KVM ioctls (builder.attach_channels), the hypercalls (hypercall.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from corevisor import sandbox
from corevisor.arch.x86_64.layout import DOORBELL_PORT
from corevisor.errors import DeviceError
from corevisor.resources import CHANNEL_GSIS
from corevisor.signals import start_thread
from corevisor.snapshot import require_state, require_uint
from corevisor.spec import MAX_CHANNELS, ChannelSpec, Doorbell

__all__ = [
    "DOORBELL_PORT",
    "FIRST_GSI",
    "FLAG_READONLY",
    "FLAG_CAN_RING",
    "Channel",
    "ChannelState",
    "ChannelEnd",
    "ChannelEndState",
    "ReadOnlyGuard",
    "ReadOnlyGuardState",
    "DoorbellPort",
    "DoorbellPortState",
    "open_channels",
    "ends_for",
]

FIRST_GSI = CHANNEL_GSIS[0]  # IOAPIC pins 16..23: above the ISA interrupts (resources.py)
FLAG_READONLY = 1 << 0
FLAG_CAN_RING = 1 << 1


class Channel:
    """A channel's shared memory and doorbell eventfds (closed only when the system ends)."""

    def __init__(self, config: ChannelSpec) -> None:
        self.config = config
        self.fd = -1
        self.bells: dict[str, int] = {}
        self.rings = self.bells
        self.passed_on: dict[str, int] = {}  # receiving partition -> rings the VMM passed on
        self._relay: DoorbellRelay | None = None
        try:
            self._open(config)
        except BaseException:
            self.close()
            raise

    def _open(self, config: ChannelSpec) -> None:
        self.fd = os.memfd_create(f"channel-{config.name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, config.size)
        # Receiving partition -> the eventfd its peer rings. A one-way channel only
        # interrupts its reader: the reader has nothing to announce.
        receivers = (config.reader,) if config.reader is not None else config.between
        for name in receivers:
            self.bells[name] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # What the ringing VM writes. On the kernel path it is the receiver's irqfd
        # eventfd itself; with doorbell = "thread" a relay thread (started by start)
        # copies rings across.
        if config.doorbell is Doorbell.THREAD:
            self.rings = {}
            for name in receivers:
                self.rings[name] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            pairs = [(self.rings[n], self.bells[n]) for n in receivers]
            who = {self.bells[n]: n for n in receivers}
            self._relay = DoorbellRelay(pairs, f"doorbell-{config.name}", who, self.passed_on)

    def start(self) -> None:
        """Start the relay thread of a doorbell = "thread" channel (once; idempotent)."""
        if self._relay is not None:
            self._relay.start()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No ring is relayed while the block runs (a system snapshot counts the rings
        waiting in both eventfds: one in flight between them would be counted twice or
        not at all)."""
        if self._relay is None:
            yield
            return
        with self._relay.lock:
            yield

    @property
    def name(self) -> str:
        return self.config.name

    def end(self, partition: str, index: int) -> ChannelEnd:
        """This channel as partition sees it, at position index of its channel list."""
        a, b = self.config.between
        peer = b if partition == a else a
        return ChannelEnd(
            name=self.name,
            index=index,
            gpa=self.config.placed_gpa,
            size=self.config.size,
            peer=peer,
            readonly=self.config.reader == partition,
            memfd=self.fd,
            ring_fd=self.rings.get(peer),
            irq_fd=self.bells.get(partition),
            passed_on=self.passed_on,
        )

    # --- save / restore: rings not yet delivered ----------------------------------------
    def save(self) -> ChannelState:
        """The rings still waiting in the doorbell eventfds (a ring to a partition whose
        VM is down, or one the relay thread has not copied yet). Each count is read and
        written back at once, so taking the state does not swallow a ring. The shared
        pages are not in here: they are memory, saved as a memory file."""
        return ChannelState(
            name=self.name,
            size=self.config.size,
            bells=tuple((n, _peek_eventfd(fd)) for n, fd in sorted(self.bells.items())),
            rings=tuple((n, _peek_eventfd(fd)) for n, fd in sorted(self._relayed().items())),
        )

    def _relayed(self) -> dict[str, int]:
        """The ring eventfds a relay thread copies (none: the kernel path rings the bells)."""
        return {} if self.rings is self.bells else self.rings

    def restore(self, state: ChannelState) -> None:
        """Ring again what was waiting (only adds rings: a ring is never taken back)."""
        st = require_state(f"channel {self.name}", state, ChannelState)
        if (st.name, st.size) != (self.name, self.config.size):
            raise DeviceError(
                f"channel {self.name}: state of channel {st.name} ({st.size} bytes), this "
                f"one has {self.config.size}"
            )
        pairs = [(fds, self._counts(saved, fds)) for fds, saved in (
            (self.bells, st.bells), (self._relayed(), st.rings)
        )]
        for fds, counts in pairs:
            for name, count in counts.items():
                if count:
                    os.eventfd_write(fds[name], count)

    def _counts(self, saved: object, fds: dict[str, int]) -> dict[str, int]:
        """Saved (partition, count) pairs, checked against this channel's doorbells."""
        where = f"channel {self.name}"
        if type(saved) is not tuple or not all(
            type(p) is tuple and len(p) == 2 and type(p[0]) is str for p in saved
        ):
            raise DeviceError(f"{where} state: doorbells are not (partition, count) pairs")
        counts = {name: require_uint(where, f"doorbell[{name}]", n, 63) for name, n in saved}
        if sorted(counts) != sorted(fds) or len(counts) != len(saved):
            raise DeviceError(f"{where} state: doorbells of {sorted(counts)}, not {sorted(fds)}")
        return counts

    def close(self) -> None:
        """Stop the relay and close the memfd and eventfds; idempotent."""
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        fds = {self.fd, *self.bells.values(), *self.rings.values()} - {-1}
        self.fd = -1
        self.bells.clear()
        self.rings.clear()
        for fd in fds:
            os.close(fd)


class DoorbellRelay:
    """A Python thread forwarding rings (ring eventfd -> irqfd eventfd): the slow baseline.

    It exists so the kernel-only doorbell can be compared with the design it replaces
    (bench/partitions.py); a system file selects it with doorbell = "thread".
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        name: str,
        receivers: dict[int, str] | None = None,
        passed_on: dict[str, int] | None = None,
    ) -> None:
        """pairs: (ring eventfd, irqfd eventfd); receivers: irqfd eventfd -> the partition
        it interrupts; passed_on: where each ring passed on is counted, by that partition."""
        self._targets = dict(pairs)
        self._name = name
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()  # held for each ring moved (Channel.held)
        self.counted = receivers if receivers is not None else {}
        self.passed_on = passed_on if passed_on is not None else {}

    def start(self) -> None:
        if self._thread is None:
            self._thread = start_thread(self._run, self._name, sandbox.DOORBELL)

    def _run(self) -> None:
        poller = select.poll()
        for fd in (*self._targets, self._stop):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop:
                    return
                with self.lock:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                    target = self._targets[fd]
                    os.eventfd_write(target, 1)
                    who = self.counted.get(target)
                    if who is not None:
                        self.passed_on[who] = self.passed_on.get(who, 0) + 1

    def close(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join(5)
        os.close(self._stop)


def _peek_eventfd(fd: int) -> int:
    """An eventfd's count, left as it was (read, then written back)."""
    try:
        count = os.eventfd_read(fd)
    except BlockingIOError:
        return 0
    os.eventfd_write(fd, count)
    return count


@dataclass(frozen=True)
class ChannelState:
    """A channel's doorbell counts not yet delivered, per receiving partition."""

    name: str
    size: int
    bells: tuple[tuple[str, int], ...]  # receiver -> count on its irqfd eventfd
    rings: tuple[tuple[str, int], ...]  # receiver -> count its relay has not copied


@dataclass(frozen=True)
class ChannelEndState:
    """A partition's place in its system, as its guest sees it through HC_CHANNEL_INFO:
    a restored partition must find every channel where it was (fds are not state)."""

    name: str
    index: int
    gpa: int
    size: int
    peer: str
    readonly: bool
    can_ring: bool


@dataclass(frozen=True)
class ChannelEnd:
    """One partition's view of a channel: what its VM maps and what HC_CHANNEL_INFO says."""

    name: str
    index: int  # position in the partition's channel list: doorbell datamatch, GSI offset
    gpa: int
    size: int
    peer: str
    readonly: bool  # mapped KVM_MEM_READONLY; guest writes are refused by ReadOnlyGuard
    memfd: int
    ring_fd: int | None  # written (by KVM's ioeventfd, or HC_CHANNEL_NOTIFY) to ring the peer
    irq_fd: int | None  # raises this partition's GSI when the peer rings
    # The channel's count of rings the VMM passed on (Channel.passed_on), shared.
    passed_on: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def gsi(self) -> int:
        return FIRST_GSI + self.index

    @property
    def flags(self) -> int:
        """The ABI's channel flags (HC_CHANNEL_INFO ret2 bits 32..39)."""
        return (FLAG_READONLY if self.readonly else 0) | (
            FLAG_CAN_RING if self.ring_fd is not None else 0
        )

    def ring(self) -> bool:
        """Ring the peer from the VMM (the HC_CHANNEL_NOTIFY slow path); False if not allowed."""
        if self.ring_fd is None:
            return False
        os.eventfd_write(self.ring_fd, 1)
        self.passed_on[self.peer] = self.passed_on.get(self.peer, 0) + 1
        return True

    def save(self) -> ChannelEndState:
        return ChannelEndState(
            self.name, self.index, self.gpa, self.size, self.peer, self.readonly,
            self.ring_fd is not None,
        )

    def restore(self, state: ChannelEndState) -> None:
        """An end is fixed by the system's config: restoring it means checking that the
        guest finds the channel exactly as it was."""
        require_state(f"channel {self.name}", state, ChannelEndState)
        if state != self.save():
            raise DeviceError(
                f"channel {self.name}: the guest saw {state}, this system gives it "
                f"{self.save()}"
            )


def open_channels(configs: Sequence[ChannelSpec]) -> list[Channel]:
    """Create every channel's memfd and eventfds; on failure nothing is left open."""
    channels: list[Channel] = []
    try:
        for c in configs:
            channels.append(Channel(c))
    except BaseException:
        for ch in channels:
            ch.close()
        raise
    return channels


def ends_for(partition: str, channels: Sequence[Channel]) -> tuple[ChannelEnd, ...]:
    """The partition's channel list: its channels in config order, indexed from 0."""
    mine = [ch for ch in channels if partition in ch.config.between]
    assert len(mine) <= MAX_CHANNELS, "config/validate.py caps channels per partition"
    return tuple(ch.end(partition, i) for i, ch in enumerate(mine))


@dataclass(frozen=True)
class ReadOnlyGuardState:
    channel: str
    refused: int  # writes refused so far (the first one was reported)


class ReadOnlyGuard:
    """The MMIO hole behind a read-only channel mapping: every guest write lands here.

    KVM serves reads from the KVM_MEM_READONLY slot itself and turns writes into MMIO
    exits; this device drops them, counts them and reports the first one (a guest
    retrying in a loop must not flood the log). The guest sees its write had no effect.
    """

    def __init__(self, channel: str, report: Callable[[str], None]) -> None:
        self.channel = channel
        self.refused = 0
        self._report = report

    def read(self, offset: int, size: int) -> bytes:
        """Not reached while the slot is mapped (KVM reads it); all-ones like a hole."""
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self.refused += 1
        if self.refused == 1:
            self._report(
                f"refused a write to read-only channel {self.channel} at offset {offset:#x} "
                f"({len(data)} bytes); further refusals are only counted"
            )

    def save(self) -> ReadOnlyGuardState:
        return ReadOnlyGuardState(self.channel, self.refused)

    def restore(self, state: ReadOnlyGuardState) -> None:
        """Take over the count, so a restored guest's refusals are still reported once."""
        st = require_state(f"channel-{self.channel} guard", state, ReadOnlyGuardState)
        if st.channel != self.channel:
            raise DeviceError(f"channel-{self.channel} guard: state of channel {st.channel}")
        self.refused = require_uint(f"channel-{self.channel} guard", "refused", st.refused)


@dataclass(frozen=True)
class DoorbellPortState:
    unmatched: int


class DoorbellPort:
    """Port 0x504 as userspace sees it: only rings no ioeventfd matched reach it.

    That is a ring on a channel index the partition does not have, or may not ring
    (the reader of a one-way channel). Counted and otherwise ignored, as the ABI's
    unmatched ring has no effect.
    """

    def __init__(self) -> None:
        self.unmatched = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self.unmatched += 1

    def save(self) -> DoorbellPortState:
        return DoorbellPortState(self.unmatched)

    def restore(self, state: DoorbellPortState) -> None:
        st = require_state("doorbell", state, DoorbellPortState)
        self.unmatched = require_uint("doorbell", "unmatched", st.unmatched)
