"""KVM tests: real bundled guests on real /dev/kvm, judged by their output and status.

They skip only where /dev/kvm is absent or unusable, with a loud reason; on a host that
has it, a skip is a bug.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

KVM_OK = os.access("/dev/kvm", os.R_OK | os.W_OK)
# In the lab (lab/vm.py sets COREVISOR_LAB) everything runs emulated, ~10-30x slower
# than here, and a CLI start takes ~10 s: the guards against a hang (timeouts, deadlines
# for a line to appear) stretch by this factor there. Nothing asserts on speed.
LAB_SLOWDOWN = 10 if os.environ.get("COREVISOR_LAB") else 1
NO_KVM_REASON = "/dev/kvm is absent or not accessible: KVM tests cannot run on this host"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KVM_OK:
        return
    warnings.warn(f"SKIPPING ALL KVM TESTS: {NO_KVM_REASON}", stacklevel=1)
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=NO_KVM_REASON))


@pytest.fixture(scope="session")
def guests() -> dict[str, Path]:
    """Build the bundled guests once and return name -> image path."""
    from corevisor import bundled

    bundled.build_guests()
    return {name: bundled.image_path(name) for name in bundled.GUESTS}


def patience(seconds: float) -> float:
    """How long a guard against a hang waits on this host (LAB_SLOWDOWN)."""
    return seconds * LAB_SLOWDOWN


def corevisor(
    *args: str, timeout: float = 180, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as a user would (prefix: e.g. `ip netns exec`);
    timeout is the guard here, stretched in the lab (patience)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "corevisor.cli", *args],
        capture_output=True,
        text=True,
        timeout=patience(timeout),
        stdin=subprocess.DEVNULL,
        check=False,
    )


@contextlib.contextmanager
def tap_in_netns(ns: str, tap: str, cidr: str, user: int | None = None) -> Iterator[str]:
    """A network namespace ns holding TAP tap, up, with address cidr; removed afterwards.

    The guest's NIC sits on the TAP; corevisor runs in the namespace
    (`prefix=("ip", "netns", "exec", ns)`), so the host's own network is never touched.
    user: the TAP's owner, for a VMM that attaches after dropping root (the jail).
    """
    owner = ("user", str(user)) if user is not None else ()
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
    try:
        for cmd in (
            ("tuntap", "add", "dev", tap, "mode", "tap", *owner),
            ("addr", "add", cidr, "dev", tap),
            ("link", "set", tap, "up"),
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True, timeout=30)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


JAIL_USER = "cvjail"


def ensure_user(name: str) -> tuple[int, int]:
    """A real unprivileged user (created once, with no home and no login, if missing)."""
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


@pytest.fixture(scope="session")
def jail_user() -> tuple[int, int]:
    """The user --jail drops to in the tests."""
    return ensure_user(JAIL_USER)
