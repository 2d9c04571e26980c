"""`corevisor top` on the running demo, as a user sees it in a terminal (tmux).

A shell in a detached tmux session runs `corevisor top`; capture-pane reads the screen.
Judged: the title, one row per partition with its state, host cores and rates, a pause
showing up, and Ctrl-C ending it with status 130 and the shell's screen back.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kvm.apihelp import ctl, demo_file, spawn_serve, until, wait_serving


class Tmux:
    """A private tmux server (its own socket) with one 150x30 session running bash."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock")]
        self.run("new-session", "-d", "-s", "t", "-x", "150", "-y", "30",
                 "bash --norc --noprofile")

    def run(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True,
                              check=True, timeout=60).stdout

    def type(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.close()


def _row(screen: str, name: str) -> list[str]:
    for line in screen.splitlines():
        if line.split()[:1] == [name]:
            return line.split()
    return []


def test_top_shows_the_running_demo(tmp_path: Path, tmux: Tmux, guests: dict[str, Path]) -> None:
    serve = spawn_serve(tmp_path, str(demo_file(tmp_path)))
    try:
        wait_serving(tmp_path, serve)
        sock = tmp_path / "api.sock"
        command = (f"cd {shlex.quote(os.getcwd())}; {shlex.quote(sys.executable)} -m "
                   f"corevisor.cli top --socket {shlex.quote(str(sock))} --interval 0.5; "
                   "echo top-ended-with=$?")
        tmux.type(command, "Enter")
        until(lambda: any(c.endswith("%") for c in _row(tmux.screen(), "rtos")),
              "top shows rates for the rtos", 1500)
        screen = tmux.screen()
        assert "corevisor top - " in screen and "2 partitions" in screen
        header = _row(screen, "NAME")
        assert header == ["NAME", "STATE", "CORES", "vCPU", "EXITS/s", "BY", "REASON",
                          "SERIAL/s", "VIRTIO/s", "RESTARTS"]
        rtos, peer = _row(screen, "rtos"), _row(screen, "peer")
        assert rtos[1:3] == ["running", "0"] and peer[1:3] == ["running", "1"]
        assert rtos[3:6] == ["(on", "0)", rtos[5]]  # the pinned vCPU ran on its core
        assert rtos[5].endswith("%") and float(rtos[5][:-1]) > 0  # vCPU use
        assert float(rtos[6].rstrip("kM")) > 0  # exits per second
        assert rtos[-1] == "0"  # restarts

        assert ctl(tmp_path, "pause", "rtos").returncode == 0
        until(lambda: _row(tmux.screen(), "rtos")[1:2] == ["paused"], "top shows the pause",
              1500)
        assert ctl(tmp_path, "resume", "rtos").returncode == 0
        until(lambda: _row(tmux.screen(), "rtos")[1:2] == ["running"], "and the resume", 1500)

        tmux.type("C-c")
        until(lambda: "top-ended-with=130" in tmux.screen(), "Ctrl-C ends top", 1500)
        assert "corevisor top - " not in tmux.screen()  # the alternate screen is gone
    finally:
        serve.terminate()
        serve.wait(120)
