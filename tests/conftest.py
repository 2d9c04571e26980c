"""Test selection by what the host's KVM can do (corevisor.kvm.host, the one home for it).

* ``lab``: the test needs hardware virtualization. pyproject's addopts deselect these
  (-m "not lab"), so `pytest` and `make test` run everything else and skip nothing;
  `make lab-test` runs them in the lab (`pytest -m lab tests` in its L1 guest).
  Selecting them on a host without hardware virtualization is an error, not a wall of
  failures or skips. Under exactly `-m lab`, a test file that never says ``mark.lab``
  is not even imported: in the lab every import runs ~30x slower, and importing the
  whole suite to deselect it would cost minutes.
* ``portable``: the test runs on every KVM. `make test` runs it here, on PVM, and
  `make lab-test` (``-m "lab or portable"``, LAB_SELECTION) runs it again in the lab,
  on SVM: the same guest images through the hardware path of KVM. Keep these few (a
  CLI start costs ~10 s in the lab) and free of host assumptions (a test whose
  expectation differs by host asks corevisor.kvm.host, and says why).
* ``pvm``: the test asserts behaviour of this project's PVM hosts (an emulation
  failure, the emulator's speed): deselected where /dev/kvm is not PVM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

LAB_HINT = "run them in the lab: make lab-test (or lab/run -- .venv/bin/python -m pytest -m lab)"
LAB_SELECTION = "lab or portable"  # make lab-test's -m
# -m expressions that select only marked tests, and the words a file must hold to have any
LAB_RUNS = {"lab": ("mark.lab",), LAB_SELECTION: ("mark.lab", "mark.portable")}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    words = LAB_RUNS.get(config.getoption("markexpr"))
    if words is None or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    text = collection_path.read_text(errors="replace")
    return not any(w in text for w in words)


@pytest.hookimpl(trylast=True)  # after -m has deselected what the user did not ask for
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = {m: [i for i in items if i.get_closest_marker(m)] for m in ("pvm", "lab")}
    if not (marked["pvm"] or marked["lab"]):
        return
    from corevisor.kvm.host import detect  # opens /dev/kvm: only when a marker needs it

    host = detect()
    if marked["pvm"] and not host.is_pvm:
        config.hook.pytest_deselected(items=marked["pvm"])
        items[:] = [i for i in items if not i.get_closest_marker("pvm")]
    if marked["lab"] and not host.hardware_assisted:
        raise pytest.UsageError(
            f"{len(marked['lab'])} selected tests need hardware virtualization (marker lab), "
            f"and this host's /dev/kvm is {host.kvm}: {LAB_HINT}"
        )
