"""What every virtio transport shares: status, features, queues, activation, failure, state.

VirtioTransport is the device-side core of virtio 1.x (2.1-2.4, 3.1) that does not
depend on how registers are reached: the device status and its transitions, feature
negotiation (FEATURES_OK is refused when the driver asks for a feature never offered,
or leaves out VIRTIO_F_VERSION_1), the queues and when their layout may change, the
activation at DRIVER_OK, reset, and DEVICE_NEEDS_RESET. The transports (mmio.py, pci.py)
subclass it and only decode their registers into these operations; pci.py also routes
interrupts to MSI-X vectors.

Two fast paths bypass every transport on purpose:

- notifications: the builder registers a KVM ioeventfd per queue on the transport's
  notify register with the queue's eventfd from ``notify_fds``, so a kick is handled in
  the host kernel and wakes the device's I/O thread (worker.py) without a vCPU exit. A
  kick that still reaches the transport (an odd access size) is forwarded with kick().
- interrupts: the Interrupt's eventfds are irqfds.

Device work happens only in ``handle_queue``/``handle_fd``, called from the I/O thread
with the transport lock held; vCPU threads take the same lock for register accesses, so
status changes (reset!) never race a request half-way through.

A QueueError (or a guest address the software IOMMU refused) never escapes: the device
enters DEVICE_NEEDS_RESET (status bit 0x40), the reason is reported once, the driver gets
a configuration-change interrupt, and the device does nothing more until the driver
resets it. Everything else in the VMM keeps running.

What does not live here: ring parsing (queue.py), device types (blk.py, ...), register
layouts (mmio.py, pci.py), wiring into a VM (attach.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError, GuestMemoryError
from corevisor.memory import GuestMemory
from corevisor.snapshot import require_uint
from corevisor.virtio.device import (
    TRANSPORT_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceContext,
    Interrupt,
    VirtioDevice,
)
from corevisor.virtio.queue import Queue, QueueError, QueueState

__all__ = [
    "VirtioTransport",
    "CoreState",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FEATURES_OK",
    "STATUS_NEEDS_RESET",
    "STATUS_FAILED",
    "DRIVER_STATUS_BITS",
]

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
DRIVER_STATUS_BITS = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED
)


@dataclass(frozen=True)
class CoreState:
    """The transport-independent state: status, features, interrupt bits, queues and the
    back end's own state (``device``: BlkState, NetState, ConsoleState, RngState)."""

    device_type: int
    status: int
    driver_features: int
    interrupt_status: int
    config_generation: int
    queues: tuple[QueueState, ...]
    device: object


class VirtioTransport:
    """The device side of one virtio device, independent of its registers."""

    kind = "virtio"  # how messages name the transport ("virtio-mmio", "virtio-pci")

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        report: Callable[[str], None],
        interrupt: Interrupt | None = None,
    ) -> None:
        self.device = device
        self.memory = memory
        self.report = report
        self.interrupt = interrupt if interrupt is not None else Interrupt()
        self.queues = [Queue(memory, size) for size in device.queue_sizes]
        self.notify_fds: list[int] = []
        try:
            for _ in device.queue_sizes:
                self.notify_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except BaseException:
            self.close()
            raise
        self.lock = threading.Lock()
        self.offered = device.features() | TRANSPORT_FEATURES
        self.failure: str | None = None  # why the device last entered NEEDS_RESET
        self._reset_core()

    def _reset_core(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.config_generation = 0
        self.active = False
        self.interrupt.clear()
        for q in self.queues:
            q.reset()
        self.reset_registers()

    def reset_registers(self) -> None:
        """The transport's own registers back to their reset values (lock held)."""

    # --- operations the registers decode into (lock held) -------------------------------
    def device_features(self, select: int) -> int:
        """32 bits of the offered features, word select (0 or 1; 0 beyond)."""
        return (self.offered >> (32 * select)) & 0xFFFFFFFF if select < 2 else 0

    def set_driver_features(self, select: int, value: int) -> None:
        """Store 32 bits of the driver's features, unless FEATURES_OK already fixed them."""
        if select < 2 and not self.status & STATUS_FEATURES_OK:
            mask = 0xFFFFFFFF << (32 * select)
            self.driver_features = (self.driver_features & ~mask) | (value << (32 * select))

    def queue(self, index: int) -> Queue | None:
        return self.queues[index] if 0 <= index < len(self.queues) else None

    def set_queue_ready(self, q: Queue, value: bool) -> None:
        """The driver enables (before DRIVER_OK) or retires (any time) queue q."""
        if not value:
            q.ready = False
        elif not self.status & STATUS_DRIVER_OK:
            q.ready = True

    def layout_writable(self, q: Queue) -> bool:
        """A queue's size and addresses are written before it is enabled (4.2.3.2, 4.1.5.1.3)."""
        return not (self.status & STATUS_DRIVER_OK or q.ready)

    def read_config(self, offset: int, size: int) -> bytes:
        return self.device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        if self.status & STATUS_DRIVER:
            self.device.write_config(offset, data)

    def write_status(self, value: int) -> None:
        """The driver writes the device status: 0 resets, other bits are added."""
        if value == 0:
            self._reset()
            return
        old = self.status
        new = old | (value & DRIVER_STATUS_BITS)
        added = new & ~old
        if added & STATUS_FEATURES_OK:
            f = self.driver_features
            if f & ~self.offered or not f & VIRTIO_F_VERSION_1:
                new &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
                self.report(
                    f"{self.device.name}: driver asked for features {f:#x}, "
                    f"offered {self.offered:#x}: FEATURES_OK refused"
                )
        self.status = new
        if added & STATUS_DRIVER_OK and new & STATUS_FEATURES_OK and not new & STATUS_FAILED:
            self._activate()

    def kick(self, index: int) -> None:
        """A notification that reached the transport instead of its ioeventfd (no lock:
        a kick only wakes the I/O thread, exactly as the ioeventfd would)."""
        if 0 <= index < len(self.notify_fds):
            os.eventfd_write(self.notify_fds[index], 1)

    def _context(self) -> DeviceContext:
        return DeviceContext(self.memory, self.queues, self.driver_features, self.interrupt)

    def _activate(self) -> None:
        f = self.driver_features
        try:
            for q in self.queues:
                if q.ready:
                    q.activate(bool(f & VIRTIO_F_EVENT_IDX), bool(f & VIRTIO_F_INDIRECT_DESC))
        except QueueError as e:
            self._fail(str(e))
            return
        self.device.activate(self._context())
        self.active = True
        for fd in self.notify_fds:
            os.eventfd_write(fd, 1)  # serve whatever the driver queued before DRIVER_OK
        self.device.wake()

    def _reset(self) -> None:
        self.device.reset()
        self._reset_core()
        self.device.wake()

    def _fail(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET (lock held): stop serving, say why, tell the driver."""
        self.failure = reason
        self.active = False
        self.device.reset()
        if not self.status & STATUS_NEEDS_RESET:
            self.status |= STATUS_NEEDS_RESET
            self.report(f"{self.device.name}: device needs reset: {reason}")
            if self.status & STATUS_DRIVER_OK:
                self.config_generation += 1
                self.interrupt.config_changed()
        self.device.wake()

    # --- device work (the I/O thread) ------------------------------------------------------
    def handle_queue(self, index: int) -> None:
        """The driver kicked queue index: let the device serve it, or fail it cleanly."""
        with self.lock:
            if not self.active or not self.queues[index].ready:
                return
            try:
                self.device.process_queue(index)
            except (QueueError, GuestMemoryError) as e:
                self._fail(str(e))

    def handle_fd(self, fd: int) -> None:
        """A device-owned host fd is ready (TAP readable, console input waiting)."""
        with self.lock:
            try:
                self.device.process_fd(fd)
            except (QueueError, GuestMemoryError) as e:
                self._fail(str(e))

    def host_fds(self) -> dict[int, Callable[[], None]]:
        """Transport-owned fds the I/O thread polls too, with what to do when one is
        readable (a level-triggered interrupt's resample fd)."""
        return {}

    def fail(self, reason: str) -> None:
        """Put the device into NEEDS_RESET from outside (the I/O thread caught a bug)."""
        with self.lock:
            self._fail(reason)

    # --- save / restore --------------------------------------------------------------------
    def save_core(self) -> CoreState:
        """The core's state (lock held by the caller)."""
        return CoreState(
            device_type=self.device.device_type,
            status=self.status,
            driver_features=self.driver_features,
            interrupt_status=self.interrupt.status,
            config_generation=self.config_generation,
            queues=tuple(q.save() for q in self.queues),
            device=self.device.save(),
        )

    def check_core(self, state: CoreState) -> None:
        """Raise DeviceError unless state can be this device's; changes nothing."""
        where = f"{self.kind} state"
        if state.device_type != self.device.device_type:
            raise DeviceError(
                f"{where}: device type {state.device_type} is not "
                f"{self.device.device_type} ({self.device.name})"
            )
        if len(state.queues) != len(self.queues):
            raise DeviceError(
                f"{where}: {len(state.queues)} queues, {self.device.name} has "
                f"{len(self.queues)}"
            )
        if state.status & ~(DRIVER_STATUS_BITS | STATUS_NEEDS_RESET) or state.status < 0:
            raise DeviceError(f"{where}: status {state.status:#x} has unknown bits")
        # A driver may write any bits to its features; only FEATURES_OK promises they
        # were offered, so only then is an unoffered bit an impossible state (saving a
        # transport mid-negotiation must restore: found by fuzz/targets/virtio_mmio).
        if type(state.driver_features) is not int or not 0 <= state.driver_features < 1 << 64:
            raise DeviceError(f"{where}: driver features {state.driver_features!r}")
        if state.status & STATUS_FEATURES_OK and state.driver_features & ~self.offered:
            raise DeviceError(
                f"{where}: driver features {state.driver_features:#x} were never "
                f"offered ({self.offered:#x})"
            )
        owner = f"{self.device.name} transport"
        require_uint(owner, "interrupt_status", state.interrupt_status, 2)
        require_uint(owner, "config_generation", state.config_generation, 32)
        for q, qs in zip(self.queues, state.queues, strict=True):
            q.check_state(qs)
        self.device.check_state(state.device)

    def load_core(self, state: CoreState) -> None:
        """Take over a state check_core accepted (lock held by the caller): the device
        is re-activated when the driver had it running, then its own state loaded."""
        self.device.reset()
        for q, qs in zip(self.queues, state.queues, strict=True):
            q.restore(qs)
        self.status = state.status
        self.driver_features = state.driver_features
        self.interrupt.clear()
        if state.interrupt_status:
            self.interrupt.status = state.interrupt_status
        self.config_generation = state.config_generation
        running = state.status & STATUS_DRIVER_OK and not state.status & STATUS_NEEDS_RESET
        self.active = bool(running)
        if self.active:
            self.device.activate(self._context())
            for fd in self.notify_fds:
                os.eventfd_write(fd, 1)
        self.device.load_state(state.device)
        self.device.wake()

    def close(self) -> None:
        """Close the queue eventfds, the interrupt and the device; idempotent."""
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []
        self.interrupt.close()
        self.device.close()
