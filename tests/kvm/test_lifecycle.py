"""The machine lifecycle on real KVM: checked transitions, acknowledged commands from any
thread, threads only after start(), idempotent close, and halted guests reported.

Regression tests for issue 8's lifecycle bugs (pause from a non-main thread killed the
process; start twice ran two threads on one vCPU; pause before start waited 10 s and
returned; a second close raised EBADF) and issue 9's class 7 (`cli; hlt` waited for
--timeout or forever).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from corevisor.builder import build
from corevisor.errors import StateError
from corevisor.machine import MachineState
from corevisor.spec import PartitionSpec, SerialKind, SerialSpec
from tests.kvm.asm import guest, string
from tests.kvm.conftest import corevisor
from tests.kvm.images import pvh_elf

ROOT = Path(__file__).resolve().parents[2]
# out 0x80, al ; jmp back: a CPL0 loop that exits to the VMM forever
SPIN_ON_PORT_80 = bytes([0xE6, 0x80, 0xEB, 0xFC])
CLI_HLT = bytes([0xFA, 0xF4, 0xEB, 0xFC])  # cli; 1: hlt; jmp 1b
STI_HLT = bytes([0xFB, 0xF4, 0xEB, 0xFC])  # sti; 1: hlt; jmp 1b (nothing ever interrupts)


def _config(tmp_path: Path, code: bytes, **kw: object) -> PartitionSpec:
    img = tmp_path / "t.elf"
    img.write_bytes(pvh_elf(code))
    args: dict[str, object] = {"name": "t", "image": img, "memory": 16 << 20,
                             "serial": SerialSpec(SerialKind.NULL)}
    args.update(kw)
    return PartitionSpec(**args)  # type: ignore[arg-type]


def _wait_writes(post: object, at_least: int) -> None:
    """Wait (bounded by the test's own progress, not a clock) for postcode writes."""
    event = threading.Event()
    for _ in range(3000):
        if post.writes >= at_least:  # type: ignore[attr-defined]
            return
        event.wait(0.01)
    raise AssertionError(f"the guest made only {post.writes} port writes")  # type: ignore[attr-defined]


def test_pause_resume_and_stop_from_a_thread_that_is_not_main(tmp_path: Path) -> None:
    """The vCPU kick needs no handler: start, pause, resume and stop all happen in a
    worker thread of a fresh process (before, SIGUSR1 killed it)."""
    cfg = _config(tmp_path, SPIN_ON_PORT_80)
    script = textwrap.dedent(
        f"""
        import sys, threading, time
        from pathlib import Path
        from corevisor.builder import build
        from corevisor.spec import PartitionSpec, SerialKind, SerialSpec
        cfg = PartitionSpec(name="t", image=Path({str(cfg.image)!r}), memory=16 << 20,
                              serial=SerialSpec(SerialKind.NULL))
        def work():
            with build(cfg) as m:
                post = m.devices["postcode"]
                m.start()
                while post.writes < 50:
                    time.sleep(0.01)
                m.pause()
                frozen = post.writes
                time.sleep(0.3)
                print("frozen", post.writes == frozen, m.state.value, flush=True)
                m.resume()
                while post.writes < frozen + 50:
                    time.sleep(0.01)
                print("resumed", m.state.value, flush=True)
                m.stop("done")
                print("stopped", m.state.value, m.report.message, flush=True)
        t = threading.Thread(target=work)
        t.start()
        t.join()
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "frozen True paused",
        "resumed running",
        "stopped stopped done",
    ]


def test_transitions_are_checked_with_one_line_errors(tmp_path: Path) -> None:
    with build(_config(tmp_path, SPIN_ON_PORT_80)) as m:
        assert m.state is MachineState.CREATED
        with pytest.raises(StateError, match=r"^cannot pause machine t: it is created$"):
            m.pause()  # before: waited 10 s and returned as if paused
        with pytest.raises(StateError, match=r"^cannot resume machine t: it is created$"):
            m.resume()
        m.start()
        with pytest.raises(StateError, match=r"^cannot start machine t: it is running$"):
            m.start()  # before: a second thread ran on the same vCPU fd
        with pytest.raises(StateError, match=r"^cannot resume machine t: it is running$"):
            m.resume()
        m.pause()
        with pytest.raises(StateError, match=r"^cannot pause machine t: it is paused$"):
            m.pause()
        m.resume()
        _wait_writes(m.devices["postcode"], 10)
        m.stop("test done")
        assert m.state is MachineState.STOPPED
        m.stop("again")  # stopping a stopped machine keeps its first outcome
        assert m.report is not None and m.report.message == "test done"
        for verb in ("start", "pause", "resume"):
            with pytest.raises(StateError, match=rf"^cannot {verb} machine t: it is stopped$"):
                getattr(m, verb)()
    m.close()  # a second close does nothing (before: EBADF)


def test_one_thread_per_vcpu_whatever_the_callers_do(tmp_path: Path) -> None:
    """Many threads pausing and resuming at once: every call is a checked transition,
    the vCPUs keep exactly one thread each, and the guest ends normally."""
    code = SPIN_ON_PORT_80
    with build(_config(tmp_path, code, cpus=2)) as m:
        before = {t.name for t in threading.enumerate()}
        m.start()
        errors: list[str] = []

        def flip() -> None:
            for _ in range(20):
                for op in (m.pause, m.resume):
                    try:
                        op()
                    except StateError as e:
                        errors.append(str(e))

        workers = [threading.Thread(target=flip) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        names = [t.name for t in threading.enumerate() if t.name not in before]
        assert sorted(names) == ["vcpu0", "vcpu1"]
        assert all(e.startswith("cannot ") and "machine t: it is " in e for e in errors)
        if m.state is MachineState.PAUSED:
            m.resume()
        _wait_writes(m.devices["postcode"], m.devices["postcode"].writes + 10)
        m.stop("test done")
    assert [t.name for t in threading.enumerate() if t.name.startswith("vcpu")] == []


def test_a_built_machine_runs_no_thread_until_started(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    code = SPIN_ON_PORT_80
    before = set(threading.enumerate())
    from corevisor.spec import VirtioSpec

    cfg = _config(
        tmp_path, code, serial=SerialSpec(SerialKind.UNIX, sock), virtio=VirtioSpec(rng=True)
    )
    m = build(cfg)
    try:
        assert set(threading.enumerate()) == before
        m.start()
        names = sorted(t.name for t in set(threading.enumerate()) - before)
        assert names == ["serial-t", "vcpu0", "virtio-virtio-rng"]
    finally:
        m.close()
    assert set(threading.enumerate()) == before
    assert not sock.exists()


# --- halted guests (issue 9, class 7) -----------------------------------------------


def test_cli_hlt_is_reported_as_stopped(tmp_path: Path) -> None:
    with build(_config(tmp_path, CLI_HLT)) as m:
        report = m.run(timeout=120)  # the bound only keeps a regression from hanging
    assert report.kind == "fault"
    assert report.message == "guest halted with interrupts off (no interrupt can wake it)"
    assert "rflags=0x2 " in report.registers  # IF clear, as read while parked


def test_every_vcpu_must_be_stuck(tmp_path: Path) -> None:
    """vCPU 1 is never started (waits for SIPI): with vCPU 0 in cli;hlt the machine is
    stuck; with vCPU 0 running, it is not."""
    with build(_config(tmp_path, CLI_HLT, cpus=2)) as m:
        report = m.run(timeout=120)
    assert report.message == (
        "every vCPU of the guest halted with interrupts off (no interrupt can wake it)"
    )
    assert report.registers.count("rip=") == 2
    with build(_config(tmp_path, SPIN_ON_PORT_80, cpus=2)) as m:
        report = m.run(timeout=2)
    assert report.message == "timed out after 2 s"


def test_a_halt_something_can_end_is_not_reported(tmp_path: Path) -> None:
    """sti;hlt (a maskable interrupt may come) and cli;hlt with an IOAPIC pin routed as
    NMI (a device may wake it) run until the timeout."""
    with build(_config(tmp_path, STI_HLT)) as m:
        report = m.run(timeout=2)
    assert report.message == "timed out after 2 s"
    nmi_pin = """
main:
    movl $0x14, 0xfec00000      # IOAPIC redirection entry 2 (low dword)
    movl $0x400, 0xfec00010     # delivery mode NMI, unmasked
    cli
1:  hlt
    jmp 1b
"""
    img = guest(tmp_path / "nmi.elf", nmi_pin)
    cfg = PartitionSpec(name="t", image=img, memory=16 << 20, serial=SerialSpec(SerialKind.NULL))
    with build(cfg) as m:
        report = m.run(timeout=2)
    assert report.message == "timed out after 2 s"


def test_cli_hlt_through_the_cli_stops_with_status_1(tmp_path: Path) -> None:
    img = guest(
        tmp_path / "halt.elf",
        "main:\n    PRINT msg\n    cli\n1:  hlt\n    jmp 1b\n" + string("msg", "halting\\n"),
    )
    r = corevisor("run", str(img), timeout=120)  # no --timeout: it must end by itself
    assert r.stdout == "halting\n"
    assert r.stderr.splitlines()[0] == (
        "corevisor: halt: guest stopped: guest halted with interrupts off (no interrupt can "
        "wake it) [restart = stop: stays down; the other partitions continue]"
    )
    assert "vcpu0: rip=" in r.stderr
    assert r.returncode == 1
