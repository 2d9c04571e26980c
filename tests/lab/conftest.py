"""Lab tests: real Linux guests (L2) under corevisor on a hardware-assisted /dev/kvm.

Every test here carries the ``lab`` marker and runs where /dev/kvm has VT-x/AMD-V: in
the lab's L1 guest (make lab-test) or on such a machine. The kernel is Debian's
packaged one, found and its vmlinux extracted by the lab (lab/kernel.py), so the L1
guest reads the file the host extracted before the boot instead of spending a
minute decompressing it at a thirtieth of the host's speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lab
from lab.kernel import Kernel, find_kernel


@pytest.fixture(scope="session")
def kernel() -> Kernel:
    return find_kernel()


@pytest.fixture(scope="session")
def bzimage(kernel: Kernel) -> Path:
    return kernel.image


@pytest.fixture(scope="session")
def vmlinux(kernel: Kernel) -> Path:
    return kernel.vmlinux(lab.cache_dir())
