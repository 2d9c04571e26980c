"""Serial backends against real files, real Unix sockets and a real pty."""

from __future__ import annotations

import os
import queue
import socket
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corevisor.config.parse import parse_serial
from corevisor.console import (
    UNIX_BACKLOG_LIMIT,
    FileSerial,
    NullSerial,
    StdoutSerial,
    UnixSocketSerial,
    open_serial,
)
from corevisor.errors import ConfigError
from corevisor.spec import SerialKind, SerialSpec


class Inbox:
    """Collects what a backend feeds to the guest, across threads."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()

    def __call__(self, data: bytes) -> None:
        self.q.put(data)

    def take(self, n: int, timeout: float = 5.0) -> bytes:
        got = b""
        deadline = time.monotonic() + timeout
        while len(got) < n:
            got += self.q.get(timeout=max(deadline - time.monotonic(), 0.01))
        return got


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(5)
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "server closed early"
        got += chunk
    return got


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    # tmp_path can be longer than sun_path allows; a short directory is safer.
    short = Path("/tmp") / f"cv-{os.getpid()}-{tmp_path.name[-12:]}"
    short.mkdir()
    yield str(short / "s")
    for p in short.iterdir():
        p.unlink()
    short.rmdir()


def connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    return c


# ------------------------------------------------------------------ file


def test_file_appends_and_is_readable_at_once(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(b"old\n")
    backend = open_serial(SerialSpec.file(path), "demo")
    assert isinstance(backend, FileSerial)
    backend.start_input(Inbox())  # no input from a file: harmless
    for ch in b"hi\n":
        backend.write(bytes([ch]))
        assert path.read_bytes().endswith(bytes([ch]))  # no buffering
    backend.close()
    assert path.read_bytes() == b"old\nhi\n"


def test_file_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'^demo: serial "file:.*/no/such/x": cannot open: '):
        open_serial(SerialSpec.file(tmp_path / "no/such/x"), "demo")


# ------------------------------------------------------------------ unix socket


def test_unix_output_and_input(sock_path: str) -> None:
    backend = open_serial(SerialSpec.unix(Path(sock_path)), "demo")
    assert isinstance(backend, UnixSocketSerial)
    inbox = Inbox()
    backend.start_input(inbox)
    client = connect(sock_path)
    try:
        wait_for(lambda: backend.connected)
        backend.write(b"login: ")
        assert recv_exactly(client, 7) == b"login: "
        client.sendall(b"root\n")
        assert inbox.take(5) == b"root\n"
    finally:
        client.close()
        backend.close()
    assert not os.path.exists(sock_path)


def test_unix_output_before_connect_is_kept(sock_path: str) -> None:
    backend = UnixSocketSerial(sock_path, "demo")
    backend.start_input(Inbox())  # its accept thread starts here, as in Machine.start
    try:
        backend.write(b"x" * 10)
        backend.write(b"boot log\n")
        client = connect(sock_path)
        assert recv_exactly(client, 19) == b"x" * 10 + b"boot log\n"
        wait_for(lambda: backend.connected)
        backend.write(b"more")
        assert recv_exactly(client, 4) == b"more"
        client.close()
    finally:
        backend.close()


def test_unix_backlog_keeps_newest(sock_path: str) -> None:
    backend = UnixSocketSerial(sock_path, "demo")
    backend.start_input(Inbox())  # its accept thread starts here, as in Machine.start
    try:
        backend.write(b"a" * UNIX_BACKLOG_LIMIT)
        backend.write(b"tail")
        client = connect(sock_path)
        got = recv_exactly(client, UNIX_BACKLOG_LIMIT)
        assert got.endswith(b"tail") and len(got) == UNIX_BACKLOG_LIMIT
        client.close()
    finally:
        backend.close()


def test_unix_client_disconnect_and_new_client(sock_path: str) -> None:
    backend = UnixSocketSerial(sock_path, "demo")
    inbox = Inbox()
    backend.start_input(inbox)
    try:
        first = connect(sock_path)
        wait_for(lambda: backend.connected)
        first.close()
        wait_for(lambda: not backend.connected)
        backend.write(b"while nobody listens ")
        second = connect(sock_path)
        assert recv_exactly(second, 21) == b"while nobody listens "
        second.sendall(b"k")
        assert inbox.take(1) == b"k"
        # A third client replaces the second.
        third = connect(sock_path)
        second.settimeout(5)
        assert second.recv(16) == b""
        wait_for(lambda: backend.connected)
        backend.write(b"3")
        assert recv_exactly(third, 1) == b"3"
        second.close()
        third.close()
    finally:
        backend.close()


def test_unix_client_that_does_not_read_does_not_stall_writes(sock_path: str) -> None:
    backend = UnixSocketSerial(sock_path, "demo")
    backend.start_input(Inbox())  # its accept thread starts here, as in Machine.start
    client = connect(sock_path)
    try:
        wait_for(lambda: backend.connected)
        start = time.monotonic()
        for _ in range(2000):
            backend.write(b"y" * 1024)  # ~2 MB: far beyond the socket buffer
        assert time.monotonic() - start < 5
    finally:
        client.close()
        backend.close()


def test_unix_stale_socket_is_replaced(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens
    backend = UnixSocketSerial(sock_path, "demo")
    client = connect(sock_path)
    client.close()
    backend.close()


def test_unix_live_socket_is_an_error(sock_path: str) -> None:
    backend = UnixSocketSerial(sock_path, "demo")
    try:
        with pytest.raises(ConfigError, match="another process is listening"):
            UnixSocketSerial(sock_path, "other")
    finally:
        backend.close()


def test_unix_path_is_a_regular_file(sock_path: str) -> None:
    Path(sock_path).write_text("hello")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        UnixSocketSerial(sock_path, "demo")


def test_close_twice_is_fine(sock_path: str) -> None:
    backend = UnixSocketSerial(sock_path, "demo")
    backend.close()
    backend.close()


# ------------------------------------------------------------------ stdout and null


def test_stdout_writes_through(capfd: pytest.CaptureFixture[str]) -> None:
    backend = StdoutSerial("demo")
    backend.write(b"guest says hi\n")
    backend.start_input(Inbox())  # stdin is not a terminal under pytest: no thread
    backend.close()
    assert capfd.readouterr().out == "guest says hi\n"


def test_stdout_reads_a_terminal_without_echo() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        backend = StdoutSerial("demo", stdin_fd=slave)
        inbox = Inbox()
        backend.start_input(inbox)
        during = termios.tcgetattr(slave)
        assert not during[3] & (termios.ICANON | termios.ECHO)
        assert during[3] & termios.ISIG  # Ctrl-C still stops corevisor
        os.write(master, b"ab")  # no newline: delivered at once without ICANON
        assert inbox.take(2) == b"ab"
        backend.close()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_null() -> None:
    backend = open_serial(SerialSpec.null(), "demo")
    assert isinstance(backend, NullSerial)
    backend.write(b"gone")
    backend.start_input(Inbox())
    backend.close()


@pytest.mark.parametrize("spec", ["tty", "file:", "unix:", "stdout:x", ""])
def test_bad_spec_is_refused_where_it_is_parsed(spec: str) -> None:
    """open_serial only ever sees a SerialSpec: a bad setting stops at the parser."""
    with pytest.raises(ConfigError, match="^--serial: "):
        parse_serial(spec, "--serial", None)


def test_serial_spec_has_a_path_exactly_for_file_and_unix() -> None:
    with pytest.raises(ValueError):
        SerialSpec(SerialKind.FILE)
    with pytest.raises(ValueError):
        SerialSpec(SerialKind.STDOUT, Path("x"))
    assert str(SerialSpec.file(Path("/l/x.log"))) == "file:/l/x.log"
