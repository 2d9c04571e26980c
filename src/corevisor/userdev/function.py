"""A user device that is a PCI function (``REGION = Pci(...)``): its configuration space,
its BARs on the machine's PCI platform, and its interrupt as INTx or MSI.

The function is a ``pci.config.PciFunction`` built from the class's declaration — the
same configuration-space logic, BAR sizing and placement, window mapping and snapshot
bytes the virtio-pci functions use (pci/platform.py places its BARs when there is no
firmware, and moves their bus mappings whenever the guest reprograms them). Each BAR is
a ``BarPort`` on the bus, which hands the access to the device's one ``Contained``
(attach.py) with the BAR's index: the device sees ``read(bar, offset, size)`` and
``write(bar, offset, data)``, never configuration space.

Interrupts: the device's ``host.irq`` is an ``IrqLine`` whose level is the function's
interrupt request. Without MSI it is INTx pin A on the slot's routed GSI
(layout.pci_intx_gsi, level-triggered): STATUS's interrupt bit follows the request, and
the line is asserted while the request is high and COMMAND's INTx-disable bit is clear.
The lines are shared (slots 1 and 2 both route to GSI 10), so ``SharedLines`` ORs the
machine's user functions on each GSI in user space (they all use KVM_IRQ_LINE, one
source to KVM; virtio-pci's irqfds are another source, which KVM ORs itself). With the
MSI capability enabled by the guest (one vector, pci/msi.py), INTx stays low and each
rise of the request sends the message the guest programmed (KVM_SIGNAL_MSI).

What does not live here: the public declaration (__init__.py: ``Pci``, ``Bar``), the
containment, timers and snapshots shared with port and MMIO devices (attach.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from corevisor.arch.x86_64 import layout
from corevisor.pci import config as cfg
from corevisor.pci.msi import Msi
from corevisor.userdev import Pci

if TYPE_CHECKING:
    from corevisor.userdev.attach import Contained

__all__ = ["UserFunction", "BarPort", "SharedLines"]

INTA = 1


class SharedLines:
    """The INTx GSIs of a machine's user PCI functions, each the OR of its functions."""

    def __init__(self, irq_line: Callable[[int, int], None]) -> None:
        self._irq_line = irq_line
        self._lock = threading.Lock()
        self._high: dict[int, set[int]] = {}

    def set(self, gsi: int, slot: int, level: bool) -> None:
        """Slot asserts (level) or releases gsi; the chip sees a change of the OR only."""
        with self._lock:
            high = self._high.setdefault(gsi, set())
            before = bool(high)
            if level:
                high.add(slot)
            else:
                high.discard(slot)
            if bool(high) != before:
                self._irq_line(gsi, int(bool(high)))


class UserFunction(cfg.PciFunction):
    """The configuration space of a user device's PCI function and its interrupt logic
    (see the module docstring); slot and lines are set by attach before any access."""

    def __init__(self, region: Pci, name: str, signal_msi: Callable[[int, int], object]) -> None:
        bars = [cfg.Bar(i, b.size, cfg.BarKind.IO if b.io else cfg.BarKind.MEM32)
                for i, b in enumerate(region.bars)]
        super().__init__(
            vendor=region.vendor,
            device=region.device,
            class_code=region.class_code,
            revision=region.revision,
            subsystem_vendor=region.subsystem_vendor,
            subsystem=region.subsystem,
            interrupt_pin=INTA if region.interrupt else 0,
            bars=bars,
            name=name,
        )
        self.slot = 0
        self.lines: SharedLines | None = None
        self._signal_msi = signal_msi
        self._intx_lock = threading.Lock()
        self._request = False  # the device's line, as it set it
        self._asserted = False  # what this function drives onto its INTx GSI
        self.msi = Msi(self, 1, self._send) if region.interrupt else None

    @property
    def gsi(self) -> int:
        """Its INTx line: pin A of its slot, as the platform routes it."""
        return layout.pci_intx_gsi(self.slot, INTA)

    def _send(self, vector: int) -> None:
        assert self.msi is not None
        address, data, _ = self.msi.entry(vector)
        self._signal_msi(address, data)

    def set_request(self, level: int) -> None:
        """The device's IrqLine drives this: its interrupt request rose or fell."""
        with self._intx_lock:
            rose = bool(level) and not self._request
            self._request = bool(level)
            self.set_status_bits(cfg.STATUS_INTERRUPT, self._request)
            msi = self.msi is not None and self.msi.enabled
            self._update()
        if rose and msi:
            assert self.msi is not None
            self.msi.notify(0)

    def _update(self) -> None:
        """Drive INTx as the request, INTX_DISABLE and MSI say (under _intx_lock)."""
        disabled = self.command() & cfg.COMMAND_INTX_DISABLE or (
            self.msi is not None and self.msi.enabled)
        want = self._request and not disabled
        if want != self._asserted and self.lines is not None:
            self._asserted = want
            self.lines.set(self.gsi, self.slot, want)

    def config_written(self, offset: int, size: int) -> None:
        """Any write may have flipped INTX_DISABLE or MSI's enable: re-drive INTx."""
        with self._intx_lock:
            self._update()


class BarPort:
    """One BAR of a user function on its bus: the access goes to the device with the
    BAR's index (a Device as devices/__init__.py has it)."""

    def __init__(self, device: Contained, bar: int) -> None:
        self.device = device
        self.bar = bar

    def read(self, offset: int, size: int) -> bytes:
        return self.device.read(offset, size, self.bar)

    def write(self, offset: int, data: bytes) -> None:
        self.device.write(offset, data, self.bar)
