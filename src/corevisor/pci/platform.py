"""A machine's PCI bus wired into its VM: BAR windows on the buses, ioeventfds, placement.

PciPlatform owns bus 0 (host.py) and the machine-side of every function on it:

- where BARs go. Without firmware the VMM is the firmware: ``place`` gives each BAR of
  a function an address from the machine's resource map (resources.py) — memory BARs
  from the 32-bit window below 4 GiB, 64-bit ones from the window above RAM when the
  32-bit one is full, I/O BARs from the port window — and turns decoding on, in slot
  and BAR order, so a machine is laid out the same way every time; it also writes each
  function's INTx line into INTERRUPT_LINE, as firmware does. With firmware
  (SeaBIOS), the BARs start unassigned and the firmware assigns them, as on a PC.
- what a decoded BAR reaches. Whenever a function's set of decoded windows changes
  (config.py's on_window: the guest wrote COMMAND or a BAR), the old window's bus
  mapping, resource claim and ioeventfds go and the new window's come. A window the
  guest puts over something else (RAM, a channel, another BAR) is not mapped — the
  guest's accesses there reach what was there — and the refusal is reported once.

It also holds the machine's GSI routing (routing.py) for the functions' MSI/MSI-X
vectors. Everything here runs on vCPU threads (configuration writes) and the builder's
thread; one lock orders window changes.

What does not live here: configuration-space logic (config.py, host.py), the devices
(virtio/pci.py), the addresses (layout.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from corevisor.arch.x86_64 import layout
from corevisor.bus import Bus
from corevisor.devices import Device
from corevisor.errors import ConfigError
from corevisor.kvm.ioctls import VmFd
from corevisor.pci.config import INTERRUPT_LINE, INTERRUPT_PIN, BarKind, BarWindow, PciFunction
from corevisor.pci.host import PciRoot
from corevisor.pci.routing import GsiRouting
from corevisor.resources import PCI_IO, PCI_MMIO32, PCI_MMIO64, Resources, Space

__all__ = ["PciPlatform", "Ioeventfd", "FunctionWiring"]


@dataclass(frozen=True)
class Ioeventfd:
    """A doorbell inside a BAR: writes of length bytes at offset signal fd in the kernel."""

    offset: int
    length: int
    fd: int
    datamatch: int | None = None


@dataclass
class FunctionWiring:
    """What a function's BARs reach: a Device per BAR and the doorbells in each."""

    function: PciFunction
    slot: int
    devices: dict[int, Device]
    ioeventfds: dict[int, list[Ioeventfd]] = field(default_factory=dict)

    def where(self, index: int) -> str:
        return f"pci 00:{self.slot:02x}.0 ({self.function.name}) BAR{index}"


class PciPlatform:
    """A machine's bus 0 and the wiring of its functions (see the module docstring)."""

    def __init__(
        self,
        root: PciRoot,
        vm: VmFd,
        res: Resources,
        pio: Bus,
        mmio: Bus,
        report: Callable[[str], None],
    ) -> None:
        self.root = root
        self.vm = vm
        self.res = res
        self.pio = pio
        self.mmio = mmio
        self.report = report
        self.routing = GsiRouting(vm, res)
        self._lock = threading.RLock()
        self._wired: dict[int, FunctionWiring] = {}
        self._refused: set[tuple[int, int, int]] = set()

    def add(
        self,
        function: PciFunction,
        devices: dict[int, Device],
        ioeventfds: dict[int, list[Ioeventfd]] | None = None,
        slot: int | None = None,
    ) -> int:
        """Put function in slot (default: the lowest free one); return the slot."""
        slot = self.root.free_slot() if slot is None else slot
        if slot is None:
            raise ConfigError(f"{self.res.name}: no free PCI slot for {function.name}")
        missing = set(function.bars) - set(devices)
        if missing:
            raise ValueError(f"{function.name}: no device behind BARs {sorted(missing)}")
        self.root.add(function, slot)
        wiring = FunctionWiring(function, slot, devices, ioeventfds or {})
        self._wired[slot] = wiring
        function.on_window = lambda i, old, new: self._move(wiring, i, old, new)
        for index, window in function.windows().items():
            self._move(wiring, index, None, window)
        return slot

    # --- placement (no firmware) --------------------------------------------------------
    def place(self, function: PciFunction) -> None:
        """Assign every BAR of function an address and turn its decoding on, and write
        its INTx line into INTERRUPT_LINE, as firmware does (layout.pci_intx_gsi)."""
        wiring = next(w for w in self._wired.values() if w.function is function)
        pin = function.read(INTERRUPT_PIN, 1)
        if 1 <= pin <= 4:
            function.write(INTERRUPT_LINE, 1, layout.pci_intx_gsi(wiring.slot, pin))
        for index, bar in sorted(function.bars.items()):
            owner = wiring.where(index)
            if bar.kind is BarKind.IO:
                base = self.res.allocate(Space.PIO, bar.size, owner, pool=PCI_IO, align=bar.size)
            else:
                base = self.res.allocate(Space.GPA, bar.size, owner, pool=PCI_MMIO32,
                                         align=max(bar.size, 0x1000))
                if base is None and bar.kind is BarKind.MEM64:
                    base = self.res.allocate(Space.GPA, bar.size, owner, pool=PCI_MMIO64,
                                             align=max(bar.size, 0x1000))
            if base is None:
                raise ConfigError(f"{self.res.name}: no room for {owner} ({bar.size:#x} bytes)")
            function.place_bar(index, base)

    # --- windows ------------------------------------------------------------------------
    def _move(self, wiring: FunctionWiring, index: int, old: BarWindow | None,
              new: BarWindow | None) -> None:
        with self._lock:
            if old is not None:
                self._unmap(wiring, index, old)
            if new is not None:
                self._map(wiring, index, new)

    def _space(self, window: BarWindow) -> tuple[Space, Bus]:
        return (Space.PIO, self.pio) if window.io else (Space.GPA, self.mmio)

    def _unmap(self, wiring: FunctionWiring, index: int, window: BarWindow) -> None:
        space, bus = self._space(window)
        owner = wiring.where(index)
        if bus.detach(owner) is None:
            return  # it was refused, never mapped
        self.res.release(space, window.base, owner)
        for door in wiring.ioeventfds.get(index, ()):
            self.vm.ioeventfd(door.fd, window.base + door.offset, door.length, pio=window.io,
                              datamatch=door.datamatch, deassign=True)

    def _map(self, wiring: FunctionWiring, index: int, window: BarWindow) -> None:
        space, bus = self._space(window)
        owner = wiring.where(index)
        held = any(c.start == window.base and c.owner == owner for c in self.res.claims(space))
        if not held:
            pool = self.res.pool_of(space, window.base, window.size)
            other = self.res.conflict(space, window.base, window.size, pool)
            if other is not None or window.end > (1 << 16 if window.io else 1 << 52):
                key = (wiring.slot, index, window.base)
                if key not in self._refused:
                    self._refused.add(key)
                    what = other.owner if other is not None else "the end of the address space"
                    self.report(f"{owner} at {window.base:#x}+{window.size:#x} overlaps {what}: "
                                "not mapped")
                return
            self.res.claim(space, window.base, window.size, owner, pool=pool)
        bus.attach(window.base, window.size, wiring.devices[index], owner)
        for door in wiring.ioeventfds.get(index, ()):
            self.vm.ioeventfd(door.fd, window.base + door.offset, door.length, pio=window.io,
                              datamatch=door.datamatch)
