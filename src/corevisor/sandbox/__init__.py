"""The seccomp sandbox: every thread of a run confined to the system calls its role needs.

**Roles.** Every thread corevisor starts goes through signals.start_thread with a role
(policy.py holds each role's allowlist, docs/sandbox.md the counts):

    control   the main thread, the health monitor, an API's threads: builds and
              restarts machines, so it may open files, create VMs and threads
    vcpu      KVM_RUN and the device models that run on the vCPU's exits
    virtio    a virtio device's I/O thread: its queues, disk or TAP, interrupts
    console   serial input from the terminal
    socket    a unix: serial socket (accepts one client at a time)
    doorbell  a doorbell = "thread" channel's relay
    gdb       the GDB server and the debugging it does on parked vCPUs

**When.** ``enable`` (the CLI, once the arguments and the system file are read) installs
the control filter on the calling thread and, with SECCOMP_FILTER_FLAG_TSYNC, on every
thread already running, so nothing started before it stays unconfined. Filters are
inherited: a thread started later has control's filter from birth, and start_thread
adds its role's filter on the thread itself after the role's set-up (a vCPU's pinning)
and before it touches any input (a guest exit, a virtqueue, a socket). Filters stack
and the strictest answer wins, so the control filter is the union of every role's
allowlist plus its own: no role can need a call control lacks.

**A forbidden call** is SECCOMP_RET_TRAP: the kernel does not execute it and sends
SIGSYS to the calling thread, where a C handler (_sigsys.c) writes one line naming the
call, its number (and for an ioctl, the request), the thread's name and id, then the
thread's Python traceback (faulthandler), then ends the process with EXIT_STATUS (159,
128 + SIGSYS). Why not the alternatives: RET_KILL_PROCESS leaves only a kernel audit
record that an unprivileged user cannot read; RET_ERRNO makes the call fail as
PermissionError, which code that tolerates a failing call (contextlib.suppress(OSError)
on a cleanup path) would swallow; a Python signal handler runs only on the main thread,
after the trapped call has already "returned" its own number as if it succeeded.

Confined threads cannot open files, so two things that do it quietly are made not to:
imports (everything a run needs is imported before its threads start; a late import
on a confined thread is reported like any other forbidden call) and source lines in
tracebacks (linecache reads no file on a thread confined to a role without open).

What does not live here: the BPF encoding (bpf.py), the allowlists (policy.py), the
jail (jail.py).
"""

from __future__ import annotations

import ctypes

from corevisor.errors import CorevisorError

__all__ = [
    "CONTROL",
    "VCPU",
    "VIRTIO",
    "CONSOLE",
    "SOCKET",
    "DOORBELL",
    "GDB",
    "ROLES",
    "EXIT_STATUS",
    "name_thread",
    "confine",
    "enable",
    "enabled",
    "SandboxError",
]

CONTROL = "control"
VCPU = "vcpu"
VIRTIO = "virtio"
CONSOLE = "console"
SOCKET = "socket"
DOORBELL = "doorbell"
GDB = "gdb"
ROLES = (CONTROL, VCPU, VIRTIO, CONSOLE, SOCKET, DOORBELL, GDB)
EXIT_STATUS = 128 + 31  # 159: the status of a run stopped by a forbidden call (SIGSYS)

_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)
_enabled = False


class SandboxError(CorevisorError):
    """The sandbox cannot be set up here (no seccomp, the reporter not built)."""


def name_thread(name: str) -> None:
    """Give the calling thread its name in the kernel (15 bytes: ``top -H``, reports)."""
    _libc.prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:15], 0, 0, 0)


def enabled() -> bool:
    """Whether this process runs sandboxed (every thread started from now on confined)."""
    return _enabled


def confine(role: str, name: str = "") -> None:
    """Confine the calling thread to role when the sandbox is on (else do nothing)."""
    if not _enabled:
        return
    from corevisor.sandbox import enforce

    enforce.confine(role, name)


def enable() -> None:
    """Sandbox this process from now on: the reporter, then the control filter on every
    thread (see the module docstring). Raises SandboxError if that cannot be done."""
    global _enabled
    if _enabled:
        return
    from corevisor.sandbox import enforce

    enforce.enable()
    _enabled = True
