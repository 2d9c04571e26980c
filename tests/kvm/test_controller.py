"""System as a controller on real KVM: one partition driven by name while the others run.

Two bundled `peer` guests print "peer: tick K" to serial files; the tests pause, resume,
stop, restart, remove and add partitions from other threads while a monitor thread
watches, and judge what the guests printed and the events a subscriber received.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corevisor.errors import NotFoundError, StateError
from corevisor.spec import PartitionSpec, SerialKind, SerialSpec, SystemSpec
from corevisor.system import Event, PartitionState, System


def _ticks(log: Path) -> int:
    text = log.read_text() if log.exists() else ""
    return text.count("peer: tick ")


def _until(what: Callable[[], bool], message: str) -> None:
    """Wait for a condition the guests make true (bounded by tries, asserted after)."""
    pause = threading.Event()
    for _ in range(6000):
        if what():
            return
        pause.wait(0.01)
    raise AssertionError(message)


def _peer(tmp_path: Path, guests: dict[str, Path], name: str, cmdline: str,
          **kw: object) -> PartitionSpec:
    return PartitionSpec(  # type: ignore[arg-type]
        name=name, image=guests["peer"], memory=16 << 20, cmdline=cmdline,
        serial=SerialSpec(SerialKind.FILE, tmp_path / (name + ".log")), **kw,
    )


@pytest.fixture
def running(tmp_path: Path, guests: dict[str, Path]) -> Iterator[tuple[System, list[Event]]]:
    """Partitions a and b counting forever (10 ms ticks), monitored by a thread."""
    forever = "mode=counter ticks=100000 period=10"
    config = SystemSpec(partitions=(
        _peer(tmp_path, guests, "a", forever), _peer(tmp_path, guests, "b", forever),
    ))
    system = System(config, echo=False, shared_console=False)
    events: list[Event] = []
    system.subscribe(events.append)
    system.open()
    system.start_monitor()
    try:
        yield system, events
    finally:
        system.close()


def test_pause_resume_one_partition_while_the_other_runs(
    running: tuple[System, list[Event]], tmp_path: Path
) -> None:
    system, events = running
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    system.start("a")
    system.start("b")
    _until(lambda: _ticks(a) >= 3 and _ticks(b) >= 3, "both partitions tick")
    worker = threading.Thread(target=system.pause, args=("a",))  # from another thread
    worker.start()
    worker.join()
    assert system.partition("a").state is PartitionState.PAUSED
    frozen = _ticks(a)
    b_then = _ticks(b)
    _until(lambda: _ticks(b) >= b_then + 20, "b keeps ticking while a is paused")
    assert _ticks(a) == frozen
    system.resume("a")
    _until(lambda: _ticks(a) >= frozen + 3, "a ticks again after resume")
    states = [(e.partition, e.message) for e in events if e.kind == "state"]
    assert states == [
        ("a", "-> created"), ("b", "-> created"),
        ("a", "created -> running"), ("b", "created -> running"),
        ("a", "running -> paused"), ("a", "paused -> running"),
    ]


def test_transitions_are_checked_per_partition(
    running: tuple[System, list[Event]], tmp_path: Path, guests: dict[str, Path]
) -> None:
    system, events = running
    with pytest.raises(StateError, match=r"^cannot pause partition a: it is created$"):
        system.pause("a")
    with pytest.raises(NotFoundError, match=r"^no partition named nope$"):
        system.start("nope")
    system.start("a")
    with pytest.raises(StateError, match=r"^cannot start partition a: it is running$"):
        system.start("a")
    with pytest.raises(StateError, match=r"^cannot remove partition a: it is running$"):
        system.remove("a")
    with pytest.raises(StateError, match=r"^cannot add partition a: a partition of that name"):
        system.add(_peer(tmp_path, guests, "a", "mode=counter"))
    system.stop("a")
    info = system.partition("a")
    assert (info.state, info.status, info.last) == (
        PartitionState.STOPPED, 1, "stopped: stopped by the host"
    )
    with pytest.raises(StateError, match=r"^cannot pause partition a: it is stopped$"):
        system.pause("a")
    assert system.machine("a") is None  # a stopped partition holds no VM
    assert [e.kind for e in events if e.partition == "a"][-2:] == ["state", "stopped"]


def test_restart_remove_and_add_at_run_time(
    running: tuple[System, list[Event]], tmp_path: Path, guests: dict[str, Path]
) -> None:
    system, events = running
    a, b, c = (tmp_path / f"{n}.log" for n in "abc")
    system.start("a")
    system.start("b")
    _until(lambda: _ticks(a) >= 3, "a ticks")
    system.restart("a")  # a fresh machine: the guest boots again
    _until(lambda: a.read_text().count("peer: tick 1\n") == 2, "a booted twice")
    assert system.partition("a").restarts == 1
    system.stop("a")
    system.remove("a")
    assert [p.name for p in system.partitions()] == ["b"]
    system.add(_peer(tmp_path, guests, "c", "mode=counter ticks=3 period=10"))
    system.start("c")
    _until(lambda: system.partition("c").state is PartitionState.STOPPED, "c ends by itself")
    assert system.partition("c").status == 0
    assert _ticks(c) == 3
    b_then = _ticks(b)
    _until(lambda: _ticks(b) > b_then, "b ran throughout")
    kinds = [(e.partition, e.kind) for e in events if e.kind != "state"]
    assert kinds == [("a", "restart"), ("a", "stopped"), ("a", "removed"), ("c", "exit")]
    exit_event = [e for e in events if e.kind == "exit"][0]
    assert (exit_event.message, exit_event.status) == ("guest exited with status 0", 0)


def test_a_paused_partition_misses_no_watchdog_kick(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """The watchdog does not run while paused; resume re-arms a full period."""
    rtos = PartitionSpec(
        name="rtos", image=guests["rtos"], memory=32 << 20, cmdline="msgs=50 wdms=1500",
        serial=SerialSpec(SerialKind.FILE, tmp_path / "rtos.log"), watchdog_ms=300,
    )
    with System(SystemSpec(partitions=(rtos,)), echo=False) as system:
        events: list[Event] = []
        system.subscribe(events.append)
        system.open()
        system.start_monitor()
        system.start("rtos")
        _until(lambda: "watchdog armed" in (tmp_path / "rtos.log").read_text(), "rtos boots")
        system.pause("rtos")
        # Over two of the guest's 1.5 s watchdog periods without a kick (a period that long
        # keeps a loaded host from expiring it after the resume).
        threading.Event().wait(3.5)
        system.resume("rtos")
        _until(lambda: system.partition("rtos").state is PartitionState.STOPPED, "rtos ends")
    assert system.partition("rtos").status == 0, [e.message for e in events]
    assert not [e for e in events if e.kind == "watchdog"]


def test_operations_on_different_partitions_from_many_threads(
    running: tuple[System, list[Event]], tmp_path: Path
) -> None:
    system, _ = running
    system.start("a")
    system.start("b")
    errors: list[BaseException] = []

    def flip(name: str) -> None:
        try:
            for _ in range(10):
                system.pause(name)
                system.resume(name)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    workers = [threading.Thread(target=flip, args=(n,)) for n in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    then = _ticks(a), _ticks(b)
    _until(lambda: _ticks(a) > then[0] and _ticks(b) > then[1], "both run after the storm")
    assert {p.name: p.state for p in system.partitions()} == {
        "a": PartitionState.RUNNING, "b": PartitionState.RUNNING,
    }
