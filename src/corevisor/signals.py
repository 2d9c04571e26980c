"""Signals in the VMM: the vCPU kick, threads born with signals blocked, and the process
signals that stop a run (SIGINT, SIGTERM, SIGHUP).

**The kick.** A command for a vCPU that is inside KVM_RUN (pause, stop, a halt probe)
must make KVM_RUN return. ``kvm_run.immediate_exit`` covers a vCPU about to enter it; a
signal covers one already inside, blocked in a halted guest or running guest code.
That signal, KICK_SIGNAL, is blocked in every thread corevisor starts, and the vCPU
thread's KVM_SET_SIGNAL_MASK is its own mask minus KICK_SIGNAL, a mask KVM swaps in for
the duration of KVM_RUN only (QEMU does the same with its SIG_IPI). So the kick
interrupts the guest (KVM_RUN returns EINTR), is never delivered to a handler, and
stays pending until the vCPU consumes it (``consume_kick``) before it enters KVM_RUN
again. No handler is installed, so any thread may kick at any time: nothing depends on
the main thread having done something first.

**Threads.** ``start_thread`` starts a daemon thread with every signal blocked except
the ones the kernel raises for a fault in that thread (SIGSYS included: the seccomp
sandbox reports a forbidden call through it), so process-directed signals always land
on the main thread, where Python runs its handlers, and never interrupt a vCPU or an
I/O thread's poll. The thread gets its name in the kernel too (``top -H``, strace) and
a sandbox role: it runs ``setup`` (what must happen before confinement, like a vCPU's
pinning), then enters its role's seccomp filter when the sandbox is on
(sandbox/__init__.py), then ``target``.

**Stopping.** ``stop_signals(request)`` routes SIGINT, SIGTERM and SIGHUP to
``request(signum)``, which must only store the request: it runs between two bytecodes
of the main thread, possibly while that thread holds a lock. Whoever monitors the run
(system.System) then stops every partition cleanly, so the terminal gets its settings
back, ``unix:`` sockets are removed and logs are complete. A run stopped by signal N
exits with 128 + N (130 SIGINT, 143 SIGTERM, 129 SIGHUP), the status a shell shows for
a process killed by that signal.

What does not live here: the vCPU command protocol (vcpu.py), the monitor (system.py).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from corevisor import sandbox

__all__ = [
    "KICK_SIGNAL",
    "STOP_SIGNALS",
    "start_thread",
    "kvm_run_blocked",
    "consume_kick",
    "kick",
    "stop_signals",
    "exit_status",
    "describe",
]

KICK_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Raised by the kernel for a fault of the thread itself: blocking them would turn a
# crash into a hang, so they stay deliverable everywhere.
_FAULT_SIGNALS = {
    signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS,
}


def _thread_mask() -> set[signal.Signals]:
    return set(signal.valid_signals()) - _FAULT_SIGNALS - {signal.SIGKILL, signal.SIGSTOP}


def start_thread(
    target: Callable[[], None],
    name: str,
    role: str = sandbox.CONTROL,
    setup: Callable[[], None] | None = None,
) -> threading.Thread:
    """Start a daemon thread that inherits a mask blocking every (non-fault) signal.

    role: its seccomp role (sandbox.ROLES; the default, control, is the broadest).
    setup: run on the thread before it is confined; it must not raise (a vCPU keeps
    its own set-up error and reports it from target).
    """

    def run() -> None:
        sandbox.name_thread(name)
        if setup is not None:
            setup()
        sandbox.confine(role, name)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _thread_mask())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def kvm_run_blocked() -> set[int]:
    """The calling (vCPU) thread's blocked signals minus the kick: its mask in KVM_RUN."""
    current = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return {int(s) for s in current if s != KICK_SIGNAL}


def consume_kick() -> None:
    """Take a pending kick off the calling thread, so KVM_RUN does not return at once."""
    signal.sigtimedwait((KICK_SIGNAL,), 0)


def kick(thread: threading.Thread) -> None:
    """Interrupt the thread's KVM_RUN. The caller guarantees the thread has not ended
    (vcpu.py holds the lock the thread takes to say it stopped)."""
    ident = thread.ident
    if ident is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pthread_kill(ident, KICK_SIGNAL)


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by signal signum: 128 + signum."""
    return 128 + signum


def describe(signum: int) -> str:
    """Why the run stopped, for the ``NAME: stopped: WHY`` line."""
    if signum == signal.SIGINT:
        return "interrupted by the user"
    return f"received {signal.Signals(signum).name}"


@contextlib.contextmanager
def stop_signals(request: Callable[[int], None]) -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP call request(signum) (main thread only).

    The previous handlers come back on exit. Outside the main thread this does nothing:
    Python runs signal handlers only there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        request(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
