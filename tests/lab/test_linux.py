"""Debian's Linux to user space under corevisor, every path, on a hardware-assisted KVM.

Each test asserts on what the L2 guest prints and on corevisor's exit status. A boot
in the lab costs ~20-60 s, so tests that can share one boot do (module-scoped
fixtures), and each path still has its own test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corevisor.loader.initramfs import build_initramfs

pytestmark = pytest.mark.lab

# Output costs ~1.4 ms a byte on the serial console in the lab: keep the kernel quiet.
QUIET = "console=ttyS0 quiet reboot=k panic=-1 pci=off"


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
        "mkdir -p /proc && mount -t proc proc /proc\n"
        "echo corevisor-init-ready\n"
        "exec setsid cttyhack sh\n"
    )
    (root / "init").chmod(0o755)
    sock = tmp_path / "console.sock"
    rd = tmp_path / "initrd.cpio"
    rd.write_bytes(build_initramfs(root))
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevisor.cli", "run", "--kernel", str(vmlinux),
         "--initrd", str(rd), "--cmdline", QUIET, "--serial", f"unix:{sock}",
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
    assert proc.returncode == 0, err  # reboot -f: the i8042 reset, reported as a clean stop


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
                s.sendall(b"uname -m; echo answer=$((6*7)); reboot -f\n")
                sent = True
            if b"answer=42" in seen and proc.poll() is not None:
                break
    return seen.decode(errors="replace")
