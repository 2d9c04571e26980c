"""Helpers for the API tests: a real daemon (in this process or as `corevisor serve`)
and waiting for what guests print, bounded by tries rather than by time."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from corevisor.api.client import Client
from corevisor.api.daemon import Daemon
from corevisor.config.toml import load_config

ROOT = Path(__file__).resolve().parents[2]


def until(what: Callable[[], bool], message: str, tries: int = 6000) -> None:
    """Wait for a condition the guests make true (10 ms between looks), then assert."""
    pause = threading.Event()
    for _ in range(tries):
        if what():
            return
        pause.wait(0.01)
    raise AssertionError(message)


def demo_file(tmp_path: Path, msgs: int = 100000, doorbell: str = "kernel") -> Path:
    """examples/demo.toml with absolute image paths and the RTOS pinging msgs times.

    The guests' own deadlines are relaxed (the RTOS's watchdog period, the peer's wait
    for a message), so other jobs on this 2-core host cannot make them expire.
    """
    text = (ROOT / "examples" / "demo.toml").read_text()
    text = text.replace('"../guests/', f'"{ROOT}/guests/')
    text = text.replace('cmdline = "msgs=5"', f'cmdline = "msgs={msgs} wdms=600000"')
    text = text.replace('cmdline = "mode=pong msgs=5"',
                        f'cmdline = "mode=pong msgs={msgs} timeout=3600"')
    text = text.replace("watchdog_ms = 2000", "watchdog_ms = 600000")
    if doorbell != "kernel":
        text = text.replace('size = "4K"', f'size = "4K"\ndoorbell = "{doorbell}"')
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


def system_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(body)
    return path


@contextmanager
def daemon(tmp_path: Path, system: Path | None = None) -> Iterator[tuple[Daemon, Client]]:
    """A Daemon in this process (its server threads serve a real socket)."""
    sock = str(tmp_path / "api.sock")
    err = open(tmp_path / "daemon.err", "w")  # noqa: SIM115 - closed below
    d = Daemon(sock, load_config(system) if system is not None else None, err=err)
    try:
        d.start()
        yield d, Client(sock, timeout=60)
    finally:
        d.close()
        err.close()


def spawn_serve(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`corevisor serve --socket tmp/api.sock ARGS` as a child, stdout/stderr to files."""
    return subprocess.Popen(
        [sys.executable, "-m", "corevisor.cli", "serve", "--socket",
         str(tmp_path / "api.sock"), *args],
        stdin=subprocess.DEVNULL,
        stdout=open(tmp_path / "serve.out", "wb"),  # noqa: SIM115 - the child owns it
        stderr=open(tmp_path / "serve.err", "wb"),  # noqa: SIM115
        cwd=tmp_path,
    )


def wait_serving(tmp_path: Path, proc: subprocess.Popen[bytes]) -> None:
    err = tmp_path / "serve.err"
    until(lambda: proc.poll() is not None or b"serving on" in err.read_bytes(),
          "corevisor serve starts serving")
    assert proc.poll() is None, err.read_text()


def ctl(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`corevisor ctl --socket tmp/api.sock ARGS`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "corevisor.cli", "ctl", "--socket", str(tmp_path / "api.sock"),
         *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
