"""SIGTERM, SIGHUP and SIGINT stop a run as cleanly as Ctrl-C: a real child process.

Each run is `corevisor run` in a child with a guest that would count forever; once it
prints, the test sends the signal and judges the exit status (128 + the signal), the
one-line reason per partition on stderr, the unix: socket file (removed) and, on a
pty, the terminal settings (given back). Regression tests for issue 8 / issue 9 class
9: SIGTERM and SIGHUP had no handler, so the terminal stayed raw and sockets stayed.
"""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

FOREVER = "mode=counter ticks=1000000 period=10"
WHY = {
    signal.SIGTERM: "received SIGTERM",
    signal.SIGHUP: "received SIGHUP",
    signal.SIGINT: "interrupted by the user",
}


def _spawn(*args: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "corevisor.cli", "run", *args], stderr=subprocess.PIPE, **kw
    )


def _read_until(read: socket.socket | int, marker: bytes) -> bytes:
    """Read a socket or fd until marker shows up (or EOF)."""
    got = b""
    while marker not in got:
        chunk = read.recv(4096) if isinstance(read, socket.socket) else os.read(read, 4096)
        if not chunk:
            raise AssertionError(f"EOF before {marker!r}; got {got!r}")
        got += chunk
    return got


def _connect(path: Path, proc: subprocess.Popen[bytes]) -> socket.socket:
    """Connect to corevisor's unix: serial socket once it exists."""
    pause = threading.Event()
    for _ in range(3000):
        if proc.poll() is not None:
            raise AssertionError(f"corevisor ended early: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        try:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(path))
            client.settimeout(120)
            return client
        except OSError:
            client.close()
            pause.wait(0.02)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_stops_the_guest_and_removes_the_socket(
    sig: signal.Signals, tmp_path: Path, guests: dict[str, Path]
) -> None:
    sock = tmp_path / "serial.sock"
    proc = _spawn(
        str(guests["peer"]), "--cmdline", FOREVER, "--serial", f"unix:{sock}",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    client = _connect(sock, proc)
    _read_until(client, b"peer: tick 2\n")  # the guest runs
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    client.close()
    assert err.decode().splitlines() == [f"corevisor: peer: stopped: {WHY[sig]}"]
    assert proc.returncode == 128 + sig
    assert not sock.exists()


def test_sigterm_gives_the_terminal_its_settings_back(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    master, slave = pty.openpty()
    try:
        cooked = termios.tcgetattr(slave)
        assert cooked[3] & termios.ICANON and cooked[3] & termios.ECHO
        proc = _spawn(str(guests["peer"]), "--cmdline", FOREVER, stdin=slave, stdout=slave)
        _read_until(master, b"peer: tick 2")
        raw = termios.tcgetattr(slave)  # serial on a terminal: no echo, no line editing
        assert not raw[3] & (termios.ICANON | termios.ECHO)
        drain = threading.Thread(target=_drain, args=(master,), daemon=True)
        drain.start()  # the child must never block on a full pty
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert err.decode().splitlines() == ["corevisor: peer: stopped: received SIGTERM"]
        assert proc.returncode == 143
        assert termios.tcgetattr(slave) == cooked
    finally:
        os.close(slave)
        os.close(master)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def test_sigterm_stops_every_partition_of_a_system(tmp_path: Path, guests: dict[str, Path]) -> None:
    sock = tmp_path / "b.sock"
    toml = tmp_path / "system.toml"
    toml.write_text(
        f'[system]\nlog_dir = "{tmp_path / "logs"}"\n'
        f'[partitions.a]\nimage = "{guests["peer"]}"\nmemory = "16M"\ncmdline = "{FOREVER}"\n'
        f'[partitions.b]\nimage = "{guests["peer"]}"\nmemory = "16M"\ncmdline = "{FOREVER}"\n'
        f'serial = "unix:{sock}"\n'
    )
    proc = _spawn(str(toml), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    client = _connect(sock, proc)
    _read_until(client, b"peer: tick 2\n")
    log_a = tmp_path / "logs" / "a.log"
    for _ in range(600):  # both partitions run on their own; wait for a to tick too
        if log_a.exists() and "peer: tick 1\n" in log_a.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    client.close()
    lines = err.decode().splitlines()
    assert lines[0].startswith("corevisor: system: 2 partitions; serial logs in ")
    assert lines[1:] == [
        "corevisor: a: stopped: received SIGTERM",
        "corevisor: b: stopped: received SIGTERM",
    ]
    assert proc.returncode == 143
    assert not sock.exists()
    assert "peer: tick 1\n" in (tmp_path / "logs" / "a.log").read_text()
