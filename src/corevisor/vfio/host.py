"""The host-side facts about a device to pass through, and the one-line refusals.

Before any fd is opened, sysfs says everything that can be wrong with a passthrough,
and says it better than an errno: whether the device exists
(/sys/bus/pci/devices/ADDR), whether it has an IOMMU group (none: the host has no IOMMU,
or it is off: intel_iommu=on / amd_iommu=on), whether VFIO is there (/dev/vfio/vfio:
the vfio-pci module), which driver holds it (it must be vfio-pci), and whether its
group is viable (every device in /sys/kernel/iommu_groups/N/devices bound to vfio-pci
or to no driver: the IOMMU isolates groups, not devices, so a group shared with a
device the host still drives cannot be given away). Each problem is a VfioError naming
the device and what to do.

The roots are parameters so the checks can be read against a sysfs tree built in a
test (the viability rule needs a group of several devices, which this project's hosts
do not have). What does not live here: opening the fds (container.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from corevisor.errors import VfioError
from corevisor.spec import PciAddress

__all__ = ["HostDevice", "check_device", "SYSFS", "DEV_VFIO", "VFIO_DRIVER"]

SYSFS = Path("/sys")
DEV_VFIO = Path("/dev/vfio")
VFIO_DRIVER = "vfio-pci"


@dataclass(frozen=True)
class HostDevice:
    """A device that passed every check: its address and its group's device node."""

    address: PciAddress
    group: int

    @property
    def name(self) -> str:
        return str(self.address)

    def group_path(self, dev: Path = DEV_VFIO) -> Path:
        return dev / str(self.group)


def _driver(device: Path) -> str | None:
    link = device / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def check_device(address: PciAddress, where: str, sysfs: Path = SYSFS,
                 dev: Path = DEV_VFIO) -> HostDevice:
    """The device at address, if it can be passed through here; else VfioError.

    where names the option or key that asked for it ("--vfio", "partitions.a.vfio[0]")."""
    device = sysfs / "bus" / "pci" / "devices" / str(address)
    said = f"{where} {address}"
    if not device.exists():
        raise VfioError(f"{said}: no such PCI device on this host (lspci -D lists them)")
    group_link = device / "iommu_group"
    if not group_link.is_symlink():
        raise VfioError(f"{said}: the device has no IOMMU group, so this host has no IOMMU "
                        "(or it is off: boot with intel_iommu=on or amd_iommu=on); without "
                        "one its DMA could reach any host memory, so it is not passed through")
    group = int(os.path.basename(os.readlink(group_link)))
    if not (dev / "vfio").exists():
        raise VfioError(f"{said}: no {dev / 'vfio'} on this host (modprobe vfio-pci)")
    driver = _driver(device)
    if driver != VFIO_DRIVER:
        held = f"bound to {driver}" if driver else "bound to no driver"
        raise VfioError(f"{said}: the device is {held}, not {VFIO_DRIVER} (give it to "
                        f"{VFIO_DRIVER} with {device}/driver_override: docs/pc-platform.md, "
                        "Passthrough)")
    members = sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
    for member in sorted(members.iterdir()) if members.is_dir() else ():
        other = _driver(member)
        if other not in (None, VFIO_DRIVER):
            raise VfioError(
                f"{said}: IOMMU group {group} is not viable: it also holds {member.name}, "
                f"bound to {other} (the IOMMU isolates whole groups: bind every device of "
                f"{members} to {VFIO_DRIVER}, or unbind it)"
            )
    return HostDevice(address, group)
