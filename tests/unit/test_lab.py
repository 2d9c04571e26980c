"""The lab tool (lab/) without booting it: the kernel it picks, the modules it loads and
in what order, the initramfs it caches, the command script it writes, its one-line errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lab
from lab.initramfs import L1_MODULES, l1_initramfs
from lab.kernel import ModuleNotFound, find_kernel
from lab.vm import _command_script

LAB_RUN = Path(lab.__file__).with_name("run")


def test_the_kernel_is_found_by_its_module_tree_not_by_uname() -> None:
    kernel = find_kernel()
    assert (kernel.modules / "modules.dep").is_file()
    assert kernel.image == Path(f"/boot/vmlinuz-{kernel.version}") and kernel.image.is_file()
    assert kernel.load_order(["kvm_amd"])  # the tree has what the lab needs
    if not Path(f"/lib/modules/{os.uname().release}").exists():  # e.g. this host's 6.18
        assert kernel.version != os.uname().release


def test_load_order_puts_every_dependency_first_once() -> None:
    names = [p.name for p in find_kernel().load_order(["kvm_amd", "kvm", "9p"])]
    assert len(names) == len(set(names))
    assert names.index("irqbypass.ko") < names.index("kvm.ko") < names.index("kvm-amd.ko")
    assert names.index("9pnet.ko") < names.index("9p.ko")


def test_an_unknown_module_is_named() -> None:
    with pytest.raises(ModuleNotFound, match="no_such_module"):
        find_kernel().load_order(["no_such_module"])


def test_the_initramfs_is_cached_and_holds_init_busybox_and_the_modules(tmp_path: Path) -> None:
    kernel = find_kernel()
    first = l1_initramfs(kernel, tmp_path)
    again = l1_initramfs(kernel, tmp_path)
    assert again == first and again.stat().st_mtime_ns == first.stat().st_mtime_ns
    listing = subprocess.run(["cpio", "-it"], input=first.read_bytes(), capture_output=True,
                             check=True, timeout=60).stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console", "modules/order"} <= set(listing)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "modules/order"], input=first.read_bytes(), cwd=out,
                   capture_output=True, check=True, timeout=60)
    order = (out / "modules" / "order").read_text().split()
    assert order == [p.name for p in kernel.load_order(L1_MODULES)]
    assert all(f"modules/{name}" in listing for name in order)


def test_the_command_script_keeps_argv_environment_and_directory(tmp_path: Path) -> None:
    """Run the script the guest would run, with this host's sh: same words come out."""
    argv = ["sh", "-c", 'printf "%s|" "$@"; printf "%s|%s|" "$WEIRD" "$(pwd)"', "-",
            "a b", "it's", "$HOME", ""]
    env = {"WEIRD": "x 'y' \"z\" $q", "DISPLAY": ":0", "PATH": os.environ["PATH"]}
    script = tmp_path / "command"
    script.write_text(_command_script(argv, tmp_path, env))
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True,
                       env={}, timeout=30)
    assert r.stdout == f"a b|it's|$HOME||x 'y' \"z\" $q|{tmp_path}|"
    assert "DISPLAY" not in script.read_text()  # the caller's session, not the command's


def _lab_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LAB_RUN), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=LAB_RUN.parent.parent)


def test_without_qemu_one_line_and_status_120() -> None:
    r = _lab_run("--", "true", env={**os.environ, "PATH": "/nonexistent"})
    assert (r.returncode, r.stdout) == (lab.Exit.NO_QEMU, "")
    assert r.stderr == (
        "lab: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)\n"
    )


def test_without_a_command_one_line_and_status_119() -> None:
    r = _lab_run()
    assert r.returncode == lab.Exit.SETUP
    assert r.stderr.startswith("lab: no command") and r.stderr.count("\n") == 1


def test_a_working_directory_the_guest_cannot_see_is_refused() -> None:
    r = subprocess.run([sys.executable, str(LAB_RUN), "--", "true"], capture_output=True,
                       text=True, timeout=120, cwd="/tmp")
    assert r.returncode == lab.Exit.SETUP
    assert r.stderr.startswith("lab: the working directory /tmp is under /tmp")  # itself
