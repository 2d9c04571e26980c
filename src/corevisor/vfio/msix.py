"""MSI-X of a passed-through device: the capability's control word and the table, emulated.

The guest programs a table of {address, data, mask} per vector in a BAR; what it writes
there is only ever the message its own vectors are routed to, so the table lives here
(pci/msix.py's Msix: the same register logic a virtio-pci function has, hosted on a
private PciFunction that holds nothing but the capability) and the host kernel
programs the device's real table when VFIO_DEVICE_SET_IRQS turns MSI-X on. Each
vector (up to MAX_VECTORS) is an eventfd with a KVM irqfd on a GSI of the machine's
routing; Msix's on_route gives that GSI the guest's message whenever an unmasked
vector changes, and on_enable switches VFIO between MSI-X and INTx.

The BAR holding the table or the pending bits is trapped (never mmapped), and its
accesses inside the table or the PBA are answered here; the rest of it goes to the
device. A masked vector keeps its last route (VFIO cannot mask MSI-X vectors one by
one in this kernel's API); the guest's PBA reads as nothing pending.

What does not live here: the function (function.py), the routing table (pci/routing.py).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from corevisor.kvm import bindings as b
from corevisor.pci.config import PciFunction
from corevisor.pci.msix import ENTRY_SIZE, Msix
from corevisor.vfio.container import Device

__all__ = ["PassthroughMsix", "MAX_VECTORS"]

MAX_VECTORS = 64  # vectors wired to eventfds; the table may list more (they stay silent)
_CAP_LEN = 12


class PassthroughMsix:
    """The MSI-X of one passed-through function (see the module docstring)."""

    def __init__(self, device: Device, config: bytes, at: int, name: str,
                 intx: Callable[[bool], None], report: Callable[[str], None]) -> None:
        control, table, pba = struct.unpack_from("<HII", config, at + 2)
        self.at = at
        self.vectors: int = (control & 0x7FF) + 1
        self.table: tuple[int, int] = (table & 7, table & ~7)
        self.pba: tuple[int, int] = (pba & 7, pba & ~7)
        self.device = device
        self._intx = intx
        self._report = report
        self._shadow = PciFunction(vendor=0, device=0, class_code=0, name=name)
        self.msix = Msix(self._shadow, self.vectors, lambda vector: None, self.table, self.pba)
        self.msix.on_enable = self._enabled
        self.msix.on_route = self._route
        wired = min(self.vectors, MAX_VECTORS, device.irq(b.VFIO_PCI_MSIX_IRQ_INDEX).count)
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(wired)]
        self.gsis: list[int] = []
        self.set_route: Callable[[int, int, int], None] = lambda gsi, addr, data: None

    @property
    def bars(self) -> set[int]:
        """The BARs that must be trapped: the table's and the PBA's."""
        return {self.table[0], self.pba[0]}

    # --- the capability (bytes 2..11: control, table and PBA words) ----------------------
    def owns(self, offset: int) -> bool:
        return 2 <= offset - self.at < _CAP_LEN

    def cap_byte(self, offset: int) -> int:
        return self._shadow.get(self.msix.offset + offset - self.at, 1)

    def cap_write(self, offset: int, data: bytes) -> None:
        """A guest write over the capability: only the control word's two bits stick."""
        control = bytearray(self._shadow.get(self.msix.offset + 2, 2).to_bytes(2, "little"))
        for i, byte in enumerate(data):
            rel = offset + i - self.at
            if rel in (2, 3):
                control[rel - 2] = byte
        self._shadow.write(self.msix.offset + 2, 2, int.from_bytes(control, "little"))

    # --- the table and the PBA in their BAR -------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> bytes | None:
        """The answer for an access the table or PBA covers, else None (the device's)."""
        if bar == self.table[0] and 0 <= offset - self.table[1] < ENTRY_SIZE * self.vectors:
            return self.msix.table_read(offset - self.table[1], size)
        if bar == self.pba[0] and 0 <= offset - self.pba[1] < 8 * ((self.vectors + 63) // 64):
            return self.msix.pba_read(offset - self.pba[1], size)
        return None

    def bar_write(self, bar: int, offset: int, data: bytes) -> bool:
        """Take a write the table or PBA covers (True), or leave it to the device."""
        if bar == self.table[0] and 0 <= offset - self.table[1] < ENTRY_SIZE * self.vectors:
            self.msix.table_write(offset - self.table[1], data)
            return True
        return bar == self.pba[0] and 0 <= offset - self.pba[1] < 8 * ((self.vectors + 63) // 64)

    # --- delivery ---------------------------------------------------------------------------
    def _route(self, vector: int) -> None:
        if vector >= len(self.gsis):
            return
        address, data, masked = self.msix.entry(vector)
        if not masked and address:
            self.set_route(self.gsis[vector], address, data)

    def _enabled(self, on: bool) -> None:
        from corevisor.errors import KvmError, VfioError

        try:
            if on:
                self._intx(False)
                self.device.set_irqs(b.VFIO_PCI_MSIX_IRQ_INDEX, b.VFIO_IRQ_SET_ACTION_TRIGGER,
                                     self.fds)
            else:
                self.device.set_irqs(b.VFIO_PCI_MSIX_IRQ_INDEX, b.VFIO_IRQ_SET_ACTION_TRIGGER, [])
                self._intx(True)
        except (VfioError, KvmError) as e:
            self._report(str(e))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
