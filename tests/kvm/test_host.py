"""`corevisor host` through the real CLI, checked against what the kernel itself says.

The expected values come from sources the report does not share code with: the module
directories and parameters in /sys/module, /proc/cpuinfo, the process's affinity and
KVM_CHECK_EXTENSION asked here directly. On this project's machines that means PVM with
shadow paging; in the lab (lab-marked test below) kvm_amd with NPT as the lab booted it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corevisor.kvm.bindings import Cap
from corevisor.kvm.ioctls import Kvm
from tests.kvm.conftest import corevisor

SYS_MODULE = Path("/sys/module")


def _host_json() -> dict[str, object]:
    r = corevisor("host", "--json")
    assert r.returncode == 0, r.stderr
    data: dict[str, object] = json.loads(r.stdout)
    return data


def _param(module: str, name: str) -> str:
    return (SYS_MODULE / module / "parameters" / name).read_text().strip()


def test_host_json_names_this_hosts_kvm_and_mmu() -> None:
    data = _host_json()
    flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split()
    if (SYS_MODULE / "kvm_pvm").is_dir():
        # HOST.md: PVM, shadow paging, no vmx/svm flag, tdp_mmu = N
        assert (data["kvm"], data["module"], data["mmu"]) == ("pvm", "kvm_pvm", "shadow")
        assert data["is_pvm"] is True and data["hardware_assisted"] is False
        assert data["shadow_paging"] is True and data["nested_paging"] is False
        assert "vmx" not in flags and "svm" not in flags
        assert data["virt_flags"] and "svm" not in data["virt_flags"]  # type: ignore[operator]
    elif (SYS_MODULE / "kvm_amd").is_dir():
        npt = _param("kvm_amd", "npt")[0] in "Y1"
        assert (data["kvm"], data["mmu"]) == ("kvm_amd", "npt" if npt else "shadow")
        assert "svm" in flags and "svm" in data["virt_flags"]  # type: ignore[operator]
    else:
        ept = _param("kvm_intel", "ept")[0] in "Y1"
        assert (data["kvm"], data["mmu"]) == ("kvm_intel", "ept" if ept else "shadow")
    assert data["tdp_mmu"] == (_param("kvm", "tdp_mmu")[0] in "Y1")
    assert data["cores"] == os.cpu_count()
    assert data["allowed"] == sorted(os.sched_getaffinity(0))
    assert data["dev_kvm"] == "" and data["api_version"] == 12
    kvm = Kvm()
    try:
        caps = data["capabilities"]
        assert isinstance(caps, dict)
        for cap in (Cap.MAX_VCPUS, Cap.NR_MEMSLOTS, Cap.BINARY_STATS_FD, Cap.SET_GUEST_DEBUG2):
            assert caps[cap.name] == kvm.check_extension(cap), cap.name
        assert caps["BINARY_STATS_FD"] == 1 and caps["IRQCHIP"] == 1
    finally:
        kvm.close()


def test_host_text_report_reads_as_a_report() -> None:
    r = corevisor("host")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    kvm_line = next(x for x in lines if x.startswith("KVM:"))
    mmu_line = next(x for x in lines if x.startswith("MMU:"))
    if (SYS_MODULE / "kvm_pvm").is_dir():
        assert "PVM (module kvm_pvm)" in kvm_line
        assert "shadow paging (TDP MMU off" in mmu_line
        assert any("no vmx/svm" in x for x in lines if x.startswith("virt flags:"))
    assert any(x.startswith("/dev/kvm:") and "API 12" in x for x in lines)
    assert any(x.startswith("cores:") and f"{os.cpu_count()} (online" in x for x in lines)
    assert any(x.startswith("isolation:") and "isolcpus" in x for x in lines)
    row = next(x for x in lines if x.strip().startswith("BINARY_STATS_FD"))
    assert row.split()[1] == "1" and "run --stats" in row


def test_host_without_a_usable_dev_kvm_says_why_and_fails() -> None:
    # /dev/kvm replaced by /dev/null in a private mount namespace: opens, but is not KVM
    script = 'mount --bind /dev/null /dev/kvm && exec "$0" -m corevisor.cli host'
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("/dev/kvm:"))
    assert "unusable: KVM_GET_API_VERSION failed: ENOTTY" in line
    assert "capabilities" not in r.stdout


def _lab_npt() -> bool:
    """How the lab booted: COREVISOR_LAB=npt=N (lab/vm.py), else kvm_amd.npt= on /proc/cmdline."""
    env = os.environ.get("COREVISOR_LAB", "")
    if env.startswith("npt="):
        return env == "npt=1"
    words = Path("/proc/cmdline").read_text().split()
    return "kvm_amd.npt=0" not in words


@pytest.mark.lab
def test_lab_host_is_kvm_amd_with_npt_as_booted(tmp_path: Path) -> None:
    npt = _lab_npt()
    data = _host_json()
    assert (data["kvm"], data["module"]) == ("kvm_amd", "kvm_amd")
    assert data["mmu"] == ("npt" if npt else "shadow")
    assert data["nested_paging"] is npt and data["shadow_paging"] is not npt
    assert data["hardware_assisted"] is True and data["is_pvm"] is False
    assert "svm" in data["virt_flags"]  # type: ignore[operator]
    text = corevisor("host").stdout
    assert "kvm_amd: AMD-V (SVM)" in text
    assert ("AMD NPT, nested paging" in text) is npt
