"""The builder's passthrough step: the IOMMU domain over the guest's RAM, then the devices.

One container per machine. Each device's group is checked (host.py), opened, found
viable, and added to the container; the first one lets the container choose the
type-1 v2 IOMMU, and then every RAM region of the machine is mapped with
VFIO_IOMMU_MAP_DMA at iova = its guest-physical address. That mapping *is* the
guarantee: a device's DMA is translated by the IOMMU through this table only, so an
address the guest gives the device reaches that guest's RAM at that address, and any
other address (another guest's memory, the VMM's, the host kernel's, the guest's own
MMIO holes) faults in the IOMMU instead of reaching memory (the host kernel logs a DMAR
or AMD-Vi fault, the VMM and the guest keep running).

Then each device is a VfioFunction on bus 0 (after the virtio functions, so their
slots do not depend on passthrough), its INTx wired to the slot's GSI, its MSI
vectors to GSIs of the machine's routing, its mmappable BARs given KVM slots, and,
without firmware, its BARs placed by the VMM.

What does not live here: the fds (container.py), the function (function.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from corevisor.arch.x86_64 import layout
from corevisor.errors import VfioError
from corevisor.memory import GuestMemory
from corevisor.pci.config import INTERRUPT_PIN, BarWindow
from corevisor.pci.platform import PciPlatform
from corevisor.resources import CHANNEL_SLOTS, Space
from corevisor.spec import PciAddress
from corevisor.vfio import host as vfio_host
from corevisor.vfio.container import Container, Group
from corevisor.vfio.function import VfioBar, VfioFunction

__all__ = ["attach_vfio"]


class Owner(Protocol):
    def own(self, resource: VfioFunction | Group | Container) -> object: ...


def attach_vfio(
    platform: PciPlatform,
    memory: GuestMemory,
    addresses: tuple[PciAddress, ...],
    owner: Owner,
    report: Callable[[str], None],
    *,
    where: str = "vfio",
    place: bool = True,
    sysfs: Path = vfio_host.SYSFS,
    dev: Path = vfio_host.DEV_VFIO,
) -> list[VfioFunction]:
    """Pass every device of addresses through (see the module docstring); the functions."""
    if not addresses:
        return []
    checked = [vfio_host.check_device(a, where, sysfs, dev) for a in addresses]
    who = f"{where} {checked[0].name}"
    container = Container(who, dev / "vfio")
    owner.own(container)
    groups: dict[int, Group] = {}
    for device in checked:
        who = f"{where} {device.name}"
        if device.group not in groups:
            group = Group(device.group_path(dev), who)
            owner.own(group)
            if not group.viable():
                raise VfioError(f"{who}: IOMMU group {device.group} is not viable (every "
                                "device in it must be bound to vfio-pci or to no driver)")
            group.set_container(container)
            groups[device.group] = group
    container.set_iommu()
    for region in memory.regions:
        container.map_dma(region.host_address, region.gpa, region.size)
    return [_add(platform, groups[d.group], d, owner, report, where, place) for d in checked]


def _add(platform: PciPlatform, group: Group, device: vfio_host.HostDevice, owner: Owner,
         report: Callable[[str], None], where: str, place: bool) -> VfioFunction:
    fd = group.device(device.name)
    try:
        function = VfioFunction(fd, platform.vm, f"vfio {device.name}", report)
    except BaseException:
        fd.close()
        raise
    owner.own(function)
    res = platform.res

    def slot(what: str) -> int:
        number = res.allocate_from(Space.SLOT, range(CHANNEL_SLOTS[0]), what)
        if number is None:
            raise VfioError(f"{where} {device.name}: no free memory slot for {what}")
        return number

    function.mmap_bars(slot)
    bars = {i: VfioBar(fd, region, function.msix) for i, region in function.regions.items()}
    index = platform.add(function, dict(bars))
    moved = function.on_window

    def on_window(i: int, old: BarWindow | None, new: BarWindow | None) -> None:
        moved(i, old, new)
        if new is not None and not new.io:  # only where the platform mapped it
            found = platform.mmio.find(new.base)
            new = new if found is not None and found[0] is bars[i] else None
        function.window_moved(i, old, new)

    function.on_window = on_window
    pin = function.read(INTERRUPT_PIN, 1)
    if 1 <= pin <= 4:
        function.wire_intx(layout.pci_intx_gsi(index, pin))
    function.msi_gsis = [platform.routing.allocate(f"{function.name} MSI vector {v}")
                         for v in range(len(function.msi_fds))]
    for fd_, gsi in zip(function.msi_fds, function.msi_gsis, strict=True):
        platform.vm.irqfd(fd_, gsi)
    function.set_msi_route = platform.routing.set_msi
    if function.msix is not None:
        msix = function.msix
        msix.gsis = [platform.routing.allocate(f"{function.name} MSI-X vector {v}")
                     for v in range(len(msix.fds))]
        for fd_, gsi in zip(msix.fds, msix.gsis, strict=True):
            platform.vm.irqfd(fd_, gsi)
        msix.set_route = platform.routing.set_msi
    if place:
        platform.place(function)
    return function
