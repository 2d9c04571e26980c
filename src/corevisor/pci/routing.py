"""KVM's GSI routing table, with one MSI route per MSI/MSI-X vector in use.

KVM_SET_GSI_ROUTING replaces the whole table, so GsiRouting keeps all of it: the
irqchip routes KVM installs by default (arch/x86/kvm/irq_comm.c: GSIs 0-15 to the
IOAPIC pin of the same number and to the PIC, 16-23 to the IOAPIC only, so the PIT
stays on pin 0 and every legacy line keeps working), plus an MSI route for every
vector GSI that has a message. A vector is a GSI from resources.MSI_GSIS with an
irqfd bound to its eventfd; raising the vector is one write(2) from the device's I/O
thread, and KVM turns it into the message the guest programmed (the LAPIC does the
rest), so no vCPU thread and no userspace exit is involved.

Routes change only when the guest reprograms an unmasked vector (set_msi); an unchanged
message is not pushed again. Saved state holds no routes: the MSI-X and MSI state of
each function is saved, and restoring it announces every route again.

What does not live here: the vectors themselves (msix.py, msi.py), the devices.
"""

from __future__ import annotations

import threading

from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import VmFd
from corevisor.resources import MSI_GSIS, Resources, Space

__all__ = ["GsiRouting", "default_routes"]

_ISA_IRQS = 16
_IOAPIC_PINS = 24


def default_routes() -> list[tuple[int, int, int, int, int]]:
    """The irqchip routes of KVM's default table, in its order."""
    routes: list[tuple[int, int, int, int, int]] = []
    for gsi in range(_IOAPIC_PINS):
        routes.append((gsi, b.KVM_IRQ_ROUTING_IRQCHIP, b.KVM_IRQCHIP_IOAPIC, gsi, 0))
        if gsi < _ISA_IRQS:
            chip = b.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else b.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, b.KVM_IRQ_ROUTING_IRQCHIP, chip, gsi % 8, 0))
    return routes


class GsiRouting:
    """The machine's routing table (see the module docstring)."""

    def __init__(self, vm: VmFd, res: Resources) -> None:
        self._vm = vm
        self._res = res
        self._lock = threading.Lock()
        self._msi: dict[int, tuple[int, int]] = {}

    def allocate(self, owner: str) -> int:
        """A GSI for one vector of owner (no route until set_msi)."""
        gsi = self._res.allocate_from(Space.GSI, MSI_GSIS, owner)
        if gsi is None:
            raise RuntimeError(f"{self._res.name}: out of MSI GSIs for {owner}")
        return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route gsi to the MSI message (address, data); a no-op if it already is."""
        with self._lock:
            if self._msi.get(gsi) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self._push()

    def routes(self) -> dict[int, tuple[int, int]]:
        """The MSI routes installed, by GSI."""
        with self._lock:
            return dict(self._msi)

    def _push(self) -> None:
        table = default_routes()
        for gsi, (address, data) in sorted(self._msi.items()):
            table.append((gsi, b.KVM_IRQ_ROUTING_MSI, address & 0xFFFFFFFF, address >> 32,
                          data & 0xFFFFFFFF))
        self._vm.set_gsi_routing(table)
