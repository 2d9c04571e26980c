"""Test selection by what the host's KVM can do (tests/host.py).

* ``lab``: the test needs hardware virtualization. pyproject's addopts deselect these
  (-m "not lab"), so `pytest` and `make test` run everything else and skip nothing;
  `make lab-test` runs them in the lab (`pytest -m lab` in its L1 guest). Selecting
  them on a host without hardware virtualization is an error, not a wall of failures
  or skips.
* ``pvm``: the test asserts behaviour of this project's PVM hosts (an emulation
  failure, the emulator's speed): deselected where /dev/kvm is not PVM.
"""

from __future__ import annotations

import pytest

from tests import host

LAB_HINT = "run them in the lab: make lab-test (or lab/run -- .venv/bin/python -m pytest -m lab)"


@pytest.hookimpl(trylast=True)  # after -m has deselected what the user did not ask for
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not host.PVM:
        pvm_only = [i for i in items if i.get_closest_marker("pvm")]
        if pvm_only:
            config.hook.pytest_deselected(items=pvm_only)
            items[:] = [i for i in items if not i.get_closest_marker("pvm")]
    lab = [i for i in items if i.get_closest_marker("lab")]
    if lab and not host.HARDWARE_VIRT:
        raise pytest.UsageError(
            f"{len(lab)} selected tests need hardware virtualization (marker lab), and "
            f"this host's /dev/kvm has none{' (it is PVM)' if host.PVM else ''}: {LAB_HINT}"
        )
