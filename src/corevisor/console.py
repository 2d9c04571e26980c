"""Serial backends: the host end of a guest's UART (stdout, a file, a Unix socket, nothing).

``open_serial(spec, name)`` turns a validated serial setting (a spec.SerialSpec) into a
backend:

- ``stdout``: output to ``sys.stdout.buffer``, flushed on every write. Input is read from
  stdin only if stdin is a terminal; the terminal is then put in no-echo, no-line-buffer
  mode (the guest echoes and edits lines itself) with signals kept, so Ctrl-C still
  reaches corevisor, and is restored by ``close`` or at exit.
- ``file:PATH``: output appended to PATH (created if missing), unbuffered so whatever
  the guest printed is in the file as soon as ``write`` returns. No input. PATH is a
  regular file or a character device (a terminal, /dev/null); a FIFO would stall the
  guest whenever its reader does, and is refused like a socket or a directory.
- ``unix:PATH``: corevisor listens on a Unix socket at PATH (a stale socket left by a dead
  run is replaced; a live one is an error). Output goes to the connected client, and what
  the client sends is guest input. Output written while no client is connected is kept,
  newest 64 KiB, and sent when one connects, so a late client still sees the boot log. A
  new client replaces the current one. A client that stops reading loses output rather
  than stalling the guest: sends never block a vCPU.
- ``null``: output discarded, no input.

A daemon (api/) also wraps every partition's backend in a SerialTap: it keeps the
newest 64 KiB of output and hands every later byte to SerialWatch readers (the API's
serial stream), so output reaches the API whatever the partition's own backend is, and
a reader that falls behind loses output rather than stalling the guest.

Several partitions sharing one terminal use a ConsoleMux instead of ``stdout``: each
partition gets a PrefixedSerial that tees its output to a log file of its own and sends
it to the terminal one whole line at a time, prefixed ``name | `` (the name coloured
when stdout is a terminal), so lines of different guests never mix mid-line. No input:
it would be unclear which guest a keystroke is for.

Output that the host cannot take (a closed pipe, a full disk) never reaches the guest:
each target's first failure is reported once and its output dropped from then on
(outputs.GuardedOutput), while the guest runs on with its exit status intact.

``write`` runs on a vCPU thread once per guest byte, so it does the least it can. Input
arrives on a daemon thread per backend that calls ``feed`` (the UART's
``enqueue_input``); that thread starts in ``start_input``, which the machine calls
from its start(), never while it is being built.

What does not live here: parsing and validating the setting (config/) and the UART
itself (devices/uart16550.py).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import selectors
import socket
import stat
import sys
import termios
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from corevisor import inputs, sandbox
from corevisor.errors import ConfigError, show
from corevisor.outputs import GuardedOutput, Report, report_to_stderr, silence
from corevisor.signals import start_thread
from corevisor.spec import SerialKind, SerialSpec

__all__ = [
    "SerialBackend",
    "StdoutSerial",
    "FileSerial",
    "UnixSocketSerial",
    "NullSerial",
    "ConsoleMux",
    "PrefixedSerial",
    "SerialTap",
    "SerialWatch",
    "open_serial",
    "listen_unix",
    "UNIX_BACKLOG_LIMIT",
    "TAP_KEEP",
    "WATCH_LIMIT",
]

Feed = Callable[[bytes], None]

# Output kept for a Unix-socket client that has not connected yet.
UNIX_BACKLOG_LIMIT = 64 * 1024
_READ_CHUNK = 4096
_JOIN_TIMEOUT = 2.0
# Output a SerialTap keeps for a reader that starts late (the API's backlog).
TAP_KEEP = 64 * 1024
# What one SerialWatch may hold unread before further output is dropped for it.
WATCH_LIMIT = 1 << 20


class SerialBackend(Protocol):
    """What the VMM needs from the host end of a serial line."""

    def write(self, data: bytes) -> None:
        """Send guest output (called on a vCPU thread; must not block for long)."""
        ...

    def start_input(self, feed: Feed) -> None:
        """Start delivering host input to ``feed`` (from a thread of the backend's own)."""
        ...

    def close(self) -> None:
        """Stop input, release files, sockets and terminal settings. Idempotent."""
        ...


class _InputPump:
    """A daemon thread copying bytes from a file descriptor to ``feed`` until stopped.

    It waits on the fd and a wake-up pipe together, so ``stop`` does not depend on the
    fd ever becoming readable.
    """

    def __init__(self, fd: int, feed: Feed, name: str) -> None:
        self._fd = fd
        self._feed = feed
        self._wake_r, self._wake_w = os.pipe()
        try:
            self._thread = start_thread(self._run, f"serial-in-{name}", sandbox.CONSOLE)
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._fd, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fd == self._wake_r:
                        return
                    try:
                        data = os.read(self._fd, _READ_CHUNK)
                    except OSError:
                        return
                    if not data:
                        return  # EOF: nothing more will come
                    self._feed(data)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(_JOIN_TIMEOUT)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)


class NullSerial:
    """Discards output and never produces input."""

    def write(self, data: bytes) -> None:
        """Drop the bytes."""

    def start_input(self, feed: Feed) -> None:
        """No input to deliver."""

    def close(self) -> None:
        """Nothing to release."""


class FileSerial:
    """Appends output to a file or a character device; no input (a log, or something a
    test can read). A FIFO, socket, directory or block device is refused (inputs.py)."""

    def __init__(self, path: str, name: str, report: Report = report_to_stderr) -> None:
        fd = inputs.open_output(path, inputs.Named(f'{name}: serial "file:{show(path)}"'))
        # Unbuffered: each write is one write(2), so readers see it immediately.
        self._file: BinaryIO = open(fd, "ab", buffering=0)
        self.path = path
        self._out = GuardedOutput(self._file.write, f"file:{path}", name, report)

    def write(self, data: bytes) -> None:
        """Append the bytes (dropped, once reported, if the file cannot take them)."""
        self._out.write(data)

    def start_input(self, feed: Feed) -> None:
        """A file gives no input."""

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class StdoutSerial:
    """Output to this process's stdout; input from stdin when it is a terminal.

    ``stdin_fd`` is a parameter so the terminal handling can be exercised on a pty.
    """

    def __init__(self, name: str, stdin_fd: int = 0, report: Report = report_to_stderr) -> None:
        self._name = name
        self._out = _stdout_binary()
        self._guard = GuardedOutput(
            self._write_flush, "stdout", name, report, on_failure=lambda: silence(self._out)
        )
        self._stdin_fd = stdin_fd
        self._pump: _InputPump | None = None
        self._saved_tty: list[Any] | None = None

    def write(self, data: bytes) -> None:
        """Write and flush, so output interleaves sensibly with the VMM's own messages."""
        self._guard.write(data)

    def _write_flush(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    def start_input(self, feed: Feed) -> None:
        """Read stdin only if it is a terminal: a pipe or /dev/null is not a console."""
        if self._pump is not None or not os.isatty(self._stdin_fd):
            return
        self._enter_raw_input()
        self._pump = _InputPump(self._stdin_fd, feed, self._name)

    def close(self) -> None:
        """Stop reading stdin and give the terminal its settings back."""
        if self._pump is not None:
            self._pump.stop()
            self._pump = None
        self._restore_tty()
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()

    def _enter_raw_input(self) -> None:
        try:
            saved = termios.tcgetattr(self._stdin_fd)
        except termios.error:
            return
        attrs = list(saved)
        attrs[3] &= ~(termios.ICANON | termios.ECHO)  # lflag; ISIG stays for Ctrl-C
        cc = list(attrs[6])
        cc[termios.VMIN] = 1
        cc[termios.VTIME] = 0
        attrs[6] = cc
        termios.tcsetattr(self._stdin_fd, termios.TCSANOW, attrs)
        self._saved_tty = saved
        # Also on an unhandled exception or sys.exit: a shell without echo is hostile.
        atexit.register(self._restore_tty)

    def _restore_tty(self) -> None:
        saved, self._saved_tty = self._saved_tty, None
        if saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self._stdin_fd, termios.TCSADRAIN, saved)
            atexit.unregister(self._restore_tty)


class UnixSocketSerial:
    """A listening Unix socket whose one client is the other end of the serial line."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self._name = name
        self._lock = threading.Lock()  # guards _client and _backlog (vCPU vs I/O thread)
        self._client: socket.socket | None = None
        self._backlog = bytearray()
        self._feed: Feed | None = None
        self._closed = False
        self._thread: threading.Thread | None = None  # accepts clients; start_input starts it
        self._listener = self._listen()
        try:
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            self._listener.close()
            self._unlink()
            raise

    def _error(self, reason: str) -> ConfigError:
        return ConfigError(f'{self._name}: serial "unix:{show(self.path)}": {reason}')

    def _listen(self) -> socket.socket:
        return listen_unix(self.path, 1, self._error)

    def write(self, data: bytes) -> None:
        """Send to the client without blocking, or keep the bytes until one connects."""
        with self._lock:
            client = self._client
            if client is None:
                backlog = self._backlog
                backlog += data
                if len(backlog) > UNIX_BACKLOG_LIMIT:
                    del backlog[:-UNIX_BACKLOG_LIMIT]
                return
            try:
                client.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                pass  # the client is not reading: drop rather than stall the guest
            except OSError:
                # Gone; the I/O thread sees EOF and forgets it.
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)

    def start_input(self, feed: Feed) -> None:
        """Start accepting clients and deliver what they send to ``feed``.

        Until then (a machine built but not started) a client's connection waits in
        the listen backlog, and output is kept for it as for any absent client.
        """
        self._feed = feed
        if self._thread is None and not self._closed:
            self._thread = start_thread(self._run, f"serial-{self._name}", sandbox.SOCKET)

    @property
    def connected(self) -> bool:
        """Whether a client is connected right now."""
        return self._client is not None

    def close(self) -> None:
        """Disconnect the client, stop the thread, remove the socket file."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        self._listener.close()
        self._unlink()
        if thread is None or not thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)

    def _run(self) -> None:
        current: socket.socket | None = None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fd == self._wake_r:
                        return
                    if key.fileobj is self._listener:
                        conn = self._accept()
                        if conn is None:
                            continue
                        if current is not None:
                            self._drop(sel, current)
                        current = conn
                        sel.register(conn, selectors.EVENT_READ)
                    elif key.fileobj is current:
                        try:
                            data = current.recv(_READ_CHUNK)
                        except OSError:
                            data = b""
                        if not data:
                            self._drop(sel, current)
                            current = None
                            continue
                        feed = self._feed
                        if feed is not None:
                            feed(data)
        finally:
            if current is not None:
                self._drop(sel, current)
            sel.close()

    def _accept(self) -> socket.socket | None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return None
        with self._lock:
            old_backlog = bytes(self._backlog)
            self._backlog.clear()
            if old_backlog:
                with contextlib.suppress(OSError):
                    conn.send(old_backlog, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            self._client = conn
        return conn

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        with self._lock:
            if self._client is conn:
                self._client = None
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        conn.close()  # after _client is cleared, so no writer can be using it


def listen_unix(
    path: str, backlog: int, error: Callable[[str], Exception], mode: int | None = None
) -> socket.socket:
    """A Unix socket listening at path. A stale socket left by a dead process is replaced;
    a live one (something accepts a connection) or a path that is not a socket is refused
    with error(reason). mode: the socket file's permissions, set before the file appears
    at path (bound under a temporary name, chmod, renamed), so no client ever sees a
    more permissive socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise error(f"cannot use the path: {e.strerror or e}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise error("the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            # Nobody listens: a stale socket from a previous run.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            raise error("another process is listening on this socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    where = path if mode is None else f"{path}.{os.getpid()}.tmp"
    try:
        sock.bind(where)
        if mode is not None:
            os.chmod(where, mode)
            os.rename(where, path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if where != path:
            with contextlib.suppress(OSError):
                os.unlink(where)
        raise error(f"cannot listen: {e.strerror or e}") from None
    return sock


# ANSI foreground colours for partition names, in config order.
_COLOURS = (36, 33, 35, 32, 34, 31)
# A guest that never ends a line must not grow the buffer without bound.
_MAX_PENDING_LINE = 4096


class ConsoleMux:
    """One terminal shared line by line by several partitions' serial output."""

    def __init__(
        self,
        out: BinaryIO | None = None,
        colour: bool | None = None,
        report: Report = report_to_stderr,
    ) -> None:
        out = out if out is not None else _stdout_binary()
        self._out = out
        self.report = report
        self._guard = GuardedOutput(
            self._write_flush, "stdout", "system", report, on_failure=lambda: silence(out)
        )
        if colour is None:
            try:
                colour = os.isatty(out.fileno())
            except (OSError, ValueError, AttributeError):
                colour = False
        self.colour = colour
        self._lock = threading.Lock()
        self._names: list[str] = []

    def backend(self, name: str, log_path: str | None, width: int = 0) -> PrefixedSerial:
        """A serial backend for partition name: lines to the terminal, bytes to log_path.

        ``width`` pads the names so the ``|`` bars line up (the longest name's length).
        """
        colour = _COLOURS[len(self._names) % len(_COLOURS)]
        self._names.append(name)
        label = f"{name:<{width}} |"
        if self.colour:
            label = f"\x1b[{colour}m{label}\x1b[0m"
        return PrefixedSerial(self, (label + " ").encode(), log_path, name)

    def emit(self, data: bytes, name: str) -> None:
        """Write whole lines to the terminal, atomically with respect to other partitions;
        a failing terminal is reported once, naming the partition that met it."""
        with self._lock:
            self._guard.write(data, name)

    def _write_flush(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()


class PrefixedSerial:
    """A partition's serial line on a ConsoleMux, teed to its log file (if any)."""

    def __init__(self, mux: ConsoleMux, prefix: bytes, log_path: str | None, name: str) -> None:
        self._mux = mux
        self._name = name
        self._prefix = prefix
        self._pending = bytearray()
        self._lock = threading.Lock()  # several vCPUs of one guest may print at once
        self._log: BinaryIO | None = None
        self._log_out: GuardedOutput | None = None
        self.log_path = log_path
        if log_path is not None:
            # Truncated per run; unbuffered so the log is current while guests run. A
            # FIFO or a device planted under the log's name is refused (inputs.py).
            label = inputs.Named(f"{name}: log file {show(log_path)}")
            fd = inputs.open_output(log_path, label, truncate=True)
            self._log = open(fd, "wb", buffering=0)
            self._log_out = GuardedOutput(self._log.write, f"log {log_path}", name, mux.report)

    def write(self, data: bytes) -> None:
        """Log the bytes; pass every completed line to the terminal with the prefix."""
        with self._lock:
            if self._log_out is not None:
                self._log_out.write(data)
            pending = self._pending
            pending += data
            if b"\n" not in data and len(pending) < _MAX_PENDING_LINE:
                return
            lines = bytearray()
            while True:
                nl = pending.find(b"\n")
                if nl < 0:
                    if len(pending) >= _MAX_PENDING_LINE:
                        lines += self._prefix + pending + b"\n"
                        pending.clear()
                    break
                lines += self._prefix + pending[:nl].rstrip(b"\r") + b"\n"
                del pending[: nl + 1]
        self._mux.emit(bytes(lines), self._name)

    def break_line(self) -> None:
        """End a partial line now (before a restart, so the new boot starts a fresh line)."""
        with self._lock:
            if not self._pending:
                return
            line = self._prefix + bytes(self._pending) + b"\n"
            self._pending.clear()
        self._mux.emit(line, self._name)

    def start_input(self, feed: Feed) -> None:
        """No input: a shared terminal cannot say which guest a keystroke is for."""

    def close(self) -> None:
        """Flush a partial last line and close the log. Idempotent."""
        self.break_line()
        if self._log is not None:
            self._log.close()
            self._log = None


class SerialWatch:
    """One reader of a SerialTap: every byte written since it started, taken in chunks.

    Filled on the writer's (vCPU) thread and never blocks it: past WATCH_LIMIT unread
    bytes, output is dropped for this reader and counted in ``dropped``.
    """

    def __init__(self, tap: SerialTap) -> None:
        self._tap = tap
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, data: bytes) -> None:
        """New output (the tap calls this, under its lock)."""
        with self._cond:
            if len(self._buffer) + len(data) > WATCH_LIMIT:
                self.dropped += len(data)
                return
            self._buffer += data
            self._cond.notify()

    def take(self, timeout: float | None = None) -> bytes | None:
        """What arrived since the last take, waiting up to timeout for something: b""
        when nothing came in time, None once the tap has closed and all was taken."""
        with self._cond:
            if not self._buffer and not self._closed:
                self._cond.wait(timeout)
            if self._buffer:
                data = bytes(self._buffer)
                self._buffer.clear()
                return data
            return None if self._closed else b""

    def end(self) -> None:
        """No more output will come (the tap closed): take() returns None once drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop watching. Idempotent."""
        self._tap.unwatch(self)
        self.end()


class SerialTap:
    """A serial backend in front of another one that also feeds readers (SerialWatch).

    The daemon (api/) owns one per partition, for the partition's whole life, so a
    reader keeps its stream across restarts. ``written`` counts the bytes (a metric).
    """

    def __init__(self, inner: SerialBackend, keep: int = TAP_KEEP) -> None:
        self.inner = inner
        self._keep = keep
        self._recent = bytearray()
        self._watchers: list[SerialWatch] = []
        self._lock = threading.Lock()
        self._closed = False
        self.written = 0

    def write(self, data: bytes) -> None:
        """Keep and hand out the bytes, then write them to the partition's own backend."""
        with self._lock:
            self.written += len(data)
            recent = self._recent
            recent += data
            if len(recent) > 2 * self._keep:  # trimmed now and then, not on every byte
                del recent[: -self._keep]
            for w in self._watchers:
                w.put(data)
        self.inner.write(data)

    def recent(self) -> bytes:
        """The newest output kept (up to ``keep`` bytes)."""
        with self._lock:
            return bytes(self._recent[-self._keep :])

    def watch(self) -> tuple[bytes, SerialWatch]:
        """The newest output kept and a reader of everything after it (no byte lost or
        repeated between the two). A closed tap gives a reader that is already at its end."""
        w = SerialWatch(self)
        with self._lock:
            backlog = bytes(self._recent[-self._keep :])
            if self._closed:
                w.end()
            else:
                self._watchers.append(w)
        return backlog, w

    def unwatch(self, w: SerialWatch) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._watchers.remove(w)

    def start_input(self, feed: Feed) -> None:
        """Input is the partition's own backend's business."""
        self.inner.start_input(feed)

    def break_line(self) -> None:
        """End a partial line on a shared terminal (before a restart), if the backend is one."""
        inner = self.inner
        if isinstance(inner, PrefixedSerial):
            inner.break_line()

    def close(self) -> None:
        """Close the backend; every reader gets what is left, then its end. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watchers, self._watchers = self._watchers, []
        for w in watchers:
            w.end()
        self.inner.close()


def _stdout_binary() -> BinaryIO:
    """This process's stdout as a binary stream."""
    buffer = getattr(sys.stdout, "buffer", None)
    return buffer if buffer is not None else open(1, "wb", buffering=0, closefd=False)


def open_serial(spec: SerialSpec, name: str, report: Report = report_to_stderr) -> SerialBackend:
    """Open the backend a ``serial`` setting names; ``name`` labels threads and errors,
    ``report`` receives the one line about an output target that failed (outputs.py)."""
    if spec.kind is SerialKind.STDOUT:
        return StdoutSerial(name, report=report)
    if spec.kind is SerialKind.NULL:
        return NullSerial()
    assert spec.path is not None  # SerialSpec guarantees a path for file: and unix:
    if spec.kind is SerialKind.FILE:
        return FileSerial(str(spec.path), name, report)
    return UnixSocketSerial(str(spec.path), name)
