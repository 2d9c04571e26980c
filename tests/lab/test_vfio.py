"""VFIO passthrough in the lab: QEMU's edu device (1234:11e8) under the L1's intel-iommu.

`lab/run --iommu` (and so `make lab-test`) gives the L1 guest an IOMMU and the edu
device at lab.EDU_BDF, bound to vfio-pci by the lab's init. The bundled guest `edu`
(guests/edu.c) drives it through corevisor --vfio: DMA into its own RAM must arrive,
INTx and MSI must be delivered, and a DMA to an address outside its RAM must be stopped
by the IOMMU: a DMAR fault for the device in the L1 kernel's log, the guest's RAM
unchanged, the guest (and the VMM) running on to exit 0.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lab.vm import EDU_BDF
from tests.kvm.conftest import corevisor

pytestmark = pytest.mark.lab

EDU = Path(__file__).parents[2] / "guests" / "build" / "edu.elf"
OUTSIDE = 0xC000000  # 192 MiB: above the guest's 32 MiB, below edu's 28-bit DMA mask
SYSFS = Path("/sys/bus/pci/devices")


def _dmesg() -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.splitlines()


def _need_iommu_lab() -> None:
    """Fail (never skip) with how to get the lab these tests need."""
    driver = SYSFS / EDU_BDF / "driver"
    if not driver.is_symlink() or Path(driver.readlink()).name != "vfio-pci":
        pytest.fail(f"no edu device bound to vfio-pci at {EDU_BDF}: run the lab with --iommu "
                    "(make lab-test does)")


@pytest.fixture(scope="module")
def edu_run() -> tuple[subprocess.CompletedProcess[str], list[str]]:
    _need_iommu_lab()
    before = len(_dmesg())
    r = corevisor("run", str(EDU), "--memory", "32M", "--vfio", EDU_BDF,
                  "--cmdline", f"outside={OUTSIDE:#x}", "--timeout", "240", timeout=300)
    return r, _dmesg()[before:]


def test_edu_dma_into_guest_ram_arrives(
        edu_run: tuple[subprocess.CompletedProcess[str], list[str]]) -> None:
    r, _ = edu_run
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert re.search(r"^edu: 00:0\d\.0 id 0x10000ed bar0 0x[0-9a-f]+ line \d+ live ok$",
                     r.stdout, re.M), r.stdout
    assert ("edu: dma into RAM at 0x" in r.stdout
            and "\"hello from guest RAM, through edu's DMA and back\"" in r.stdout), r.stdout
    assert r.stdout.rstrip().endswith("edu: ok"), r.stdout


def test_edu_interrupts_arrive_by_intx_and_msi(
        edu_run: tuple[subprocess.CompletedProcess[str], list[str]]) -> None:
    r, _ = edu_run
    assert re.search(r"^edu: intx on line \d+: status 0x1$", r.stdout, re.M), r.stdout
    assert "edu: msi vector 0x41: status 0x100\n" in r.stdout, r.stdout


def test_edu_dma_outside_guest_ram_is_blocked_by_the_iommu(
        edu_run: tuple[subprocess.CompletedProcess[str], list[str]]) -> None:
    r, log = edu_run
    assert re.search(rf"^edu: dma to {OUTSIDE:#x} \(outside RAM\): RAM 0x[0-9a-f]+-0x[0-9a-f]+ "
                     r"unchanged", r.stdout, re.M), r.stdout
    faults = [ln for ln in log if "DMAR" in ln and "fault" in ln.lower()]
    short = EDU_BDF.split(":", 1)[1]  # "00:04.0", as the DMAR lines name it
    assert any(short in ln and f"{OUTSIDE:x}" in ln for ln in faults), "\n".join(log)
    assert r.returncode == 0  # the VMM and the guest ran on after the fault


def test_a_device_bound_to_another_driver_is_one_line() -> None:
    _need_iommu_lab()
    virtio = next(d.name for d in sorted(SYSFS.iterdir()) if (d / "driver").is_symlink()
                  and Path((d / "driver").readlink()).name == "virtio-pci")
    r = corevisor("run", str(EDU), "--vfio", virtio)
    assert r.returncode == 2
    assert r.stderr == (f"corevisor: partition edu: vfio device {virtio}: the device is bound "
                        "to virtio-pci, not vfio-pci (give it to vfio-pci with "
                        f"/sys/bus/pci/devices/{virtio}/driver_override: docs/pc-platform.md, "
                        "Passthrough)\n")
