"""The passthrough refusals that sysfs decides, read against a sysfs tree built here.

The real checks run on the real /sys in tests/kvm/test_vfio_errors.py (this project's
hosts have PCI devices but no IOMMU) and in the lab (tests/lab/test_vfio.py: a device
bound to virtio-pci); a group of several devices, one of them held by a host driver,
exists on neither, so the viability rule is checked on a tree like the kernel's:
/sys/bus/pci/devices/ADDR/{driver,iommu_group} symlinks and
/sys/kernel/iommu_groups/N/devices/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corevisor.config.args import vfio_from_args
from corevisor.config.parse import parse_pci_address
from corevisor.errors import ConfigError, VfioError
from corevisor.spec import PciAddress
from corevisor.vfio.host import check_device

EDU = PciAddress(0, 0, 4, 0)


def _tree(tmp: Path, devices: dict[str, tuple[int | None, str | None]],
          vfio: bool = True) -> tuple[Path, Path]:
    """A sysfs (address -> (group, driver)) and a /dev/vfio under tmp."""
    sysfs, dev = tmp / "sys", tmp / "dev"
    dev.mkdir(parents=True)
    if vfio:
        (dev / "vfio").touch()
    for name, (group, driver) in devices.items():
        node = sysfs / "devices" / "pci0000:00" / name
        node.mkdir(parents=True)
        (sysfs / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        (sysfs / "bus" / "pci" / "devices" / name).symlink_to(node)
        if driver is not None:
            (sysfs / "bus" / "pci" / "drivers" / driver).mkdir(parents=True, exist_ok=True)
            (node / "driver").symlink_to(sysfs / "bus" / "pci" / "drivers" / driver)
        if group is not None:
            members = sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
            members.mkdir(parents=True, exist_ok=True)
            (node / "iommu_group").symlink_to(members.parent)
            (members / name).symlink_to(node)
    return sysfs, dev


def test_a_device_bound_to_vfio_pci_alone_in_its_group_passes(tmp_path: Path) -> None:
    sysfs, dev = _tree(tmp_path, {"0000:00:04.0": (4, "vfio-pci")})
    device = check_device(EDU, "--vfio", sysfs, dev)
    assert (device.group, device.group_path(dev)) == (4, dev / "4")


def test_a_group_shared_with_a_device_the_host_drives_is_not_viable(tmp_path: Path) -> None:
    sysfs, dev = _tree(tmp_path, {"0000:00:04.0": (5, "vfio-pci"), "0000:00:04.1": (5, None),
                                  "0000:00:04.2": (5, "e1000e")})
    with pytest.raises(VfioError) as e:
        check_device(EDU, "--vfio", sysfs, dev)
    assert str(e.value).startswith("--vfio 0000:00:04.0: IOMMU group 5 is not viable: it also "
                                   "holds 0000:00:04.2, bound to e1000e")


def test_a_device_bound_to_another_driver_is_named(tmp_path: Path) -> None:
    sysfs, dev = _tree(tmp_path, {"0000:00:04.0": (4, "virtio-pci")})
    with pytest.raises(VfioError, match=r"^--vfio 0000:00:04.0: the device is bound to "
                                        r"virtio-pci, not vfio-pci \(give it to vfio-pci"):
        check_device(EDU, "--vfio", sysfs, dev)
    sysfs, dev = _tree(tmp_path / "b", {"0000:00:04.0": (4, None)})
    with pytest.raises(VfioError, match="bound to no driver, not vfio-pci"):
        check_device(EDU, "--vfio", sysfs, dev)


def test_no_iommu_group_means_no_iommu(tmp_path: Path) -> None:
    sysfs, dev = _tree(tmp_path, {"0000:00:04.0": (None, "vfio-pci")})
    with pytest.raises(VfioError, match="the device has no IOMMU group, so this host has no "
                                        "IOMMU"):
        check_device(EDU, "--vfio", sysfs, dev)


def test_no_vfio_container_node(tmp_path: Path) -> None:
    sysfs, dev = _tree(tmp_path, {"0000:00:04.0": (4, "vfio-pci")}, vfio=False)
    with pytest.raises(VfioError, match=r"vfio on this host \(modprobe vfio-pci\)$"):
        check_device(EDU, "--vfio", sysfs, dev)


def test_no_such_device(tmp_path: Path) -> None:
    sysfs, dev = _tree(tmp_path, {"0000:00:04.0": (4, "vfio-pci")})
    with pytest.raises(VfioError, match="^--vfio 0000:00:05.0: no such PCI device on this host"):
        check_device(PciAddress(0, 0, 5, 0), "--vfio", sysfs, dev)


@pytest.mark.parametrize("text", ["00:04.0", "0000:00:04", "0000:00:20.0", "0000:00:04.8",
                                  "0000:0g:04.0", " 0000:00:04.0"])
def test_a_bad_pci_address_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a PCI address: give DOMAIN:BUS:DEVICE"):
        parse_pci_address(text, "--vfio")


def test_pci_addresses_read_and_print_as_sysfs_names_them() -> None:
    assert parse_pci_address("0001:0A:1f.7", "k") == PciAddress(1, 10, 31, 7)
    assert str(PciAddress(1, 10, 31, 7)) == "0001:0a:1f.7"
    with pytest.raises(ConfigError, match="--vfio: 0000:00:04.0 is given twice"):
        vfio_from_args(["0000:00:04.0", "0000:00:04.0"])
