"""A passed-through device as a function on the machine's PCI bus: config space, BARs, IRQs.

**Configuration space** is virtualised the way a VMM must: the guest sees the device's
own bytes (read through the VFIO config region, which the host kernel itself already
filters), except for what belongs to the guest's machine and not to the host's:

- COMMAND (0x04-0x05): emulated (its I/O and memory bits decide what the BARs decode
  here) and written through (bus mastering and INTx disable reach the device);
- the BARs (0x10-0x27) and the ROM BAR (0x30-0x33): emulated, addresses in the guest's
  PCI windows, sizes and type bits the device's; no ROM;
- INTERRUPT_LINE (0x3C): emulated, the GSI the guest's INTx goes to;
- the MSI capability: emulated; each write re-programs the vectors, eventfds
  (VFIO_DEVICE_SET_IRQS) whose irqfds KVM routes to the message the guest wrote (the host
  kernel programs the device's real message);
- an MSI-X capability: its control word emulated, and its table and PBA in their
  (trapped) BAR, by msix.py; hidden from the list if they are not in a BAR;
- everything else: the device's.

**BARs** are mapped into the guest as KVM memory slots over the device's own mmap of
them (VFIO_REGION_INFO_FLAG_MMAP; accesses never leave the guest) and move when the
guest moves them; a BAR VFIO does not let be mmapped (or smaller than a page) is trapped:
the bus forwards each access with pread/pwrite on the device fd.

**Interrupts**: INTx is level-triggered through an irqfd with a resample fd, which
vfio-pci takes as its unmask eventfd (the device's line is masked by the host when it
fires and unmasked by the guest's EOI, all in the kernels); MSI vectors are eventfds
with irqfds on GSIs from the machine's routing (pci/routing.py). Enabling MSI turns
INTx off in VFIO and disabling it turns INTx back on, as the hardware does.

Guest input never raises here (a failed pread reads as all ones); a passthrough
device has no state corevisor could save, so a snapshot of its machine is refused.
What does not live here: the fds (container.py), the host checks (host.py), the DMA
map and the builder step (attach.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError, KvmError
from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import VmFd
from corevisor.pci.config import (
    BAR0,
    CAP_ID_MSI,
    CAP_ID_MSIX,
    CAPABILITIES,
    CLASS,
    COMMAND,
    CONFIG_SIZE,
    DEVICE_ID,
    EXT_CONFIG_SIZE,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    NO_DEVICE,
    REVISION,
    SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID,
    VENDOR_ID,
    Bar,
    BarKind,
    BarWindow,
    PciFunction,
)
from corevisor.vfio.container import Device, RegionInfo
from corevisor.vfio.msix import PassthroughMsix

__all__ = ["VfioFunction", "VfioBar", "MsiMessage"]

ROM_BAR = 0x30
_PAGE = 0x1000
_MAX_MSI = 32
# Bytes of configuration space the guest's machine owns (see the module docstring).
_EMULATED = frozenset(
    {COMMAND, COMMAND + 1, INTERRUPT_LINE, *range(BAR0, BAR0 + 24), *range(ROM_BAR, ROM_BAR + 4)}
)
_NOT_WRITTEN_THROUGH = frozenset({INTERRUPT_LINE, *range(BAR0, BAR0 + 24),
                                  *range(ROM_BAR, ROM_BAR + 4)})
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass(frozen=True)
class MsiMessage:
    """What the guest programmed into the MSI capability."""

    enabled: bool
    vectors: int
    address: int
    data: int


def _pread(device: Device, offset: int, size: int) -> bytes:
    """size bytes of the device fd at offset; all ones if the device does not answer
    (a guest's access never raises)."""
    try:
        data = device.pread(offset, size)
    except OSError:
        return b"\xff" * size
    return data if len(data) == size else b"\xff" * size


class VfioBar:
    """A trapped BAR: every access forwarded to the device's region (Device protocol),
    except those the emulated MSI-X table or PBA covers."""

    def __init__(self, device: Device, region: RegionInfo,
                 msix: PassthroughMsix | None = None) -> None:
        self.device = device
        self.region = region
        self.index = region.index - b.VFIO_PCI_BAR0_REGION_INDEX
        self.msix = msix if msix is not None and self.index in msix.bars else None

    def read(self, offset: int, size: int) -> bytes:
        if not 0 < size <= 8 or offset + size > self.region.size:
            return b"\xff" * max(size, 0)
        if self.msix is not None:
            answer = self.msix.bar_read(self.index, offset, size)
            if answer is not None:
                return answer
        return _pread(self.device, self.region.offset + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        if not 0 < len(data) <= 8 or offset + len(data) > self.region.size:
            return
        if self.msix is not None and self.msix.bar_write(self.index, offset, data):
            return
        try:
            self.device.pwrite(self.region.offset + offset, data)
        except OSError:
            pass


def _capabilities(config: bytes) -> list[tuple[int, int]]:
    """(offset, id) of each capability in the standard list, in list order."""
    out: list[tuple[int, int]] = []
    at = config[CAPABILITIES] & 0xFC
    while at and len(out) < 48 and at + 1 < CONFIG_SIZE:
        out.append((at, config[at]))
        at = config[at + 1] & 0xFC
    return out


def _msi_shadow(config: bytes, at: int) -> tuple[bytearray, bytes]:
    """The MSI capability's bytes as the guest will see them, and their write mask.

    Emulated, not passed through: the host kernel programs the device's real message
    when VFIO_DEVICE_SET_IRQS turns MSI on, so what the guest writes here is only ever
    the message its own vectors are routed to (PCI 3.0, 6.8.1)."""
    if not at:
        return bytearray(), b""
    control = int.from_bytes(config[at + 2:at + 4], "little")
    wide, masking = bool(control & 1 << 7), bool(control & 1 << 8)
    length = 10 + (4 if wide else 0) + (10 if masking else 0)
    shadow = bytearray(config[at:at + length])
    shadow[2:4] = (control & ~0x71).to_bytes(2, "little")  # MSI off, one vector enabled
    wmask = bytearray(length)
    wmask[2] = 0x71  # Enable, Multiple Message Enable
    wmask[4:8] = (0xFFFFFFFC).to_bytes(4, "little")
    data_at = 12 if wide else 8
    if wide:
        wmask[8:12] = b"\xff" * 4
    wmask[data_at:data_at + 2] = b"\xff\xff"
    if masking:
        wmask[data_at + 4:data_at + 8] = b"\xff" * 4  # the mask bits
    return shadow, bytes(wmask)


def _bars(device: Device, config: bytes) -> tuple[list[Bar], dict[int, RegionInfo]]:
    """The BARs as the device declares them (sizes from VFIO, kinds from the registers)."""
    bars: list[Bar] = []
    regions: dict[int, RegionInfo] = {}
    index = 0
    while index < 6:
        region = device.region(b.VFIO_PCI_BAR0_REGION_INDEX + index)
        low = int.from_bytes(config[BAR0 + 4 * index: BAR0 + 4 * index + 4], "little")
        wide = not low & 1 and (low >> 1) & 3 == 2
        if region.size:
            kind = BarKind.IO if low & 1 else BarKind.MEM64 if wide else BarKind.MEM32
            bars.append(Bar(index, region.size, kind, prefetchable=bool(low & 8)))
            regions[index] = region
        index += 2 if wide else 1
    return bars, regions


class VfioFunction(PciFunction):
    """The device behind fd as a function of the guest's bus (see the module docstring)."""

    def __init__(self, device: Device, vm: VmFd, name: str,
                 report: Callable[[str], None]) -> None:
        self.device = device
        self.vm = vm
        self.report = report
        self.config_region = device.region(b.VFIO_PCI_CONFIG_REGION_INDEX)
        config = device.pread(self.config_region.offset, CONFIG_SIZE)
        if len(config) != CONFIG_SIZE:
            raise DeviceError(f"{name}: {len(config)} bytes of configuration space")
        bars, self.regions = _bars(device, config)

        def field(offset: int, size: int) -> int:
            return int.from_bytes(config[offset:offset + size], "little")

        super().__init__(
            vendor=field(VENDOR_ID, 2), device=field(DEVICE_ID, 2),
            class_code=field(CLASS, 3), revision=field(REVISION, 1),
            subsystem_vendor=field(SUBSYSTEM_VENDOR_ID, 2), subsystem=field(SUBSYSTEM_ID, 2),
            interrupt_pin=field(INTERRUPT_PIN, 1), bars=bars, name=name,
        )
        caps = _capabilities(config)
        self.msi_cap = next((at for at, cap in caps if cap == CAP_ID_MSI), 0)
        self._msi_bytes, self._msi_wmask = _msi_shadow(config, self.msi_cap)
        self._msi_lock = threading.Lock()
        self.msix = self._msix(config, caps, name)
        self._next_override = self._hide(caps, CAP_ID_MSIX) if self.msix is None else {}
        self.msi_count = min(device.irq(b.VFIO_PCI_MSI_IRQ_INDEX).count, _MAX_MSI)
        self.msi_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                        for _ in range(self.msi_count if self.msi_cap else 0)]
        self.msi_gsis: list[int] = []
        self.set_msi_route: Callable[[int, int, int], None] = lambda gsi, addr, data: None
        self.intx_fds: tuple[int, int] | None = None  # (trigger, resample) once wired
        self._intx_on = False
        self._msi = self.msi_message()
        self._maps: dict[int, tuple[int, int]] = {}  # BAR -> (host address, KVM slot)
        self._mapped: dict[int, int] = {}  # BAR -> guest address it is mapped at

    def _msix(self, config: bytes, caps: list[tuple[int, int]],
              name: str) -> PassthroughMsix | None:
        """The emulated MSI-X, if the device has one whose table and PBA are in BARs."""
        at = next((at for at, cap in caps if cap == CAP_ID_MSIX), 0)
        if not at:
            return None
        msix = PassthroughMsix(self.device, config, at, f"{name} MSI-X", self._intx,
                               self.report)
        if not msix.bars <= set(self.regions):
            msix.close()
            return None  # hidden instead
        return msix

    @staticmethod
    def _hide(caps: list[tuple[int, int]], cap_id: int) -> dict[int, int]:
        """Next-pointer overrides that take every cap_id capability out of the list."""
        override: dict[int, int] = {}
        kept = [at for at, cap in caps if cap != cap_id]
        if len(kept) == len(caps):
            return override
        override[CAPABILITIES] = kept[0] if kept else 0
        for here, nxt in zip(kept, [*kept[1:], 0], strict=True):
            override[here + 1] = nxt
        return override

    # --- configuration space ------------------------------------------------------------
    def _device_bytes(self, offset: int, size: int) -> bytes:
        return _pread(self.device, self.config_region.offset + offset, size)

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= EXT_CONFIG_SIZE - size:
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else NO_DEVICE
        if offset >= CONFIG_SIZE or offset + size > self.config_region.size:
            return 0
        own = super().read(offset, size).to_bytes(size, "little")
        theirs = self._device_bytes(offset, size)
        out = bytearray(theirs)
        for i in range(size):
            at = offset + i
            if at in _EMULATED:
                out[i] = own[i]
            elif at in self._next_override:  # before MSI's bytes: its next pointer too
                out[i] = self._next_override[at]
            elif self.msix is not None and self.msix.owns(at):
                out[i] = self.msix.cap_byte(at)
            elif 0 <= at - self.msi_cap < len(self._msi_bytes):
                out[i] = self._msi_bytes[at - self.msi_cap]
        return int.from_bytes(out, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SIZE - size:
            return
        touched = range(offset, offset + size)
        if any(at in _EMULATED for at in touched):
            super().write(offset, size, value)
        if any(at in _NOT_WRITTEN_THROUGH for at in touched):
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.msix is not None and any(self.msix.owns(at) for at in touched):
            self.msix.cap_write(offset, data)
            return
        msi = [at - self.msi_cap for at in touched if 0 <= at - self.msi_cap < len(self._msi_bytes)]
        if msi:
            with self._msi_lock:
                for at in msi:
                    byte, mask = data[at + self.msi_cap - offset], self._msi_wmask[at]
                    self._msi_bytes[at] = (self._msi_bytes[at] & ~mask) | (byte & mask)
            self._msi_written()
            return
        try:
            self.device.pwrite(self.config_region.offset + offset, data)
        except OSError:
            return

    # --- MSI ------------------------------------------------------------------------------
    def msi_message(self) -> MsiMessage:
        """The MSI capability as the guest left it."""
        cap = bytes(self._msi_bytes) + bytes(16)
        control = int.from_bytes(cap[2:4], "little")
        wide = bool(control & (1 << 7))
        address = int.from_bytes(cap[4:8], "little")
        if wide:
            address |= int.from_bytes(cap[8:12], "little") << 32
        data_at = 12 if wide else 8
        data = int.from_bytes(cap[data_at:data_at + 2], "little")
        vectors = min(1 << ((control >> 4) & 7), self.msi_count)
        return MsiMessage(bool(control & 1), vectors, address, data)

    def _msi_written(self) -> None:
        with self._msi_lock:
            old, new = self._msi, self.msi_message()
            if new == old:
                return
            self._msi = new
            try:
                if new.enabled:
                    for v in range(new.vectors):
                        data = (new.data & ~(new.vectors - 1)) | v
                        self.set_msi_route(self.msi_gsis[v], new.address, data)
                if new.enabled != old.enabled or (new.enabled and new.vectors != old.vectors):
                    self._switch_msi(old, new)
            except (KvmError, DeviceError, OSError) as e:
                self.report(f"{self.name}: MSI not delivered: {e}")

    def _switch_msi(self, old: MsiMessage, new: MsiMessage) -> None:
        """MSI on, off or resized: VFIO takes one interrupt kind at a time."""
        from corevisor.errors import VfioError

        try:
            if old.enabled:
                self.device.set_irqs(b.VFIO_PCI_MSI_IRQ_INDEX, b.VFIO_IRQ_SET_ACTION_TRIGGER, [])
            if new.enabled:
                self._intx(False)
                self.device.set_irqs(b.VFIO_PCI_MSI_IRQ_INDEX, b.VFIO_IRQ_SET_ACTION_TRIGGER,
                                     self.msi_fds[:new.vectors])
            else:
                self._intx(True)
        except VfioError as e:
            self.report(str(e))

    def _intx(self, on: bool) -> None:
        """INTx on (its trigger eventfd, the resample fd as unmask) or off, once each:
        VFIO refuses a second unmask eventfd (EBUSY)."""
        if self.intx_fds is None or on == self._intx_on:
            return
        trigger, resample = self.intx_fds
        index = b.VFIO_PCI_INTX_IRQ_INDEX
        self._intx_on = on
        if not on:
            self.device.set_irqs(index, b.VFIO_IRQ_SET_ACTION_TRIGGER, [])
            return
        self.device.set_irqs(index, b.VFIO_IRQ_SET_ACTION_TRIGGER, [trigger])
        self.device.set_irqs(index, b.VFIO_IRQ_SET_ACTION_UNMASK, [resample])

    def wire_intx(self, gsi: int) -> None:
        """INTx to gsi: an irqfd with a resample fd, the resample fd as VFIO's unmask."""
        if not self.read(INTERRUPT_PIN, 1) or not self.device.irq(b.VFIO_PCI_INTX_IRQ_INDEX).count:
            return
        trigger = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.intx_fds = (trigger, resample)
        self.vm.irqfd(trigger, gsi, resample_fd=resample)
        self._intx(True)

    # --- BARs in guest memory ------------------------------------------------------------------
    def mmap_bars(self, slot: Callable[[str], int]) -> None:
        """mmap every BAR VFIO allows (whole pages), each with a KVM slot from slot(owner)."""
        for index, region in self.regions.items():
            bar = self.bars[index]
            trapped = self.msix is not None and index in self.msix.bars
            if bar.io or trapped or not region.mmappable or region.size % _PAGE:
                continue
            addr = _libc.mmap(None, region.size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED, self.device.fd, region.offset)
            if addr is None or addr == _MAP_FAILED:
                continue  # trapped instead
            self._maps[index] = (addr, slot(f"{self.name} BAR{index}"))

    def window_moved(self, index: int, old: BarWindow | None, new: BarWindow | None) -> None:
        """The guest moved, enabled or disabled BAR index: move its memory slot along."""
        if index not in self._maps:
            return
        host, slot = self._maps[index]
        try:
            if index in self._mapped:
                self.vm.set_user_memory_region(slot, self._mapped.pop(index), 0, 0)
            if new is not None:
                self.vm.set_user_memory_region(slot, new.base, new.size, host)
                self._mapped[index] = new.base
        except KvmError as e:
            self.report(f"{self.name} BAR{index} at {new.base if new else 0:#x}: not mapped "
                        f"directly ({e}); its accesses are forwarded")

    # --- lifecycle -------------------------------------------------------------------------------
    def save(self) -> object:  # type: ignore[override]
        raise DeviceError(f"{self.name}: a passed-through device's state is the hardware's: "
                          "a machine with --vfio cannot be snapshotted or migrated")

    def close(self) -> None:
        """Interrupts off, BAR mappings gone, fds closed (the machine is stopped)."""
        for index, (host, slot) in self._maps.items():
            if index in self._mapped:
                try:
                    self.vm.set_user_memory_region(slot, self._mapped[index], 0, 0)
                except KvmError:
                    pass
            _libc.munmap(host, self.regions[index].size)
        self._maps.clear()
        for fd in [*self.msi_fds, *(self.intx_fds or ())]:
            os.close(fd)
        self.msi_fds = []
        self.intx_fds = None
        if self.msix is not None:
            self.msix.close()
        self.device.close()
