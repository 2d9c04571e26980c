"""The lab tests' L2 Linux guests: their initramfs, their ext4 root, and running them.

The guest side is three busybox scripts in guest/: ``init`` (loads the modules, says how
many CPUs are online, then does what ``l2.do=`` on the command line asks: run a
command, reboot, panic, or exercise the devices), ``devices.sh`` (rng, hvc0, net, then
the ext4 root) and ``rootfs-init`` (the ext4 root's /sbin/init: writes a file, powers
off); test_pci.py's virtio-pci boot has its own, ``pci-init``. Debian builds every
driver they need as a module; those and their dependencies (modules.dep,
lab/kernel.py) go into the initramfs.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

from lab.initramfs import busybox_initramfs, busybox_path
from lab.kernel import Kernel
from tests.kvm.conftest import corevisor as run_cli

GUEST = Path(__file__).with_name("guest")
# crc32c_generic: ext4's soft dependency (metadata_csum, mkfs.ext4's default, needs it).
# pvpanic_mmio: so a panic is reported to corevisor instead of looking like a reboot.
L2_MODULES = (
    "virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "virtio_console",
    "ext4", "crc32c_generic", "pvpanic_mmio",
)
# Every byte on the serial console costs ~1.4 ms in the lab: the kernel stays quiet.
# reboot=k, panic=-1, pci=off: corevisor's own defaults for --kernel (docs/linux.md).
# noxsave: the lab's software SVM does not intercept XSETBV, so KVM keeps an L2's XCR0
# at x87 only; Linux notices, warns (taint W) and falls back to FXSAVE (docs/lab.md,
# "Limits"). With noxsave it starts that way, and a warning means something else.
CMDLINE = "console=ttyS0 quiet reboot=k panic=-1 pci=off noxsave"
TIMEOUT = 240  # corevisor's --timeout for one boot; a boot takes ~15-60 s in the lab


def initramfs(kernel: Kernel) -> bytes:
    """The L2 initramfs: guest/init, guest/devices.sh, busybox and L2_MODULES."""
    return busybox_initramfs(
        (GUEST / "init").read_bytes(),
        kernel.load_order(L2_MODULES),
        {"devices.sh": (GUEST / "devices.sh").read_bytes()},
    )


def ext4_root(image: Path, work: Path) -> Path:
    """A 32 MiB ext4 image (mkfs.ext4 -d) holding busybox and guest/rootfs-init."""
    root = work / "rootfs"
    for d in ("bin", "sbin", "proc", "dev", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox_path(), root / "bin" / "busybox")
    shutil.copy(GUEST / "rootfs-init", root / "sbin" / "init")
    (root / "sbin" / "init").chmod(0o755)
    subprocess.run(
        # no lazy init: the guest must not be zeroing inode tables while it powers off
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
         "-d", str(root), str(image), "32M"],
        check=True, capture_output=True, timeout=120,
    )
    return image


def read_back(image: Path, path: str) -> str:
    """A file's contents from an ext4 image, without mounting it (debugfs)."""
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)],
                       capture_output=True, text=True, timeout=60, check=True)
    return r.stdout


def corevisor(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The real CLI with a lab-sized --timeout (tests/kvm/conftest.py runs it).

    A boot that timed out without printing a byte is run once more, with a warning in
    pytest's summary: that is the lab's known flake (docs/lab.md, "A lab flake"), where
    a 2-vCPU L2 kernel deadlocks early in its boot about once in 30 boots under the
    emulated SVM with nested paging. A boot that prints anything, or hangs twice, is
    judged as it is.
    """
    result = run_cli(*args, "--timeout", str(TIMEOUT), timeout=TIMEOUT + 60, prefix=prefix)
    if result.returncode != 0 and not result.stdout and "timed out" in result.stderr:
        warnings.warn(
            f"lab flake: the L2 guest printed nothing in {TIMEOUT} s and was stopped; "
            "booting it again (docs/lab.md, 'A lab flake')",
            stacklevel=2,
        )
        result = run_cli(*args, "--timeout", str(TIMEOUT), timeout=TIMEOUT + 60, prefix=prefix)
    return result


def boot(image: Path, initrd: Path, cpus: int, do: str) -> subprocess.CompletedProcess[str]:
    """One L2 boot of image with the L2 initramfs, doing `do` (guest/init)."""
    return corevisor("run", "--kernel", str(image), "--initrd", str(initrd),
                     "--cpus", str(cpus), "--cmdline", f"{CMDLINE} l2.do={do}")
