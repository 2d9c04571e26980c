"""`--vfio` on this host, which has PCI devices but no IOMMU: each refusal is one line.

What the guest would get is tested in the lab (tests/lab/test_vfio.py, with QEMU's
intel-iommu); here the real CLI must refuse before the guest runs, exit 2, and say
which device and why, on the real /sys.
"""

from __future__ import annotations

from pathlib import Path

from tests.kvm.conftest import corevisor

DEVICES = Path("/sys/bus/pci/devices")


def test_a_device_without_an_iommu_group_is_refused() -> None:
    device = next(d.name for d in sorted(DEVICES.iterdir())
                  if not (d / "iommu_group").exists())
    r = corevisor("run", "hello", "--vfio", device)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"corevisor: partition hello: vfio device {device}: the device has no "
                        "IOMMU group, so this host has no IOMMU (or it is off: boot with "
                        "intel_iommu=on or amd_iommu=on); without one its DMA could reach any "
                        "host memory, so it is not passed through\n")


def test_a_device_that_does_not_exist_is_refused() -> None:
    absent = next(f"0000:00:1f.{f}" for f in range(8)
                  if not (DEVICES / f"0000:00:1f.{f}").exists())
    r = corevisor("run", "hello", "--vfio", absent)
    assert (r.returncode, r.stderr) == (
        2, f"corevisor: partition hello: vfio device {absent}: no such PCI device on this host "
           "(lspci -D lists them)\n")


def test_a_bad_address_is_refused_by_the_option(tmp_path: Path) -> None:
    r = corevisor("run", "hello", "--vfio", "00:04.0")
    assert (r.returncode, r.stderr) == (
        2, 'corevisor: --vfio: "00:04.0" is not a PCI address: give DOMAIN:BUS:DEVICE.FUNCTION '
           "in hex, like 0000:00:04.0 (lspci -D)\n")
    system = tmp_path / "s.toml"
    system.write_text('[partitions.a]\nimage = "x.elf"\nvfio = ["0000:00:04.0", "bad"]\n')
    (tmp_path / "x.elf").write_bytes(Path(__file__).parents[2].joinpath(
        "guests/build/hello.elf").read_bytes())
    r = corevisor("run", str(system))
    assert r.returncode == 2
    assert r.stderr.startswith(f'corevisor: {system}: partitions.a.vfio[1]: "bad" is not a PCI '
                               "address"), r.stderr
