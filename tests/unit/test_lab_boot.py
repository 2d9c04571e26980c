"""The lab tool booted for real: QEMU-TCG and Debian's kernel, no /dev/kvm needed here.

Each test is one boot of the L1 guest (~6 s on an idle host, several times that under
load): a command's status, output, directory and environment; the timeout; a module
that cannot load. What runs inside it (tests/lab) is make lab-test's business.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lab

LAB_RUN = Path(lab.__file__).with_name("run")
REPO = LAB_RUN.parent.parent


def _lab_run(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LAB_RUN), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)


def test_a_command_gets_its_directory_environment_output_and_status_back() -> None:
    script = ('pwd; echo "$LAB_TEST_WORDS"; echo "$COREVISOR_LAB"; echo to-stderr >&2; '
              "cd /sys/module/kvm_amd/parameters && cat npt nested vgif && cd - >/dev/null; "
              "test -c /dev/kvm && echo has-dev-kvm; grep -q -w svm /proc/cpuinfo && echo svm; "
              "touch /tmp/x /run/x && echo tmpfs-writable; touch src/x 2>/dev/null || "
              "echo root-read-only; exit 7")
    r = _lab_run("--npt", "0", "--l1-cmdline", "kvm_amd.vgif=0", "--", "sh", "-c", script,
                 env={**os.environ, "LAB_TEST_WORDS": "two  words 'q'"})
    assert r.returncode == 7, r.stderr
    assert r.stdout.splitlines() == [
        str(REPO), "two  words 'q'", "npt=0", "N", "1", "0", "has-dev-kvm", "svm",
        "tmpfs-writable", "root-read-only",
    ]
    assert r.stderr == "to-stderr\n"


def test_a_working_directory_below_tmp_is_shared_read_only(tmp_path: Path) -> None:
    """A checkout in /tmp/ci: the guest's own /tmp would hide it, so it is shared at its
    path, read-only, and the guest's /tmp around it stays its writable tmpfs."""
    (tmp_path / "f").write_text("from the host\n")
    r = _lab_run("--", "sh", "-c", "pwd; cat f; touch g 2>/dev/null || echo read-only; "
                 "touch /tmp/y && echo tmpfs-writable", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.splitlines() == [str(tmp_path), "from the host", "read-only",
                                     "tmpfs-writable"]
    assert not (tmp_path / "g").exists()


def test_a_run_longer_than_its_timeout_is_killed_with_status_124() -> None:
    r = _lab_run("--timeout", "3", "--", "sleep", "600")
    assert r.returncode == lab.Exit.TIMEOUT
    assert r.stderr == "lab: timeout: the run took longer than 3 s (QEMU killed)\n"


def test_a_module_that_cannot_load_is_named_with_status_122() -> None:
    """Without SVM in the CPU model, kvm_amd refuses to load."""
    r = _lab_run("--cpu", "qemu64,-svm", "--", "true")
    assert r.returncode == lab.Exit.MODULE, r.stderr
    assert r.stderr.startswith("lab: module load failed: kvm-amd: ")
    assert r.stderr.count("\n") == 1
