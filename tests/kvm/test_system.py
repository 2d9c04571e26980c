"""Partitioned systems on real KVM: the bundled RTOS and peer guests through the real CLI.

Each test writes a system file, runs `corevisor run FILE` and judges the prefixed
console lines, the monitor's events on stderr, the log files and the exit status.
"""

from __future__ import annotations

from pathlib import Path

from tests.kvm.conftest import corevisor


def system(tmp_path: Path, guests: dict[str, Path], rtos: str, peer: str, tail: str = "") -> Path:
    """rtos on core 0 and peer on core 1, with extra keys; logs in tmp_path/logs."""
    text = f"""
[system]
log_dir = "{tmp_path / "logs"}"

[partitions.rtos]
image = "{guests["rtos"]}"
memory = "32M"
pin = [0]
{rtos}

[partitions.peer]
image = "{guests["peer"]}"
memory = "16M"
pin = [1]
{peer}
{tail}
"""
    path = tmp_path / "system.toml"
    path.write_text(text)
    return path


def events(stderr: str, name: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith(f"corevisor: {name}: ")]


def test_crashing_partition_is_restarted_while_the_other_keeps_printing(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    toml = system(
        tmp_path,
        guests,
        'cmdline = "crash=1"\nrestart = "restart"',
        'cmdline = "mode=counter ticks=15 period=100"',
    )
    r = corevisor("run", str(toml), timeout=120)
    out = r.stdout.splitlines()
    # the first boot and 3 restarts, then the crash-loop cap keeps it down
    assert out.count("rtos | rtos: crashing on purpose (triple fault)") == 4
    assert [f"peer | peer: tick {k}" for k in range(1, 16)] == [
        x for x in out if x.startswith("peer | peer: tick")
    ]
    rtos = events(r.stderr, "rtos")
    assert [x.split("[", 1)[1] for x in rtos] == [
        "restart = restart: restarting (1/3 in 60 s)]",
        "restart = restart: restarting (2/3 in 60 s)]",
        "restart = restart: restarting (3/3 in 60 s)]",
        "restart = restart: crash loop (3 restarts in 60 s): stays down]",
    ]
    assert all("guest stopped: triple fault" in x for x in rtos)
    assert r.stderr.count("vcpu0: rip=") == 4  # a register dump per crash
    assert events(r.stderr, "peer") == ["corevisor: peer: guest exited with status 0"]
    assert r.returncode == 1  # the first non-zero status: rtos, stopped abnormally
    log = (tmp_path / "logs" / "rtos.log").read_text()
    assert log.count("rtos: crashing on purpose") == 4


def test_demo_exchange_with_a_restartable_rtos(tmp_path: Path, guests: dict[str, Path]) -> None:
    toml = system(
        tmp_path,
        guests,
        'cmdline = "msgs=3"\nrestart = "restart"\nwatchdog_ms = 2000',
        'cmdline = "mode=pong msgs=3"',
        '[channels.link]\nbetween = ["rtos", "peer"]\n',
    )
    r = corevisor("run", str(toml), timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'rtos | rtos: received "pong 3"' in r.stdout.splitlines()
    assert 'rtos: received "pong 3"' in (tmp_path / "logs" / "rtos.log").read_text()


def test_doorbells_relayed_by_a_python_thread_still_deliver(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """doorbell = "thread": the benchmark's baseline path must work like the kernel one.

    A doorbell is an edge, like any interrupt: rings the relay copies while the last one
    is still pending arrive as one, and the RTOS also polls its ring on every tick (the
    fallback for a lost doorbell), so on a loaded host some messages are seen before
    their interrupt. What must hold is that interrupts arrive at all: ten messages at
    20 Hz ticks leave the relay ~50 ms to win each race, and it must win some.
    """
    toml = system(
        tmp_path,
        guests,
        'cmdline = "msgs=10 hz=20 wdms=2000 wdkick=4"',
        'cmdline = "mode=pong msgs=10"',
        '[channels.link]\nbetween = ["rtos", "peer"]\ndoorbell = "thread"\n',
    )
    r = corevisor("run", str(toml), timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert 'peer | peer: received "ping 10"' in out
    assert 'rtos | rtos: received "pong 10"' in out
    counts = [int(x.split()[5]) for x in out if x.startswith("rtos | rtos: channel 0: ")
              and x.endswith(" doorbell interrupts")]
    assert len(counts) == 1 and 1 <= counts[0] <= 10, out


def test_watchdog_expiry_applies_the_policy(tmp_path: Path, guests: dict[str, Path]) -> None:
    toml = system(
        tmp_path,
        guests,
        'cmdline = "wdfail=1"\nrestart = "stop"',
        'cmdline = "mode=counter ticks=10 period=100"',
    )
    r = corevisor("run", str(toml), timeout=120)
    rtos = events(r.stderr, "rtos")
    assert len(rtos) == 1, r.stderr
    assert "guest stopped: watchdog expired (not kicked within " in rtos[0]
    assert rtos[0].endswith("[restart = stop: stays down; the other partitions continue]")
    assert "vcpu0: rip=" in r.stderr
    assert "peer | peer: tick 10" in r.stdout.splitlines()
    assert events(r.stderr, "peer") == ["corevisor: peer: guest exited with status 0"]
    assert r.returncode == 1


def test_halt_system_stops_every_partition(tmp_path: Path, guests: dict[str, Path]) -> None:
    toml = system(
        tmp_path,
        guests,
        'cmdline = "crash=1"\nrestart = "halt-system"',
        'cmdline = "mode=counter ticks=600 period=100"',
    )
    r = corevisor("run", str(toml), timeout=120)
    assert "[restart = halt-system: halting the system]" in r.stderr
    assert events(r.stderr, "peer") == [
        "corevisor: peer: stopped: system halted: partition rtos stopped abnormally"
    ]
    assert "peer | peer: tick 600" not in r.stdout
    assert r.returncode == 1


def test_exit_status_is_the_first_non_zero(tmp_path: Path, guests: dict[str, Path]) -> None:
    # the "rtos" slot runs hello, which exits 3 at once; the peer runs on to its last
    # tick and exits 0: the system's status is the first non-zero one
    path = system(
        tmp_path,
        {**guests, "rtos": guests["hello"]},
        'cmdline = "exit=3"',
        'cmdline = "mode=counter ticks=5 period=100"',
    )
    r = corevisor("run", str(path), timeout=120)
    assert events(r.stderr, "rtos") == ["corevisor: rtos: guest exited with status 3"]
    assert "peer | peer: tick 5" in r.stdout.splitlines()
    assert events(r.stderr, "peer") == ["corevisor: peer: guest exited with status 0"]
    assert r.returncode == 3


def test_single_partition_file_keeps_plain_output(tmp_path: Path, guests: dict[str, Path]) -> None:
    toml = tmp_path / "one.toml"
    toml.write_text(f'[partitions.hello]\nimage = "{guests["hello"]}"\ncmdline = "exit=4"\n')
    r = corevisor("run", str(toml), timeout=60)
    assert "hello: exit 4" in r.stdout.splitlines()  # no "name | " prefix
    assert r.returncode == 4
