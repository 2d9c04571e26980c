"""Where lab tests run, /dev/kvm is hardware-assisted: the lab is what it claims to be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import host

pytestmark = pytest.mark.lab


def test_dev_kvm_is_hardware_assisted_and_in_the_lab_kvm_amd_as_asked() -> None:
    assert host.HARDWARE_VIRT and not host.PVM
    assert Path("/dev/kvm").exists()
    where = os.environ.get("COREVISOR_LAB")  # set by lab/run: npt=0 or npt=1
    if where is not None:
        params = Path("/sys/module/kvm_amd/parameters")
        assert (params / "nested").read_text().strip() == "1"
        assert (params / "npt").read_text().strip() == ("Y" if where == "npt=1" else "N")
