"""The virtio-pci transport, modern only (virtio 1.x, 4.1): a PCI function and its BARs.

VirtioPci is one PCI function (pci/config.py) whose configuration space carries the
virtio vendor capabilities (4.1.4) and an MSI-X capability, over the transport core
(common.py). Its registers live in two memory BARs, laid out as QEMU lays them out:

| BAR | offset | what | cap |
| --- | --- | --- | --- |
| 1 (32-bit, 4 KiB) | 0x000 | MSI-X table, one entry per vector | MSI-X |
| 1 | 0x800 | MSI-X pending bits | MSI-X |
| 4 (64-bit, 16 KiB) | 0x0000 | common configuration (4.1.4.3) | COMMON_CFG |
| 4 | 0x1000 | ISR status, read-to-clear (4.1.4.5) | ISR_CFG |
| 4 | 0x2000 | device configuration (the device type's) | DEVICE_CFG |
| 4 | 0x3000 | notifications: queue q at 0x3000 + 4 q (notify_off_multiplier 4) | NOTIFY_CFG |

plus the PCI-configuration access capability (PCI_CFG, 4.1.4.8), a window into the BARs
through configuration space that firmware uses where it cannot reach the BARs (SeaBIOS,
for 64-bit BARs above 4 GiB). IDs: vendor 0x1AF4, device 0x1040 + the virtio type,
revision 1 (non-transitional: no legacy I/O BAR), subsystem 1af4:1100.

Interrupts: with MSI-X enabled, a queue's used buffers signal the vector the driver
wrote to its queue_msix_vector, a configuration change config_msix_vector (4.1.5.4);
masking and pending bits are msix.py's. Without MSI-X the function raises INTA: the
ISR bit is set and the level-triggered line asserted through an irqfd whose resample
fd tells the I/O thread when the guest's EOI lowered it again, so the line is raised
once more while the ISR still has bits (reading the ISR clears it, 4.1.4.5.1).

Notifications: the builder registers a 2-byte ioeventfd on each queue's notify address
(it moves with BAR 4); a notification that still reaches ``bar4_write`` is forwarded.

What does not live here: the transport core (common.py), the PCI machinery (pci/), the
placement of BARs and the wiring of eventfds (attach.py, pci/platform.py).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError
from corevisor.memory import GuestMemory
from corevisor.pci.config import (
    CAP_ID_VENDOR,
    COMMAND,
    COMMAND_INTX_DISABLE,
    STATUS_INTERRUPT,
    Bar,
    BarKind,
    PciFunction,
    PciFunctionState,
)
from corevisor.pci.msix import Msix, MsixState
from corevisor.snapshot import require_state, require_uint
from corevisor.virtio.common import CoreState, VirtioTransport
from corevisor.virtio.device import (
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    Interrupt,
    VirtioDevice,
)

__all__ = [
    "VirtioPci",
    "VirtioPciState",
    "PciInterrupt",
    "NO_VECTOR",
    "MSIX_BAR",
    "REGS_BAR",
    "COMMON",
    "ISR",
    "DEVICE",
    "NOTIFY",
    "NOTIFY_MULTIPLIER",
    "PCI_VENDOR",
    "device_id",
]

PCI_VENDOR = 0x1AF4
PCI_DEVICE_BASE = 0x1040  # + device type: modern-only IDs (4.1.2.1)
SUBSYSTEM = 0x1100
NO_VECTOR = 0xFFFF
MSIX_BAR, MSIX_BAR_SIZE, PBA_OFFSET = 1, 0x1000, 0x800
REGS_BAR, REGS_BAR_SIZE = 4, 0x4000
COMMON, ISR, DEVICE, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
COMMON_SIZE = 0x38
NOTIFY_MULTIPLIER = 4
# virtio_pci_cap.cfg_type (4.1.4)
CAP_COMMON_CFG, CAP_NOTIFY_CFG, CAP_ISR_CFG, CAP_DEVICE_CFG, CAP_PCI_CFG = 1, 2, 3, 4, 5
# PCI class codes, as QEMU gives them (hw/virtio/virtio-pci.c)
_CLASS = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00}
_CLASS_OTHER = 0xFF0000


def device_id(device_type: int) -> int:
    return PCI_DEVICE_BASE + device_type


def _vendor_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after cap_vndr and cap_next: cap_len, cfg_type, bar, id,
    padding, offset, length, then extra (notify_off_multiplier, pci_cfg_data)."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


# Common configuration fields: offset -> (size, name)
_FIELDS = {
    0x00: (4, "device_feature_select"),
    0x04: (4, "device_feature"),
    0x08: (4, "driver_feature_select"),
    0x0C: (4, "driver_feature"),
    0x10: (2, "config_msix_vector"),
    0x12: (2, "num_queues"),
    0x14: (1, "device_status"),
    0x15: (1, "config_generation"),
    0x16: (2, "queue_select"),
    0x18: (2, "queue_size"),
    0x1A: (2, "queue_msix_vector"),
    0x1C: (2, "queue_enable"),
    0x1E: (2, "queue_notify_off"),
    0x20: (8, "queue_desc"),
    0x28: (8, "queue_driver"),
    0x30: (8, "queue_device"),
}
_QUEUE_ADDRS = {"queue_desc": "desc_table", "queue_driver": "avail_ring",
                "queue_device": "used_ring"}


@dataclass(frozen=True)
class VirtioPciState:
    """The core's state, this function's configuration space and MSI-X state, and the
    registers particular to virtio-pci."""

    core: CoreState
    config: PciFunctionState
    msix: MsixState
    device_feature_select: int
    driver_feature_select: int
    queue_select: int
    config_vector: int
    queue_vectors: tuple[int, ...]


class PciInterrupt(Interrupt):
    """Interrupts of a virtio-pci function: an MSI-X vector, or the ISR and INTA."""

    def __init__(self) -> None:
        super().__init__()  # self.fd: the INTx irqfd (level, with resample_fd)
        self.resample_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.transport: VirtioPci | None = None
        # Orders "the ISR has bits, assert the line" against the guest's read-to-clear:
        # without it a resample seen late could assert the line after the guest read the
        # ISR and sent its EOI, and the guest would get an interrupt with nothing in it.
        self.intx_lock = threading.Lock()

    def used(self, queue: int) -> None:
        t = self.transport
        if t is not None:
            t.signal(t.queue_vectors[queue] if queue < len(t.queue_vectors) else NO_VECTOR,
                     INT_USED_BUFFER)

    def config_changed(self) -> None:
        t = self.transport
        if t is not None:
            t.signal(t.config_vector, INT_CONFIG_CHANGE)

    def close(self) -> None:
        super().close()
        if self.resample_fd >= 0:
            os.close(self.resample_fd)
            self.resample_fd = -1


class _ConfigWindow:
    """VIRTIO_PCI_CAP_PCI_CFG (4.1.4.8): pci_cfg_data reaches the BAR at cap.offset."""

    def __init__(self, transport: VirtioPci) -> None:
        self.t = transport
        self.offset = 0  # set once the capability is added

    def _target(self) -> tuple[int, int, int]:
        f = self.t.function
        bar = f.get(self.offset + 4, 1)
        off = f.get(self.offset + 8, 4)
        length = f.get(self.offset + 12, 4)
        return bar, off, length

    def read(self, offset: int, size: int, value: int) -> int:
        if not 16 <= offset < 20:
            return value
        bar, off, length = self._target()
        if length not in (1, 2, 4) or off % length:
            return value
        data = self.t.bar_read(bar, off, length)
        # The data field holds the bytes read; the access may be narrower than it.
        full = int.from_bytes(data.ljust(4, b"\0"), "little")
        return (full >> (8 * (offset - 16))) & ((1 << (8 * size)) - 1)

    def written(self, offset: int, size: int) -> None:
        if offset + size <= 16 or offset >= 20:
            return
        bar, off, length = self._target()
        if length not in (1, 2, 4) or off % length:
            return
        data = self.t.function.get(self.offset + 16, 4).to_bytes(4, "little")[:length]
        self.t.bar_write(bar, off, data)


class _BarDevice:
    """A BAR's range on the MMIO bus, answered by the transport."""

    def __init__(self, transport: VirtioPci, bar: int) -> None:
        self.t = transport
        self.bar = bar

    def read(self, offset: int, size: int) -> bytes:
        return self.t.bar_read(self.bar, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.t.bar_write(self.bar, offset, bytes(data))


class VirtioPci(VirtioTransport):
    """One virtio device as a modern virtio-pci function (see the module docstring)."""

    kind = "virtio-pci"

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 report: Callable[[str], None]) -> None:
        self.nvectors = len(device.queue_sizes) + 1  # one per queue, one for config
        self.queue_vectors: list[int] = []
        self.config_vector = NO_VECTOR
        self.vector_fds: list[int] = []
        interrupt = PciInterrupt()
        try:
            for _ in range(self.nvectors):
                self.vector_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except BaseException:
            interrupt.close()
            self._close_vectors()
            raise
        super().__init__(device, memory, report, interrupt)
        interrupt.transport = self
        self.function = PciFunction(
            vendor=PCI_VENDOR,
            device=device_id(device.device_type),
            class_code=_CLASS.get(device.device_type, _CLASS_OTHER),
            revision=1,
            subsystem_vendor=PCI_VENDOR,
            subsystem=SUBSYSTEM,
            interrupt_pin=1,
            bars=(Bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEM32),
                  Bar(REGS_BAR, REGS_BAR_SIZE, BarKind.MEM64, prefetchable=True)),
            name=device.name,
        )
        self.msix = Msix(self.function, self.nvectors, self._deliver,
                         table=(MSIX_BAR, 0), pba=(MSIX_BAR, PBA_OFFSET))
        f = self.function
        nq = len(self.queues)
        f.add_capability(CAP_ID_VENDOR, _vendor_cap(CAP_COMMON_CFG, REGS_BAR, COMMON, COMMON_SIZE))
        f.add_capability(CAP_ID_VENDOR, _vendor_cap(CAP_ISR_CFG, REGS_BAR, ISR, 1))
        f.add_capability(CAP_ID_VENDOR, _vendor_cap(CAP_DEVICE_CFG, REGS_BAR, DEVICE, 0x1000))
        f.add_capability(CAP_ID_VENDOR, _vendor_cap(
            CAP_NOTIFY_CFG, REGS_BAR, NOTIFY, max(nq, 1) * NOTIFY_MULTIPLIER,
            struct.pack("<I", NOTIFY_MULTIPLIER)))
        window = _ConfigWindow(self)
        body = _vendor_cap(CAP_PCI_CFG, 0, 0, 0, bytes(4))
        # bar, offset, length and pci_cfg_data are the driver's to write
        wmask = b"\0\0" + b"\xff" + b"\0" * 3 + b"\xff" * 12
        window.offset = f.add_capability(CAP_ID_VENDOR, body, wmask, window)
        self.devices = {MSIX_BAR: _BarDevice(self, MSIX_BAR), REGS_BAR: _BarDevice(self, REGS_BAR)}

    def reset_registers(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.queues)

    # --- interrupts (the I/O thread; vCPU threads for NEEDS_RESET) -----------------------
    @property
    def pci_interrupt(self) -> PciInterrupt:
        assert isinstance(self.interrupt, PciInterrupt)
        return self.interrupt

    def signal(self, vector: int, bit: int) -> None:
        """Tell the driver: through vector with MSI-X on, else through the ISR and INTA."""
        irq = self.interrupt
        irq.count += 1
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        irq.set_status(bit)
        self._assert_intx()

    def _assert_intx(self) -> None:
        with self.pci_interrupt.intx_lock:
            if self.interrupt.status and not self.msix.enabled:
                self.function.set_status_bits(STATUS_INTERRUPT, True)
                if not self.function.get(COMMAND, 2) & COMMAND_INTX_DISABLE:
                    os.eventfd_write(self.interrupt.fd, 1)

    def _resampled(self) -> None:
        """The guest's EOI lowered INTA: raise it again if the ISR still has bits."""
        self._assert_intx()

    def host_fds(self) -> dict[int, Callable[[], None]]:
        return {self.pci_interrupt.resample_fd: self._resampled}

    def _deliver(self, vector: int) -> None:
        if 0 <= vector < len(self.vector_fds):
            os.eventfd_write(self.vector_fds[vector], 1)

    # --- BARs (vCPU threads) -------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar == MSIX_BAR:
            if offset >= PBA_OFFSET:
                return self.msix.pba_read(offset - PBA_OFFSET, size)
            return self.msix.table_read(offset, size)
        if bar != REGS_BAR or not 0 < size <= 8:
            return bytes(max(size, 0))
        if offset >= DEVICE and offset < NOTIFY:
            with self.lock:
                return self.read_config(offset - DEVICE, size)
        if offset == ISR and size == 1:
            return bytes([self._read_isr()])
        if offset < COMMON_SIZE:
            with self.lock:
                value = self._common_read(offset, size)
            return value.to_bytes(size, "little")
        return bytes(size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if bar == MSIX_BAR:
            if offset < PBA_OFFSET:
                self.msix.table_write(offset, data)
            return
        if bar != REGS_BAR or not data:
            return
        if offset >= NOTIFY:
            self.kick((offset - NOTIFY) // NOTIFY_MULTIPLIER)
            return
        with self.lock:
            if offset >= DEVICE:
                self.write_config(offset - DEVICE, data)
            elif offset < COMMON_SIZE and len(data) in (1, 2, 4, 8):
                self._common_write(offset, len(data), int.from_bytes(data, "little"))

    def _read_isr(self) -> int:
        with self.pci_interrupt.intx_lock:
            value = self.interrupt.take_status()
            self.function.set_status_bits(STATUS_INTERRUPT, False)
        return value

    @staticmethod
    def _field(offset: int, size: int) -> tuple[str, int, int] | None:
        """(name, field size, byte shift) for an access to a common-configuration field:
        the field at its own size, or a 32-bit half of a 64-bit one."""
        hit = _FIELDS.get(offset)
        if hit is not None and hit[0] == size:
            return hit[1], size, 0
        if size == 4 and offset >= 0x20 and offset % 8 == 4:
            return _FIELDS[offset - 4][1], 8, 32
        if hit is not None and hit[0] == 8 and size == 4:
            return hit[1], 8, 0
        return None

    def _common_read(self, offset: int, size: int) -> int:
        field = self._field(offset, size)
        if field is None:
            return 0
        name, _, shift = field
        q = self.queue(self.queue_select)
        value: int
        if name == "device_feature_select":
            value = self.device_feature_select
        elif name == "device_feature":
            value = self.device_features(self.device_feature_select)
        elif name == "driver_feature_select":
            value = self.driver_feature_select
        elif name == "driver_feature":
            sel = self.driver_feature_select
            value = (self.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        elif name == "config_msix_vector":
            value = self.config_vector
        elif name == "num_queues":
            value = len(self.queues)
        elif name == "device_status":
            value = self.status
        elif name == "config_generation":
            value = self.config_generation & 0xFF
        elif name == "queue_select":
            value = self.queue_select
        elif q is None:
            value = NO_VECTOR if name == "queue_msix_vector" else 0
        elif name == "queue_size":
            value = q.size
        elif name == "queue_msix_vector":
            value = self.queue_vectors[self.queue_select]
        elif name == "queue_enable":
            value = int(q.ready)
        elif name == "queue_notify_off":
            value = self.queue_select
        else:
            value = int(getattr(q, _QUEUE_ADDRS[name]))
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def _vector(self, value: int) -> int:
        """A vector the driver asked for, or NO_VECTOR if this function has no such one."""
        return value if value < self.nvectors else NO_VECTOR

    def _common_write(self, offset: int, size: int, value: int) -> None:
        field = self._field(offset, size)
        if field is None:
            return
        name, _, shift = field
        q = self.queue(self.queue_select)
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            self.set_driver_features(self.driver_feature_select, value)
        elif name == "config_msix_vector":
            self.config_vector = self._vector(value)
        elif name == "device_status":
            self.write_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif q is None:
            return
        elif name == "queue_msix_vector":
            self.queue_vectors[self.queue_select] = self._vector(value)
        elif name == "queue_enable":
            self.set_queue_ready(q, value == 1)
        elif not self.layout_writable(q):
            return
        elif name == "queue_size":
            q.size = value
        elif name in _QUEUE_ADDRS:
            attr = _QUEUE_ADDRS[name]
            mask = ((1 << (8 * size)) - 1) << shift
            old = int(getattr(q, attr))
            setattr(q, attr, (old & ~mask) | ((value << shift) & mask))

    # --- save / restore --------------------------------------------------------------------
    def save(self) -> VirtioPciState:
        with self.lock:
            return VirtioPciState(
                core=self.save_core(),
                config=self.function.save(),
                msix=self.msix.save(),
                device_feature_select=self.device_feature_select,
                driver_feature_select=self.driver_feature_select,
                queue_select=self.queue_select,
                config_vector=self.config_vector,
                queue_vectors=tuple(self.queue_vectors),
            )

    def restore(self, state: VirtioPciState) -> None:
        """Take over a saved function: configuration space (the platform re-maps the
        BARs it decodes), MSI-X (the routes are re-announced), then the core."""
        st = require_state("virtio-pci", state, VirtioPciState)
        self.check_core(st.core)
        config = self.function.check_state(st.config)
        msix = self.msix.check_state(st.msix)
        where = f"{self.device.name} transport"
        for name in ("device_feature_select", "driver_feature_select", "queue_select"):
            require_uint(where, name, getattr(st, name), 32)
        vectors = st.queue_vectors
        if type(vectors) is not tuple or len(vectors) != len(self.queues):
            raise DeviceError(f"{where} state: queue_vectors is not {len(self.queues)} vectors")
        for v in (st.config_vector, *vectors):
            if require_uint(where, "vector", v, 16) != NO_VECTOR and v >= self.nvectors:
                raise DeviceError(f"{where} state: vector {v} (this function has "
                                  f"{self.nvectors})")
        self.function.load_state(config)
        self.msix.load_state(msix)
        with self.lock:
            self.load_core(st.core)
            self.device_feature_select = st.device_feature_select
            self.driver_feature_select = st.driver_feature_select
            self.queue_select = st.queue_select
            self.config_vector = st.config_vector
            self.queue_vectors = list(vectors)
        self._assert_intx()

    def _close_vectors(self) -> None:
        for fd in self.vector_fds:
            os.close(fd)
        self.vector_fds = []

    def close(self) -> None:
        super().close()
        self._close_vectors()
