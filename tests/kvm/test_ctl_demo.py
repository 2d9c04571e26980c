"""The issue's "done" scenario through the real CLI: `corevisor serve` runs the demo, and
`corevisor ctl` pauses, resumes, extends it with a third partition and shrinks it again
while the RTOS keeps pinging its peer. Every step is a child process, judged by its
output and exit status as a user would see them; the RTOS's progress is read through
`ctl logs`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.kvm.apihelp import ctl, demo_file, spawn_serve, system_file, until, wait_serving

_PING = re.compile(r'rtos: sent "ping (\d+)"')


def _last_ping(tmp_path: Path) -> int:
    r = ctl(tmp_path, "logs", "rtos")
    assert r.returncode == 0, r.stderr
    found = _PING.findall(r.stdout)
    return int(found[-1]) if found else 0


def _keeps_pinging(tmp_path: Path, what: str) -> None:
    then = _last_ping(tmp_path)
    until(lambda: _last_ping(tmp_path) >= then + 3, f"the RTOS keeps pinging {what}", 600)


def _ok(tmp_path: Path, *args: str) -> str:
    r = ctl(tmp_path, *args)
    assert (r.returncode, r.stderr) == (0, ""), (args, r)
    return r.stdout


def test_the_demo_driven_through_ctl_while_the_rtos_keeps_pinging(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    serve = spawn_serve(tmp_path, str(demo_file(tmp_path)))
    try:
        wait_serving(tmp_path, serve)
        rows = _ok(tmp_path, "ps").splitlines()
        assert rows[0].split() == ["NAME", "STATE", "STATUS", "RESTARTS", "CPUS", "MEMORY",
                                   "CORES", "LAST"]
        assert [r.split()[:2] for r in rows[1:]] == [["rtos", "running"], ["peer", "running"]]
        until(lambda: _last_ping(tmp_path) >= 3, "the RTOS pings", 600)

        assert _ok(tmp_path, "pause", "rtos") == "rtos: paused\n"
        frozen = _last_ping(tmp_path)
        assert "rtos  paused" in _ok(tmp_path, "ps")
        assert _last_ping(tmp_path) == frozen
        assert _ok(tmp_path, "resume", "rtos") == "rtos: running\n"
        _keeps_pinging(tmp_path, "after its resume")
        assert _ok(tmp_path, "pause", "peer") == "peer: paused\n"
        assert _ok(tmp_path, "resume", "peer") == "peer: running\n"
        _keeps_pinging(tmp_path, "after its peer's pause")

        third = system_file(tmp_path, "third", (
            '[partitions.third]\nimage = "../guests/build/peer.elf"\nmemory = "16M"\n'
            'cmdline = "mode=counter ticks=1000000 period=20"\nserial = "null"\n'
        ).replace("..", str(guests["peer"].parents[2])))
        assert _ok(tmp_path, "add", str(third), "--start") == "third: running\n"
        until(lambda: "peer: tick 3\n" in _ok(tmp_path, "logs", "third"), "third ticks", 600)
        listed = json.loads(_ok(tmp_path, "ps", "--json"))
        assert [(p["name"], p["state"]) for p in listed] == [
            ("rtos", "running"), ("peer", "running"), ("third", "running")]
        _keeps_pinging(tmp_path, "next to the third partition")

        assert _ok(tmp_path, "stop", "third") == "third: stopped\n"
        assert _ok(tmp_path, "rm", "third") == "third: removed\n"
        assert [r.split()[0] for r in _ok(tmp_path, "ps").splitlines()[1:]] == ["rtos", "peer"]
        _keeps_pinging(tmp_path, "after the third partition is gone")

        r = ctl(tmp_path, "pause", "third")
        assert (r.returncode, r.stdout, r.stderr) == (
            1, "", "corevisor: no partition named third\n")
        r = ctl(tmp_path, "rm", "rtos")
        assert (r.returncode, r.stderr) == (
            1, "corevisor: cannot remove partition rtos: it is running\n")
        r = ctl(tmp_path, "add", str(tmp_path / "nope.toml"))
        assert r.returncode == 2 and r.stderr.startswith("corevisor: ") and "nope.toml" in r.stderr
        events = _ok(tmp_path, "events")
        assert re.search(r"  third  removed  removed\n", events), events
        assert "corevisor_vcpu_exits_total{" in _ok(tmp_path, "metrics")

        follow = subprocess.Popen(
            [sys.executable, "-m", "corevisor.cli", "ctl", "--socket", str(tmp_path / "api.sock"),
             "logs", "-f", "rtos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert follow.stdout is not None
        seen = b""
        while seen.count(b'sent "ping') < 3:
            chunk = follow.stdout.read1(4096)
            assert chunk, follow.stderr.read() if follow.stderr else b""
            seen += chunk
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(120) == 0
        follow.stdout.read()
        assert follow.wait(60) == 0  # the stream ended with the daemon
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    err = (tmp_path / "serve.err").read_text()
    assert "corevisor: stopping: received SIGTERM\n" in err
    assert "watchdog" not in err and "restart" not in err, err
    assert not (tmp_path / "api.sock").exists()
    r = ctl(tmp_path, "ps")
    assert r.returncode == 1
    assert r.stderr == (f"corevisor: cannot reach the corevisor daemon at {tmp_path / 'api.sock'}: "
                        "No such file or directory (is `corevisor serve` running?)\n")
