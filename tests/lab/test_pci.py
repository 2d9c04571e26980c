"""Unmodified Linux over PCI, and a BIOS boot through a real boot loader, in the lab.

On the project's hosts (PVM) Debian's kernel stops at an instruction PVM's emulator
lacks long before it enumerates PCI, and SYSLINUX stops even before the kernel: an
emulation failure at an ``iret`` (cf) in its protected-mode core, right after its banner;
these tests need a hardware-assisted /dev/kvm, which the lab's L1 guest has
(make lab-test).
Two boots, each asserted on by what the guest prints and corevisor's exit status:

* pci: Debian's vmlinux with ``--transport pci`` and blk + net + rng, only PCI drivers
  in its initramfs (guest/pci-init): it lists the PCI bus and the virtio interrupts,
  reads and writes its disk, pings the other end of its TAP, and powers off.
* bios: SeaBIOS -> SYSLINUX (a disk made by scripts/make-bios-disk) -> Debian's
  bzImage with the lab's L2 initramfs (guest/init): a shell command, then a power-off
  through ACPI S5, from the tables SeaBIOS installed from fw_cfg.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lab.initramfs import busybox_initramfs
from lab.kernel import Kernel
from tests.kvm.conftest import tap_in_netns
from tests.kvm.test_bios import lines
from tests.lab import linux

pytestmark = pytest.mark.lab

ROOT = Path(__file__).parents[2]
GUEST = Path(__file__).with_name("guest")
GREETING = b"corevisor lab disk: sector zero"
WRITTEN = b"written by the L2 guest over virtio-pci\n"
PCI_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng")
NS, TAP, L1_IP = "cvlabpci", "cvlabpcitap", "192.0.2.1"


def _cmdline() -> str:
    return linux.CMDLINE.replace(" pci=off", "")  # this machine has a PCI bus


def _fail(r: subprocess.CompletedProcess[str]) -> str:
    return f"status {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


@pytest.fixture(scope="module")
def pci_boot(kernel: Kernel, vmlinux: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The one virtio-pci boot the first four tests share (a lab boot costs ~30-70 s),
    with its disk, which the guest wrote to."""
    work = tmp_path_factory.mktemp("pci")
    initrd = work / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs((GUEST / "pci-init").read_bytes(),
                                         kernel.load_order(PCI_MODULES)))
    disk = work / "disk.img"
    disk.write_bytes(GREETING.ljust(8 << 20, b"\0"))
    with tap_in_netns(NS, TAP, f"{L1_IP}/24"):
        r = linux.corevisor(
            "run", "--kernel", str(vmlinux), "--initrd", str(initrd), "--memory", "256M",
            "--transport", "pci", "--disk", str(disk), "--net", TAP, "--rng",
            "--cmdline", _cmdline(), prefix=("ip", "netns", "exec", NS))
    return r, disk


def test_linux_enumerates_the_pci_bus_and_binds_virtio_pci(
    pci_boot: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    r, _ = pci_boot
    rows = re.findall(r"l2: pci (\S+) (0x\w+:0x\w+) driver=(\S*)", r.stdout)
    found = {dev: (ids, drv) for dev, ids, drv in rows}
    assert found.get("0000:00:00.0", ("",))[0] == "0x8086:0x1237", _fail(r)  # the host bridge
    kinds = {ids: drv for ids, drv in found.values()}
    assert kinds.get("0x1af4:0x1042") == "virtio-pci", _fail(r)  # blk
    assert kinds.get("0x1af4:0x1041") == "virtio-pci", _fail(r)  # net
    assert kinds.get("0x1af4:0x1044") == "virtio-pci", _fail(r)  # rng


def test_linux_uses_msix_for_the_virtio_queues(
    pci_boot: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    r, _ = pci_boot
    irqs = re.findall(r"l2: irq (\S+) (\S+) (\S+)", r.stdout)
    assert irqs, _fail(r)
    assert all(chip.startswith("PCI-MSI") for chip, _, _ in irqs), irqs
    names = {name for _, _, name in irqs}
    assert any(n.endswith("-config") for n in names) and any("req" in n or "input" in n
                                                             for n in names), names


def test_linux_reads_and_writes_its_virtio_pci_disk(
    pci_boot: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    r, disk = pci_boot
    assert f"l2: disk says {GREETING.decode()}" in r.stdout, _fail(r)
    data = disk.read_bytes()
    assert data[8 * 512 : 8 * 512 + len(WRITTEN)] == WRITTEN, _fail(r)


def test_linux_pings_over_its_virtio_pci_nic_and_powers_off(
    pci_boot: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    r, _ = pci_boot
    found = re.search(r"l2: eth0 driver=(\S+) \d+ packets transmitted, (\d+) packets received",
                      r.stdout)
    assert found and found.group(1) == "virtio_net" and int(found.group(2)) >= 1, _fail(r)
    assert r.returncode == 0 and "guest powered off (ACPI S5)" in r.stderr, _fail(r)


def test_bios_boots_syslinux_which_boots_linux_to_a_shell_command(
    kernel: Kernel, bzimage: Path, tmp_path: Path
) -> None:
    """BIOS -> boot loader -> Linux -> user space, from one disk image."""

    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(linux.initramfs(kernel))
    disk = tmp_path / "disk.img"
    subprocess.run(
        [str(ROOT / "scripts" / "make-bios-disk"), str(disk), "--kernel", str(bzimage),
         "--initrd", str(initrd), "--append", f"{_cmdline()} l2.do=command"],
        check=True, capture_output=True, timeout=300,
    )
    r = linux.corevisor("run", "--bios", "--disk", str(disk), "--memory", "256M")
    out = lines(r.stdout)
    assert any(x.startswith("SeaBIOS (version ") for x in out), _fail(r)
    assert any(x.startswith("SYSLINUX ") for x in out) and "SYSLINUX: booting" in out, _fail(r)
    assert "l2: online=0 nproc=1 tainted=0" in out, _fail(r)
    assert any(re.fullmatch(r"l2: Linux \S+ answer=42", x) for x in out), _fail(r)
    assert r.returncode == 0 and "guest powered off (ACPI S5)" in r.stderr, _fail(r)
