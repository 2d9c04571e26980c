"""The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): a register block on the MMIO bus.

VirtioMmio is a Device (convention 4): the bus hands it offsets inside its 4 KiB window
and it answers with register values, decoding them into the operations of the
transport core (common.py: status, negotiation, queue set-up, activation, failure); it
owns only what is particular to this register layout — the feature and queue
selectors. It knows no base address, IRQ number or ioctl. QueueNotify (0x50) is where
the builder registers the queues' ioeventfds (datamatch = queue index); a kick that
still reaches ``write`` (an odd access size) is forwarded to the same eventfd. Its one
interrupt line is the Interrupt's irqfd, edge-triggered.

What does not live here: the transport core (common.py), ring parsing (queue.py), device
types (blk.py, ...), wiring into a VM (attach.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from corevisor.errors import DeviceError
from corevisor.snapshot import require_uint
from corevisor.virtio.common import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    CoreState,
    VirtioTransport,
)
from corevisor.virtio.queue import QueueState

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
    back end's own state (``device``: BlkState, NetState, ConsoleState, RngState): the
    core's state (common.CoreState) flattened, plus this layout's selectors.
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

    def core(self) -> CoreState:
        return CoreState(self.device_type, self.status, self.driver_features,
                         self.interrupt_status, self.config_generation, self.queues,
                         self.device)


class VirtioMmio(VirtioTransport):
    """One virtio-mmio device window: the version-2 registers over the transport core."""

    kind = "virtio-mmio"

    def reset_registers(self) -> None:
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0

    # --- the Device protocol (vCPU threads) ----------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= REG.CONFIG:
                return self.read_config(offset - REG.CONFIG, size)
            if size != 4 or offset % 4:
                return b"\0" * size  # 4.2.2.2: registers are 32-bit; others read as 0
            return _U32.pack(self._read_reg(offset) & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        if offset == REG.QUEUE_NOTIFY and data:
            self.kick(int.from_bytes(data, "little"))
            return
        with self.lock:
            if offset >= REG.CONFIG:
                self.write_config(offset - REG.CONFIG, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                return
            self._write_reg(offset, _U32.unpack(data)[0])

    def _read_reg(self, offset: int) -> int:
        q = self.queue(self.queue_sel)
        if offset == REG.MAGIC:
            return MAGIC
        if offset == REG.VERSION:
            return VERSION
        if offset == REG.DEVICE_ID:
            return self.device.device_type
        if offset == REG.VENDOR_ID:
            return VENDOR_ID
        if offset == REG.DEVICE_FEATURES:
            return self.device_features(self.device_features_sel)
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
            self.set_driver_features(self.driver_features_sel, value)
        elif offset == REG.QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG.INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset == REG.STATUS:
            self.write_status(value)
        else:
            self._write_queue_reg(offset, value)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self.queue(self.queue_sel)
        if q is None:
            return
        if offset == REG.QUEUE_READY:
            self.set_queue_ready(q, bool(value))
            return
        if not self.layout_writable(q):
            return
        if offset == REG.QUEUE_NUM:
            q.size = value
        elif offset in _ADDR_REGS:
            name, shift = _ADDR_REGS[offset]
            old = int(getattr(q, name))
            setattr(q, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    # --- save / restore ----------------------------------------------------------------
    def save(self) -> VirtioMmioState:
        with self.lock:
            core = self.save_core()
            return VirtioMmioState(
                device_type=core.device_type,
                status=core.status,
                device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel,
                driver_features=core.driver_features,
                queue_sel=self.queue_sel,
                interrupt_status=core.interrupt_status,
                config_generation=core.config_generation,
                queues=core.queues,
                device=core.device,
            )

    def restore(self, state: VirtioMmioState) -> None:
        """Take over a saved transport (the device was built from the same config)."""
        if not isinstance(state, VirtioMmioState):
            raise DeviceError(f"virtio-mmio: cannot restore from {type(state).__name__}")
        core = state.core()
        self.check_core(core)
        where = f"{self.device.name} transport"
        for name in ("device_features_sel", "driver_features_sel", "queue_sel"):
            require_uint(where, name, getattr(state, name), 32)
        with self.lock:
            self.load_core(core)
            self.device_features_sel = state.device_features_sel
            self.driver_features_sel = state.driver_features_sel
            self.queue_sel = state.queue_sel
