"""Host-side output that can fail without touching the guest: serial targets and stderr.

Output is the host's problem, not the guest's. A closed pipe on stdout (``corevisor run
rtos | head -1``), a full device or file system (``>/dev/full``, a full ``log_dir``) or
an unwritable stderr must neither stop a guest nor change the exit status, which stays
the guest's. So every write corevisor makes on a guest's behalf goes through a
``GuardedOutput``: the first failure is reported once (one ``corevisor: NAME: ...``
line naming the partition and the target), and from then on that target's output is
dropped while the guest runs on. A failed stdout or stderr is also pointed at
/dev/null (``silence``), so that bytes still held in Python's buffers and the
interpreter's flush at exit succeed instead of turning into exit status 120.

``notice`` is the one way a ``corevisor:`` line reaches stderr: if stderr itself fails,
it is silenced and the line is lost, never raised. ``ensure_std_fds`` opens /dev/null
on any of fds 0-2 that is closed at start-up, so no later open (a disk image!) can
become fd 2 and receive diagnostics.

What does not live here: the serial backends themselves (console.py), checking a
``file:`` target before it is opened (inputs.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

__all__ = ["GuardedOutput", "Report", "notice", "report_to_stderr", "silence", "ensure_std_fds"]

Report = Callable[[str, str], None]  # (partition name, message)

_STD_FDS = (0, 1, 2)


def _fileno(stream: Any) -> int | None:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


_null_fd: int | None = None  # /dev/null for silence(), opened once (devnull())


def devnull() -> int:
    """A /dev/null fd kept for silence(): opened here, on the first call, because the
    failing write that needs it is often on a sandboxed vCPU thread, which may not open
    files (sandbox/); ensure_std_fds opens it at start-up."""
    global _null_fd
    if _null_fd is None:
        _null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _null_fd


def silence(stream: Any) -> None:
    """Point the descriptor behind stream (stdout, stderr) at /dev/null.

    Only fds 1 and 2 are redirected: they are the process's own, and what is still
    buffered for them must be able to drain somewhere at exit.
    """
    fd = _fileno(stream)
    if fd not in (1, 2):
        return
    with contextlib.suppress(OSError):
        os.dup2(devnull(), fd)


def ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0, 1, 2 that is closed (``2>&-``), and give Python a
    stream for it, so the first file corevisor opens cannot land on a standard fd."""
    for fd in _STD_FDS:
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    devnull()  # for silence(), later, on whatever thread meets a failing output


_stderr_lock = threading.Lock()


def notice(message: str, stream: IO[str] | None = None) -> None:
    """Print one line (the caller formats ``corevisor: ...``); never raises."""
    out = stream if stream is not None else sys.stderr
    with _stderr_lock:
        try:
            print(message, file=out, flush=True)
        except (OSError, ValueError):
            silence(out)


class GuardedOutput:
    """A write function for one host target that reports its first failure and then
    drops output, so the guest that produced it never sees the failure.

    ``target`` names it in the report ("stdout", "file:/x/rtos.log", "log /x/a.log");
    ``on_failure`` runs once after the report (silence a standard stream, close a file).
    """

    def __init__(
        self,
        write: Callable[[bytes], object],
        target: str,
        name: str,
        report: Report,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self.target = target
        self.name = name
        self._report = report
        self._on_failure = on_failure
        self.failed = False
        self._lock = threading.Lock()

    def write(self, data: bytes, name: str | None = None) -> None:
        """Write data, or drop it if this target has failed before.

        ``name`` overrides the partition named in the report, for a target several
        partitions share (the terminal of a ConsoleMux).
        """
        if self.failed:
            return
        try:
            self._write(data)
        except (OSError, ValueError) as e:
            self._fail(e, name or self.name)

    def _fail(self, e: Exception, name: str) -> None:
        with self._lock:
            if self.failed:
                return
            self.failed = True
        why = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        if self._on_failure is not None:
            with contextlib.suppress(OSError, ValueError):
                self._on_failure()
        self._report(
            name,
            f"output to {self.target} failed ({why}); the guest keeps running, "
            f"its output to {self.target} is dropped from now on",
        )


def report_to_stderr(name: str, message: str) -> None:
    """The default Report: ``corevisor: NAME: message`` on stderr (a lone machine's),
    the message made safe to print (errors.show)."""
    from corevisor.errors import show

    notice(f"corevisor: {name}: {show(message, limit=None)}")
