"""Turning the sandbox on and confining threads (the mechanics behind sandbox.enable and
sandbox.confine; the design is in sandbox/__init__.py).

What does not live here: the allowlists (policy.py), the BPF encoding (bpf.py).
"""

from __future__ import annotations

import faulthandler
import linecache
import os
import signal
import threading
import traceback  # noqa: F401 - imported before any thread is confined (module docstring)
from typing import Any

from corevisor.sandbox import CONTROL, EXIT_STATUS, ROLES, SandboxError, policy
from corevisor.sandbox.bpf import install
from corevisor.sandbox.syscalls import NAMES

__all__ = ["enable", "confine", "role"]

_state = threading.local()  # .role: what the calling thread is confined to
_REPORT_FD = 2


def role() -> str | None:
    """The role the calling thread is confined to (None: not confined)."""
    return getattr(_state, "role", None)


def _check_kernel() -> None:
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
    except OSError:
        actions = []
    if "trap" not in actions:
        raise SandboxError(
            "this kernel has no seccomp filters with SECCOMP_RET_TRAP "
            "(CONFIG_SECCOMP_FILTER); run with --no-sandbox"
        )


def reporter() -> None:
    """faulthandler for the Python traceback, then the C handler in front of it."""
    try:
        import corevisor.sandbox._sigsys as _sigsys
    except ImportError as e:
        raise SandboxError(
            f"the sandbox's SIGSYS reporter is not built ({e}): reinstall corevisor "
            "where a C compiler and Python's headers are present (make setup), "
            "or run with --no-sandbox"
        ) from None
    faulthandler.register(signal.SIGSYS, file=_REPORT_FD, all_threads=False, chain=False)
    table = tuple(NAMES.get(nr) for nr in range(max(NAMES) + 1))
    _sigsys.install(table, EXIT_STATUS, _REPORT_FD)


def _no_files() -> bool:
    current = role()
    return current is not None and current != CONTROL


def _patch_linecache() -> None:
    """Tracebacks formatted on a confined leaf thread carry no source lines (they would
    open the source file: a forbidden openat there)."""
    update, check = linecache.updatecache, linecache.checkcache

    def updatecache(filename: str, module_globals: Any = None) -> list[str]:
        return [] if _no_files() else update(filename, module_globals)

    def checkcache(filename: str | None = None) -> None:
        if not _no_files():
            check(filename)

    linecache.updatecache = updatecache
    linecache.checkcache = checkcache


def enable() -> None:
    """The reporter, every role's program built, control on every thread (TSYNC)."""
    _check_kernel()
    reporter()
    _patch_linecache()
    programs = {r: policy.program(r) for r in ROLES}
    try:
        install(programs[CONTROL], tsync=True)
    except OSError as e:
        raise SandboxError(f"cannot install the control filter: {e.strerror or e}") from None
    _state.role = CONTROL


def confine(role_name: str, name: str) -> None:
    """Install role_name's filter on the calling thread (control: inherited already).

    A thread that cannot be confined must not run unconfined: the process ends.
    """
    try:
        if role_name != CONTROL:
            install(policy.program(role_name))
        _state.role = role_name
    except (OSError, ValueError) as e:
        message = f"corevisor: sandbox: cannot confine thread {name} to role {role_name}: {e}\n"
        os.write(_REPORT_FD, message.encode(errors="replace"))
        os._exit(EXIT_STATUS)
