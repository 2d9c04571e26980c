"""The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): a register block on the MMIO bus.

VirtioMmio is a Device (convention 4): the bus hands it offsets inside its 4 KiB window
and it answers with register values. It owns what the driver negotiates (status,
features, queue layout, interrupt status) and calls the VirtioDevice's hooks; it knows
no base address, IRQ number or ioctl. Two fast paths bypass it on purpose:

- QueueNotify (0x50): the builder registers a KVM ioeventfd per queue on that register
  (datamatch = queue index) with the queue's eventfd from ``notify_fds``, so a kick is
  handled in the host kernel and wakes the device's I/O thread without a vCPU exit. A
  kick that still reaches ``write`` (an odd access size) is forwarded to the same eventfd.
- Interrupts: Interrupt.fd is the irqfd the builder gives KVM.

Device work happens only in ``handle_queue``/``handle_fd``, called from the I/O thread
(worker.py) with the transport lock held; vCPU threads take the same lock for register
accesses, so status changes (reset!) never race a request half-way through.

A QueueError (or a guest address the software IOMMU refused) never escapes: the device
enters DEVICE_NEEDS_RESET (status bit 0x40), the reason is reported once, the driver
gets a configuration-change interrupt, and the device does nothing more until the driver
resets it. Everything else in the VMM keeps running.

What does not live here: ring parsing (queue.py), device types (blk.py, ...), wiring
into a VM (builder.attach_virtio_devices).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError, GuestMemoryError
from corevisor.memory import GuestMemory
from corevisor.snapshot import require_uint
from corevisor.virtio.device import (
    INT_CONFIG_CHANGE,
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
    "VirtioMmio",
    "VirtioMmioState",
    "MMIO_SIZE",
    "MAGIC",
    "VENDOR_ID",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FEATURES_OK",
    "STATUS_NEEDS_RESET",
    "STATUS_FAILED",
    "REG",
]

MMIO_SIZE = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x53565243  # "CRVS"

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
_DRIVER_STATUS_BITS = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED
)


class REG:
    """Register offsets of the version-2 layout."""

    MAGIC = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


_ADDR_REGS = {
    REG.QUEUE_DESC_LOW: ("desc_table", 0),
    REG.QUEUE_DESC_HIGH: ("desc_table", 32),
    REG.QUEUE_DRIVER_LOW: ("avail_ring", 0),
    REG.QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    REG.QUEUE_DEVICE_LOW: ("used_ring", 0),
    REG.QUEUE_DEVICE_HIGH: ("used_ring", 32),
}
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class VirtioMmioState:
    """The transport's registers and queues, plain values only (convention 5), and the
    back end's own state (``device``: BlkState, NetState, ConsoleState, RngState).
    """

    device_type: int
    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    interrupt_status: int
    config_generation: int
    queues: tuple[QueueState, ...]
    device: object


class VirtioMmio:
    """One virtio-mmio device window: registers, negotiation, queue set-up, failure."""

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
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        self.active = False
        self.interrupt.clear()
        for q in self.queues:
            q.reset()

    # --- the Device protocol (vCPU threads) ----------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= REG.CONFIG:
                return self.device.read_config(offset - REG.CONFIG, size)
            if size != 4 or offset % 4:
                return b"\0" * size  # 4.2.2.2: registers are 32-bit; others read as 0
            return _U32.pack(self._read_reg(offset) & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        if offset == REG.QUEUE_NOTIFY and data:
            # No lock: a kick only wakes the I/O thread, exactly as the ioeventfd would.
            index = int.from_bytes(data, "little")
            if index < len(self.notify_fds):
                os.eventfd_write(self.notify_fds[index], 1)
            return
        with self.lock:
            if offset >= REG.CONFIG:
                if self.status & STATUS_DRIVER:
                    self.device.write_config(offset - REG.CONFIG, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                return
            self._write_reg(offset, _U32.unpack(data)[0])

    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_reg(self, offset: int) -> int:
        q = self._queue()
        if offset == REG.MAGIC:
            return MAGIC
        if offset == REG.VERSION:
            return VERSION
        if offset == REG.DEVICE_ID:
            return self.device.device_type
        if offset == REG.VENDOR_ID:
            return VENDOR_ID
        if offset == REG.DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.offered >> (32 * sel) if sel < 2 else 0
        if offset == REG.QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == REG.QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == REG.INTERRUPT_STATUS:
            return self.interrupt.status
        if offset == REG.STATUS:
            return self.status
        if offset == REG.CONFIG_GENERATION:
            return self.config_generation
        if offset in _ADDR_REGS and q is not None:
            name, shift = _ADDR_REGS[offset]
            return int(getattr(q, name)) >> shift
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == REG.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG.DRIVER_FEATURES:
            sel = self.driver_features_sel
            if sel < 2 and not self.status & STATUS_FEATURES_OK:
                mask = 0xFFFFFFFF << (32 * sel)
                self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))
        elif offset == REG.QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG.INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset == REG.STATUS:
            self._write_status(value)
        else:
            self._write_queue_reg(offset, value)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self._queue()
        if q is None:
            return
        if offset == REG.QUEUE_READY:
            if not value:
                q.ready = False  # the driver may retire a queue at any time
            elif not self.status & STATUS_DRIVER_OK:
                q.ready = True
            return
        if self.status & STATUS_DRIVER_OK or q.ready:
            return  # 4.2.3.2: layout is written before the queue is enabled
        if offset == REG.QUEUE_NUM:
            q.size = value
        elif offset in _ADDR_REGS:
            name, shift = _ADDR_REGS[offset]
            old = int(getattr(q, name))
            setattr(q, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old = self.status
        new = old | (value & _DRIVER_STATUS_BITS)
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

    def _activate(self) -> None:
        f = self.driver_features
        try:
            for q in self.queues:
                if q.ready:
                    q.activate(bool(f & VIRTIO_F_EVENT_IDX), bool(f & VIRTIO_F_INDIRECT_DESC))
        except QueueError as e:
            self._fail(str(e))
            return
        self.device.activate(DeviceContext(self.memory, self.queues, f, self.interrupt))
        self.active = True
        for fd in self.notify_fds:
            os.eventfd_write(fd, 1)  # serve whatever the driver queued before DRIVER_OK
        self.device.wake()

    def _reset(self) -> None:
        self.device.reset()
        self._reset_registers()
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
                self.interrupt.raise_irq(INT_CONFIG_CHANGE)
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

    def fail(self, reason: str) -> None:
        """Put the device into NEEDS_RESET from outside (the I/O thread caught a bug)."""
        with self.lock:
            self._fail(reason)

    # --- save / restore ----------------------------------------------------------------
    def save(self) -> VirtioMmioState:
        with self.lock:
            return VirtioMmioState(
                device_type=self.device.device_type,
                status=self.status,
                device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel,
                driver_features=self.driver_features,
                queue_sel=self.queue_sel,
                interrupt_status=self.interrupt.status,
                config_generation=self.config_generation,
                queues=tuple(q.save() for q in self.queues),
                device=self.device.save(),
            )

    def restore(self, state: VirtioMmioState) -> None:
        """Take over a saved transport (the device was built from the same config)."""
        if not isinstance(state, VirtioMmioState):
            raise DeviceError(f"virtio-mmio: cannot restore from {type(state).__name__}")
        if state.device_type != self.device.device_type:
            raise DeviceError(
                f"virtio-mmio state: device type {state.device_type} is not "
                f"{self.device.device_type} ({self.device.name})"
            )
        if len(state.queues) != len(self.queues):
            raise DeviceError(
                f"virtio-mmio state: {len(state.queues)} queues, {self.device.name} has "
                f"{len(self.queues)}"
            )
        if state.status & ~(_DRIVER_STATUS_BITS | STATUS_NEEDS_RESET) or state.status < 0:
            raise DeviceError(f"virtio-mmio state: status {state.status:#x} has unknown bits")
        # A driver may write any bits to DRIVER_FEATURES; only FEATURES_OK promises they
        # were offered, so only then is an unoffered bit an impossible state (saving a
        # transport mid-negotiation must restore: found by fuzz/targets/virtio_mmio).
        if not 0 <= state.driver_features < 1 << 64:
            raise DeviceError(f"virtio-mmio state: driver features {state.driver_features:#x}")
        if state.status & STATUS_FEATURES_OK and state.driver_features & ~self.offered:
            raise DeviceError(
                f"virtio-mmio state: driver features {state.driver_features:#x} were never "
                f"offered ({self.offered:#x})"
            )
        where = f"{self.device.name} transport"
        for name in ("device_features_sel", "driver_features_sel", "queue_sel"):
            require_uint(where, name, getattr(state, name), 32)
        require_uint(where, "interrupt_status", state.interrupt_status, 2)
        require_uint(where, "config_generation", state.config_generation, 32)
        for q, qs in zip(self.queues, state.queues, strict=True):
            q.check_state(qs)
        self.device.check_state(state.device)
        with self.lock:
            self.device.reset()
            for q, qs in zip(self.queues, state.queues, strict=True):
                q.restore(qs)
            self.status = state.status
            self.device_features_sel = state.device_features_sel
            self.driver_features_sel = state.driver_features_sel
            self.driver_features = state.driver_features
            self.queue_sel = state.queue_sel
            self.interrupt.clear()
            if state.interrupt_status:
                self.interrupt.status = state.interrupt_status
            self.config_generation = state.config_generation
            self.active = bool(
                state.status & STATUS_DRIVER_OK and not state.status & STATUS_NEEDS_RESET
            )
            if self.active:
                ctx = DeviceContext(self.memory, self.queues, self.driver_features, self.interrupt)
                self.device.activate(ctx)
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
