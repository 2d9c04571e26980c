"""The virtio device layer: what every device type shares, independent of the transport.

A VirtioDevice declares its type, its queues and feature bits, serves its config space
and handles queue notifications; the transport (common.py, under the registers of
mmio.py or pci.py) owns the status register, feature negotiation and queue set-up, and
calls the device's hooks. Devices are pure logic too: they never start threads or issue
ioctls. Their host-side work runs on the transport's I/O thread (worker.py), which
calls ``process_queue`` when the driver kicks a queue and ``process_fd`` when one of the
device's own host fds (a TAP, an input pipe) is ready.

Interrupts leave through an Interrupt: the interrupt status bits the driver reads and
acknowledges, plus an eventfd the builder hands to KVM as an irqfd, so raising an
interrupt is one write(2) from the I/O thread and never involves a vCPU thread.

What does not live here: ring parsing (queue.py), the transport core (common.py),
registers (mmio.py, pci.py), device types.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corevisor.errors import SnapshotError
from corevisor.memory import GuestMemory
from corevisor.virtio.queue import DescriptorChain, Queue

__all__ = [
    "VirtioDevice",
    "Interrupt",
    "DeviceContext",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_VERSION_1",
    "TRANSPORT_FEATURES",
    "INT_USED_BUFFER",
    "INT_CONFIG_CHANGE",
]

VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
# Offered by every device: the transport and queue.py implement them for all.
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX

INT_USED_BUFFER = 1 << 0
INT_CONFIG_CHANGE = 1 << 1


class Interrupt:
    """The interrupt status register and the eventfd (irqfd) that raises the line.

    Set from the I/O thread, read and acknowledged from a vCPU thread: the lock keeps the
    read-modify-write of the status bits whole. ``used`` and ``config_changed`` are what
    the device layer calls; a transport with more than one line (virtio-pci's MSI-X
    vectors) overrides them to pick the queue's or the configuration's vector.
    """

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd if fd is not None else os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self.status = 0
        self.count = 0  # interrupts raised, for tests and metrics

    def raise_irq(self, bits: int) -> None:
        with self._lock:
            self.status |= bits
            self.count += 1
        os.eventfd_write(self.fd, 1)

    def used(self, queue: int) -> None:
        """Queue queue has new used buffers the driver wants to hear about."""
        self.raise_irq(INT_USED_BUFFER)

    def config_changed(self) -> None:
        """The configuration (or the device status: NEEDS_RESET) changed."""
        self.raise_irq(INT_CONFIG_CHANGE)

    def set_status(self, bits: int) -> None:
        """Set status bits without raising the line (the transport raises it)."""
        with self._lock:
            self.status |= bits

    def take_status(self) -> int:
        """Read and clear the status (virtio-pci's read-to-clear ISR)."""
        with self._lock:
            value, self.status = self.status, 0
        return value

    def ack(self, bits: int) -> None:
        with self._lock:
            self.status &= ~bits

    def clear(self) -> None:
        with self._lock:
            self.status = 0

    def close(self) -> None:
        """Close the eventfd; a second call does nothing."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class DeviceContext:
    """What an activated device works with: RAM, its queues, the negotiated features."""

    memory: GuestMemory
    queues: Sequence[Queue]
    features: int
    interrupt: Interrupt

    def notify_used(self, queue: Queue) -> None:
        """Interrupt the driver for queue's new used entries, if it wants one now."""
        if queue.needs_notification():
            self.interrupt.used(_index_of(self.queues, queue))


def _index_of(queues: Sequence[Queue], queue: Queue) -> int:
    """queue's index among queues (by identity: a handful of queues, no hashing)."""
    for i, q in enumerate(queues):
        if q is queue:
            return i
    return 0


class VirtioDevice:
    """Base of every device type: override the class attributes and the hooks you need."""

    device_type: int = 0
    queue_sizes: tuple[int, ...] = ()
    name: str = "virtio"

    def __init__(self) -> None:
        self.ctx: DeviceContext | None = None
        # Set by the transport so a device can ask for another look at its fds (net
        # RX after the driver adds buffers) without knowing about the I/O thread.
        self.wake: Callable[[], None] = lambda: None
        # Counters for the metrics (api/metrics.py), written on the I/O thread only.
        self.requests = 0  # requests completed (chains put in a used ring)
        self.bytes_from_guest = 0  # payload the guest handed over (a disk write, a frame)
        self.bytes_to_guest = 0  # bytes written into the guest's buffers

    # --- negotiation and config ---------------------------------------------------------
    def features(self) -> int:
        """Device-specific feature bits offered to the driver (transport bits are added)."""
        return 0

    def config(self) -> bytes:
        """The device's config space, as the driver sees it right now."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into config space; ignored unless a device has writable fields."""

    def read_config(self, offset: int, size: int) -> bytes:
        """Read config space; bytes past its end read as zero (never an error)."""
        cfg = self.config()
        return (cfg[offset : offset + size] if offset < len(cfg) else b"").ljust(size, b"\0")

    # --- lifecycle ----------------------------------------------------------------------
    def activate(self, ctx: DeviceContext) -> None:
        """DRIVER_OK: the queues are valid and features fixed; start serving."""
        self.ctx = ctx

    def reset(self) -> None:
        """The driver wrote 0 to status (or the device failed): forget in-flight work."""
        self.ctx = None

    def close(self) -> None:
        """Release host resources (files, TAP fds); the machine is going away."""

    def sync(self) -> None:
        """Make what the device completed durable (a snapshot is taken); OSError if not."""

    # --- work, on the I/O thread --------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """The driver kicked queue index. May raise QueueError (device needs reset)."""

    def serve(self, index: int, request: Callable[[DescriptorChain], int]) -> None:
        """Answer every available chain of queue index with request(chain), which returns
        the bytes it wrote into the chain, then interrupt the driver once if it wants it."""
        ctx = self.ctx
        if ctx is None:
            return
        q = ctx.queues[index]
        served = False
        while (chain := q.pop()) is not None:
            written = request(chain)
            q.add_used(chain.head, written)
            self.requests += 1
            self.bytes_to_guest += written
            served = True
        if served:
            ctx.notify_used(q)

    def fds(self) -> tuple[int, ...]:
        """Host fds the I/O thread should poll for this device right now."""
        return ()

    def process_fd(self, fd: int) -> None:
        """One of fds() is readable. May raise QueueError."""

    # --- save / restore (convention 5; the transport calls these, lock held) -----------
    def save(self) -> object:
        """The back end's own state beyond what it is built from: a frozen dataclass of
        plain values (each device type has its own)."""
        raise SnapshotError(f"{self.name}: this device's state cannot be saved")

    def check_state(self, state: object) -> None:
        """Raise DeviceError if state cannot be this device's; changes nothing."""
        raise SnapshotError(f"{self.name}: this device's state cannot be restored")

    def load_state(self, state: object) -> None:
        """Take over a state check_state accepted (after the transport re-activated the
        device, so what activate() set is overridden by what was saved)."""
        raise SnapshotError(f"{self.name}: this device's state cannot be restored")

    def restore(self, state: object) -> None:
        """check_state, then load_state: the Stateful protocol for a lone back end."""
        self.check_state(state)
        self.load_state(state)
