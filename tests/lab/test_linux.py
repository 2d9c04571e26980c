"""Debian's Linux to user space under corevisor, every path, on a hardware-assisted KVM.

Each test asserts on what the L2 guest prints and on corevisor's exit status. A boot
costs ~20-60 s in the lab, so the tests that can share one boot do (module-scoped
fixtures, one per boot below) and each path still has its own test:

| boot | image | vCPUs | the guest (tests/lab/guest/) does | and ends by |
| --- | --- | --- | --- | --- |
| bz1 | bzImage | 1 | runs a command | poweroff |
| bz2 | bzImage | 2 | - | reboot |
| pvh1 | vmlinux (PVH) | 1 | - | a kernel panic |
| pvh2 | vmlinux (PVH) | 2 | rng, hvc0, net (ping over a TAP), ext4 root on blk | poweroff |

plus an interactive shell on the serial console (its own boot, input through
corevisor's unix socket).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corevisor.loader.initramfs import build_initramfs
from lab.kernel import Kernel
from tests.kvm.conftest import tap_in_netns
from tests.lab import linux

pytestmark = pytest.mark.lab

Boot = subprocess.CompletedProcess[str]
NS = f"cvlab{os.getpid()}"
TAP = "cvlabtap0"
L1_IP = "192.0.2.1"  # TEST-NET-1: collides with nothing real; guest/devices.sh is .2


@pytest.fixture(scope="module")
def initrd(kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("l2") / "initrd.cpio"
    path.write_bytes(linux.initramfs(kernel))
    return path


@pytest.fixture(scope="module")
def bz1(bzimage: Path, initrd: Path) -> Boot:
    return linux.boot(bzimage, initrd, 1, "command")


@pytest.fixture(scope="module")
def bz2(bzimage: Path, initrd: Path) -> Boot:
    return linux.boot(bzimage, initrd, 2, "reboot")


@pytest.fixture(scope="module")
def pvh1(vmlinux: Path, initrd: Path) -> Boot:
    return linux.boot(vmlinux, initrd, 1, "panic")


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A network namespace holding a TAP with L1_IP/24: the L1 side of the guest's eth0."""
    with tap_in_netns(NS, TAP, f"{L1_IP}/24") as ns:
        yield ns


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ext4")
    return linux.ext4_root(work / "root.ext4", work)


@pytest.fixture(scope="module")
def pvh2(vmlinux: Path, initrd: Path, disk: Path, netns: str,
         tmp_path_factory: pytest.TempPathFactory) -> Boot:
    """The devices boot: a system file, since virtio_console has no run option."""
    system = tmp_path_factory.mktemp("devices") / "linux.toml"
    system.write_text(
        "[partitions.linux]\n"
        f'image = "{vmlinux}"\n'
        f'initrd = "{initrd}"\n'
        "cpus = 2\n"
        'memory = "256M"\n'
        f'cmdline = "{linux.CMDLINE} l2.do=devices"\n'
        f'blk = [{{path = "{disk}"}}]\n'
        f'net = [{{tap = "{TAP}"}}]\n'
        "rng = true\n"
        "virtio_console = true\n"
    )
    return linux.corevisor("run", str(system), prefix=("ip", "netns", "exec", netns))


# guest/devices.sh writes this to hvc0 only. It reaches corevisor's stdout in one piece
# (one virtio buffer), possibly in the middle of a line the UART is still sending.
HVC0_LINE = "l2: hvc0 says hello\n"


def _serial(boot: Boot) -> str:
    """What the UART sent: stdout without the hvc0 line wherever it landed."""
    return boot.stdout.replace(HVC0_LINE, "", 1)


def _fail(boot: Boot) -> str:
    return f"status {boot.returncode}\n--- stdout\n{boot.stdout}\n--- stderr\n{boot.stderr}"


# --- the images and their CPUs -------------------------------------------------------

def test_bzimage_boots_to_user_space_on_one_cpu(bz1: Boot) -> None:
    assert "l2: online=0 nproc=1" in bz1.stdout, _fail(bz1)


def test_bzimage_boots_with_two_cpus_online(bz2: Boot) -> None:
    assert "l2: online=0-1 nproc=2" in bz2.stdout, _fail(bz2)


def test_vmlinux_pvh_boots_to_user_space_on_one_cpu(pvh1: Boot) -> None:
    assert "l2: online=0 nproc=1" in pvh1.stdout, _fail(pvh1)


def test_vmlinux_pvh_boots_with_two_cpus_online(pvh2: Boot) -> None:
    assert "l2: online=0-1 nproc=2" in _serial(pvh2), _fail(pvh2)


def test_the_kernel_saw_nothing_to_warn_about(bz1: Boot, pvh2: Boot) -> None:
    """No WARN, no bad page, no taint: what the machine offers is what Linux expects."""
    for boot in (bz1, pvh2):
        assert re.search(r"l2: online=\S+ nproc=\d tainted=0\b", _serial(boot)), _fail(boot)


# --- user space, and how a run ends ----------------------------------------------------

def test_busybox_initramfs_runs_a_command(bz1: Boot) -> None:
    assert f"l2: Linux {os.uname().machine} answer=42" in bz1.stdout, _fail(bz1)


def test_poweroff_ends_the_run_with_status_0(bz1: Boot) -> None:
    assert bz1.returncode == 0, _fail(bz1)
    assert "guest powered off (ACPI S5)" in bz1.stderr


def test_reboot_ends_the_run_with_status_0(bz2: Boot) -> None:
    """README "Exit status": a guest that pulses the i8042 reset line ends with 0."""
    assert bz2.returncode == 0, _fail(bz2)
    assert "guest reset the machine (i8042 reset line)" in bz2.stderr


def test_kernel_panic_is_reported_as_a_crash(pvh1: Boot) -> None:
    assert "Kernel panic - not syncing: sysrq triggered crash" in pvh1.stdout, _fail(pvh1)
    assert pvh1.returncode == 1, _fail(pvh1)
    assert "guest stopped: guest kernel panicked (pvpanic)" in pvh1.stderr
    assert "reset the machine" not in pvh1.stderr  # not mistaken for a reboot


# --- virtio devices (one boot: pvh2) ----------------------------------------------------

def test_virtio_blk_ext4_root_file_written_by_the_guest(pvh2: Boot, disk: Path) -> None:
    assert "l2: root /dev/vda ext4" in _serial(pvh2), _fail(pvh2)
    assert pvh2.returncode == 0, _fail(pvh2)  # poweroff from the ext4 root
    assert "guest powered off (ACPI S5)" in pvh2.stderr
    assert linux.read_back(disk, "/result.txt") == "written by the L2 guest on its ext4 root\n"


def test_virtio_net_guest_pings_the_l1_side_of_its_tap(pvh2: Boot) -> None:
    found = re.search(r"l2: eth0 driver=(\S+) \d+ packets transmitted, (\d+) packets received",
                      _serial(pvh2))
    assert found, _fail(pvh2)
    assert found.group(1) == "virtio_net"
    assert int(found.group(2)) >= 1


def test_virtio_rng_hwrng_delivers_bytes(pvh2: Boot) -> None:
    found = re.search(r"l2: hwrng=(\S+) bytes=([0-9a-f]*)", _serial(pvh2))
    assert found, _fail(pvh2)
    assert found.group(1).startswith("virtio_rng")
    data = bytes.fromhex(found.group(2))
    assert len(data) == 32 and len(set(data)) > 8  # 32 bytes, and not a constant


def test_virtio_console_hvc0_reaches_the_partitions_output(pvh2: Boot) -> None:
    """guest/devices.sh writes this line to /dev/hvc0 only: it came through virtio-console."""
    assert HVC0_LINE in pvh2.stdout, _fail(pvh2)


# --- an interactive shell ------------------------------------------------------------------

def test_busybox_initramfs_shell_over_the_serial_console(vmlinux: Path, tmp_path: Path) -> None:
    """A shell on the serial console answers commands typed into corevisor's socket."""
    busybox = shutil.which("busybox")
    assert busybox is not None, "install busybox-static"
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "init").write_text(
        "#!/bin/busybox sh\n"
        "/bin/busybox --install -s /bin\n"
        "mkdir -p /proc /sys && mount -t proc proc /proc && mount -t sysfs sysfs /sys\n"
        "echo corevisor-init-ready\n"
        "exec setsid cttyhack sh\n"
    )
    (root / "init").chmod(0o755)
    sock = tmp_path / "console.sock"
    rd = tmp_path / "initrd.cpio"
    rd.write_bytes(build_initramfs(root))
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevisor.cli", "run", "--kernel", str(vmlinux),
         "--initrd", str(rd), "--cmdline", linux.CMDLINE, "--serial", f"unix:{sock}",
         "--timeout", "240"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        seen = _converse(sock, proc)
    finally:
        out, err = proc.communicate(timeout=60)
    assert "corevisor-init-ready" in seen, err
    assert "answer=42" in seen
    assert os.uname().machine in seen  # uname -m, from the guest's busybox
    assert "acpi_pm" in seen  # the PM timer (devices/pm_timer.py) is a clocksource there
    assert proc.returncode == 0, err  # reboot -f: the i8042 reset, reported as a clean stop


CLOCKSOURCES = b"/sys/devices/system/clocksource/clocksource0/available_clocksource"


def _converse(sock: Path, proc: subprocess.Popen[str]) -> str:
    """Wait for the guest's shell on the serial socket, run commands, return what came."""
    deadline = time.monotonic() + 200
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "corevisor did not start"
        time.sleep(0.1)
    seen = b""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.settimeout(1)
        sent = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                chunk = b""
            seen += chunk
            if not sent and b"corevisor-init-ready" in seen:
                s.sendall(b"uname -m; echo answer=$((6*7)); cat " + CLOCKSOURCES + b"; reboot -f\n")
                sent = True
            if b"answer=42" in seen and proc.poll() is not None:
                break
    return seen.decode(errors="replace")
