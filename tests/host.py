"""What kind of KVM the test host has: just enough for the tests to choose their path.

Two facts, read once, in one place (``corevisor host`` will describe a host in full):

* PVM: the out-of-tree kvm_pvm module backs /dev/kvm (this project's development and CI
  machines): guest kernel code is emulated and lacks some instructions, so a few
  tests assert on exactly that and carry the ``pvm`` marker;
* HARDWARE_VIRT: /dev/kvm is hardware-assisted (vmx or svm in /proc/cpuinfo and not
  PVM): a VT-x/AMD-V machine, or the lab's L1 guest. Tests that need it carry the
  ``lab`` marker and run in the lab (make lab-test).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PVM", "HARDWARE_VIRT"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}


PVM = Path("/sys/module/kvm_pvm").is_dir()
HARDWARE_VIRT = not PVM and bool(_cpu_flags() & {"vmx", "svm"})
