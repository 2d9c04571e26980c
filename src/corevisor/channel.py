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
(DoorbellPort). What does not live here: parsing and placing channels (config/), the
KVM ioctls (builder.attach_channels), the hypercalls (hypercall.py).
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corevisor import sandbox
from corevisor.arch.x86_64.layout import DOORBELL_PORT
from corevisor.resources import CHANNEL_GSIS
from corevisor.signals import start_thread
from corevisor.spec import MAX_CHANNELS, ChannelSpec, Doorbell

__all__ = [
    "DOORBELL_PORT",
    "FIRST_GSI",
    "FLAG_READONLY",
    "FLAG_CAN_RING",
    "Channel",
    "ChannelEnd",
    "ReadOnlyGuard",
    "DoorbellPort",
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
            self._relay = DoorbellRelay(pairs, f"doorbell-{config.name}")

    def start(self) -> None:
        """Start the relay thread of a doorbell = "thread" channel (once; idempotent)."""
        if self._relay is not None:
            self._relay.start()

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
        )

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

    def __init__(self, pairs: Sequence[tuple[int, int]], name: str) -> None:
        self._targets = dict(pairs)
        self._name = name
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None

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
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                os.eventfd_write(self._targets[fd], 1)

    def close(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop, 1)
            self._thread.join(5)
        os.close(self._stop)


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
        return True


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
