"""Snapshots on real KVM: a guest paused mid-run, saved to disk and restored into a fresh
VM built from the same config continues exactly where it was.

The machines are driven as tests/kvm/test_machine_control.py drives them (build, start,
pause from the main thread); the lifecycle's own snapshot commands come later.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from corevisor.arch.x86_64 import layout
from corevisor.builder import PartitionLinks, build
from corevisor.errors import CorevisorError, KvmError, SnapshotError
from corevisor.kvm import bindings as b
from corevisor.machine import Machine
from corevisor.snapshot import format as fmt
from corevisor.snapshot import save_parts
from corevisor.snapshot import state as st
from corevisor.spec import PartitionSpec, SerialSpec

MEMORY = 32 << 20


def _config(guests: dict[str, Path], guest: str, log: Path, cmdline: str = "",
            cpus: int = 1) -> PartitionSpec:
    return PartitionSpec(
        name="snap", image=guests[guest], memory=MEMORY, cpus=cpus, serial=SerialSpec.file(log),
        cmdline=cmdline,
    )


class _PauseAt:
    """A serial backend that pauses its machine as soon as the guest has printed marker.

    The pause is posted from a thread of its own the moment the marker's last byte is
    written (on the vCPU thread), so the guest is stopped within a few exits of printing
    it, however loaded the host is: the snapshot point does not depend on how fast a
    test polls a log file.
    """

    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        self._file = path.open("wb", buffering=0)
        self._marker = marker.encode()
        self._seen = b""
        self.machine: Machine | None = None
        self.paused = threading.Event()
        self.error: CorevisorError | None = None

    def write(self, data: bytes) -> None:
        self._file.write(data)
        if self._marker in self._seen:
            return
        self._seen += data
        if self._marker in self._seen:
            threading.Thread(target=self._pause, daemon=True).start()

    def _pause(self) -> None:
        assert self.machine is not None
        try:
            self.machine.pause()
        except CorevisorError as e:  # the guest stopped first: the test says so
            self.error = e
        self.paused.set()

    def start_input(self, feed: object) -> None:
        """No input."""

    def close(self) -> None:
        self._file.close()


@contextmanager
def _machine(config: PartitionSpec, serial: _PauseAt | None = None) -> Iterator[Machine]:
    m = build(config, links=PartitionLinks(serial=serial))
    try:
        yield m
    finally:
        m.close()
        if serial is not None:
            serial.close()


@contextmanager
def _paused_at(
    config: PartitionSpec, log: Path, marker: str, halted: bool = False
) -> Iterator[tuple[Machine, str]]:
    """config's machine, started and paused right after its guest printed marker, and
    the guest's output at the pause. halted: then resumed and paused again until every
    vCPU is found asleep in hlt (a guest that sleeps between ticks almost always is), so
    the snapshot holds halted vCPUs."""
    serial = _PauseAt(log, marker)
    with _machine(config, serial) as m:
        serial.machine = m
        m.start()
        assert serial.paused.wait(120), f"the guest never printed {marker!r}"
        assert serial.error is None and m.report is None, f"no pause: {serial.error}"
        for _ in range(200 if halted else 0):
            if all(v.fd.get_mp_state() == b.KVM_MP_STATE_HALTED for v in m.vcpus):
                break
            m.resume()
            time.sleep(0.002)
            m.pause()
        else:
            assert not halted, "the vCPUs were never found halted"
        yield m, log.read_text()


def _spec(config: PartitionSpec) -> dict[str, object]:
    """What these tests put in spec.json (the lifecycle will write the real spec)."""
    return {"name": config.name, "image": str(config.image), "memory": config.memory,
            "cpus": config.cpus, "cmdline": config.cmdline}


def _snapshot(m: Machine, config: PartitionSpec, where: Path) -> fmt.Snapshot:
    return fmt.write(where, _spec(config), st.capture_machine(m), m.memory,
                     layout.ram_layout(config.memory))


# Restores a snapshot in a process of its own: nothing of the first process helps.
RESTORE_IN_A_NEW_PROCESS = """
import sys
from pathlib import Path
from corevisor.builder import build
from corevisor.snapshot import format as fmt, state as st
from corevisor.spec import PartitionSpec, SerialSpec
snap = fmt.read(Path(sys.argv[1]))
s = snap.spec
config = PartitionSpec(name=s["name"], image=Path(s["image"]), memory=s["memory"],
                       cpus=s["cpus"], cmdline=s["cmdline"], serial=SerialSpec.file(sys.argv[2]))
with build(config) as m:
    fmt.copy_memory(snap, m.memory)
    st.restore_machine(m, snap.machine)
    report = m.run(120)
print(report.kind, report.code)
"""


def _restore(config: PartitionSpec, where: Path) -> tuple[Machine, st.RestoreNotes]:
    snap = fmt.read(where)
    m = build(config)
    try:
        fmt.copy_memory(snap, m.memory)
        notes = st.restore_machine(m, snap.machine)
    except BaseException:
        m.close()
        raise
    return m, notes


def _both_runs(guests: dict[str, Path], tmp_path: Path, guest: str, cmdline: str,
               pause_at: str, halted: bool = False) -> tuple[str, str, str]:
    """Run guest to pause_at, snapshot, let it finish; restore the snapshot in a fresh VM
    and let that finish: (output at the pause, of the restored run, of the whole first
    run). Both runs must end with the guest's exit status 0."""
    a, b_log = tmp_path / "a.log", tmp_path / "b.log"
    config = _config(guests, guest, a, cmdline)
    with _paused_at(config, a, pause_at, halted) as (m, before):
        _snapshot(m, config, tmp_path / "snap")
        m.resume()
        report = m.outcome(120)
    assert (report.kind, report.code) == ("exit", 0), report
    restored, _ = _restore(_config(guests, guest, b_log, cmdline), tmp_path / "snap")
    with restored:
        report = restored.run(120)
    assert (report.kind, report.code) == ("exit", 0), report
    return before, b_log.read_text(), a.read_text()


def test_a_counting_guest_continues_its_count(guests: dict[str, Path], tmp_path: Path) -> None:
    # peer mode=counter: a TSC deadline loop, sleeping in hlt on a one-shot LAPIC timer.
    before, after, whole = _both_runs(
        guests, tmp_path, "peer", "mode=counter ticks=12 period=40", "peer: tick 4\n", halted=True
    )
    # What the restored guest printed is exactly the rest of the uninterrupted run.
    assert before + after == whole
    k = before.count("peer: tick")
    assert after.startswith(f"peer: tick {k + 1}\n") and after.endswith("peer: tick 12\n")


def test_a_guest_restored_in_a_new_process_continues(guests: dict[str, Path],
                                                    tmp_path: Path) -> None:
    a, b_log = tmp_path / "a.log", tmp_path / "b.log"
    config = _config(guests, "peer", a, "mode=counter ticks=10 period=40")
    with _paused_at(config, a, "peer: tick 3\n", halted=True) as (m, before):
        _snapshot(m, config, tmp_path / "snap")
        m.resume()
        report = m.outcome(120)
    assert (report.kind, report.code) == ("exit", 0), report
    child = subprocess.run(
        [sys.executable, "-c", RESTORE_IN_A_NEW_PROCESS, str(tmp_path / "snap"), str(b_log)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert child.stdout == "exit 0\n", child.stderr
    assert before + b_log.read_text() == a.read_text()


def test_a_timer_guest_keeps_ticking(guests: dict[str, Path], tmp_path: Path) -> None:
    # timer: a periodic LAPIC timer interrupting a CPL3 loop until 20 ticks, then it masks
    # the timer. How many loop iterations fit in the ticks depends on the host's speed, and
    # a 21st tick can land before the mask on a slow host (a restored VM starts with a cold
    # shadow MMU here): those two numbers are not the guest's to keep.
    before, after, whole = _both_runs(guests, tmp_path, "timer", "", "timer: uart irq ok\n")
    timing = re.compile(r"ran \d+ iterations|\d+ ticks")
    assert timing.sub("N", before + after) == timing.sub("N", whole)
    ticks = re.match(r"timer: (\d+) ticks\n", after)
    assert ticks is not None and int(ticks.group(1)) >= 20, after


def test_two_vcpus_restored_mid_conversation(guests: dict[str, Path], tmp_path: Path) -> None:
    # rtos on 2 vCPUs: LAPIC timers on both, doorbells as IPIs, a ping-pong in flight.
    a, b_log = tmp_path / "a.log", tmp_path / "b.log"
    config = _config(guests, "rtos", a, "msgs=6", cpus=2)
    with _paused_at(config, a, 'rtos: sent "ping 2"\n') as (m, before):
        snap = _snapshot(m, config, tmp_path / "snap")
    assert len(snap.machine.vcpus) == 2
    b_config = dataclasses.replace(config, serial=SerialSpec.file(b_log))
    restored, _ = _restore(b_config, tmp_path / "snap")
    with restored:
        report = restored.run(120)
    assert (report.kind, report.code) == ("exit", 0), report
    after = b_log.read_text()
    sent = before.count("rtos: sent")
    for k in range(sent + 1, 7):
        assert f'rtos: sent "ping {k}"\n' in after
    for k in range(1, 7):
        assert f'rtos: received "pong {k}"\n' in before + after
    assert after.endswith("rtos: done\n")


# --- state round trips on KVM -------------------------------------------------------


def _timeless_devices(devices: tuple[tuple[str, object], ...]) -> list[tuple[str, object]]:
    """The device states without the PM timer's count and HC_CLOCK's time, which run on."""
    return [
        (name, dataclasses.replace(state, clock_ns=0) if name == "hypercall" else state)
        for name, state in devices
        if name != "pm-timer"
    ]


def _timeless(v: st.KvmVcpuState) -> st.KvmVcpuState:
    """v without what moves while a VM exists: the TSC, the LAPIC timer's current count."""
    lapic = v.lapic[:0x390] + bytes(4) + v.lapic[0x394:]
    msrs = tuple(msr for msr in v.msrs if msr.index != b.MSR_IA32_TSC)
    return dataclasses.replace(v, lapic=lapic, msrs=msrs)


def test_restored_state_reads_back_as_saved(guests: dict[str, Path], tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    config = _config(guests, "peer", log, "mode=counter ticks=1000 period=20")
    with _paused_at(config, log, "peer: tick 3\n", halted=True) as (m, _):
        saved = st.capture_machine(m)
    tsc = {msr.index: msr.value for msr in saved.vcpus[0].msrs}[b.MSR_IA32_TSC]
    with _machine(config) as fresh:
        st.restore_machine(fresh, saved)
        again = st.capture_machine(fresh)
    assert again.host == saved.host
    assert _timeless_devices(again.devices) == _timeless_devices(saved.devices)
    assert [_timeless(v) for v in again.vcpus] == [_timeless(v) for v in saved.vcpus]
    assert {msr.index: msr.value for msr in again.vcpus[0].msrs}[b.MSR_IA32_TSC] >= tsc
    for chip in ("pic_master", "pic_slave", "ioapic"):
        assert getattr(again.vm, chip) == getattr(saved.vm, chip)
    pit = [dataclasses.replace(c, count_load_time=0) for c in again.vm.pit.channels]
    assert pit == [dataclasses.replace(c, count_load_time=0) for c in saved.vm.pit.channels]
    assert again.vm.clock.clock >= saved.vm.clock.clock  # continues, never goes back
    assert saved.vcpus[0].mp_state == b.KVM_MP_STATE_HALTED  # it sleeps in hlt
    assert saved.vcpus[0].msrs_unreadable == ()  # this host reads every MSR it lists


def _counter_state(guests: dict[str, Path], tmp_path: Path) -> tuple[PartitionSpec,
                                                                    st.MachineSnapshot]:
    """A counting guest's config and its state, taken after its first tick."""
    log = tmp_path / "a.log"
    config = _config(guests, "peer", log, "mode=counter ticks=1000 period=20")
    with _paused_at(config, log, "peer: tick 1\n") as (m, _):
        return config, st.capture_machine(m)


def test_msrs_the_host_will_not_set_are_checked_not_lost(guests: dict[str, Path],
                                                         tmp_path: Path) -> None:
    config, saved = _counter_state(guests, tmp_path)
    with _machine(config) as fresh:
        notes = st.restore_machine(fresh, saved)
        fd = fresh.vcpus[0].fd
        values = {msr.index: msr.value for msr in saved.vcpus[0].msrs}
        for index in notes.msrs_readonly:  # e.g. PVM's 0x4b564d11-13 on this host
            assert fd.get_msrs([index]) == {index: values[index]}
            with pytest.raises(KvmError, match=f"MSR {index:#x} was refused"):
                fd.set_msrs({index: values[index] ^ 1})
    # An MSR this host refuses (MTRRcap is read-only) holding another value than here:
    vcpu = saved.vcpus[0]
    forged = dataclasses.replace(vcpu, msrs=(*vcpu.msrs, st.Msr(0xFE, 0x1234)))
    with _machine(config) as fresh, pytest.raises(SnapshotError) as e:
        st.restore_machine(fresh, dataclasses.replace(saved, vcpus=(forged,)))
    assert "MSR 0xfe: this host refuses the saved value 0x1234" in str(e.value)


def test_a_snapshot_from_another_cpu_changes_nothing(guests: dict[str, Path],
                                                     tmp_path: Path) -> None:
    config, saved = _counter_state(guests, tmp_path)
    other = dataclasses.replace(saved.host, vendor="AuthenticAMD", signature=0xA20F12)
    with _machine(config) as fresh:
        fd = fresh.vcpus[0].fd
        regs = bytes(fd.get_regs())
        devices = _timeless_devices(save_parts(fresh.devices))
        with pytest.raises(SnapshotError, match="taken on AuthenticAMD family 0x19"):
            st.restore_machine(fresh, dataclasses.replace(saved, host=other))
        bad_regs = dataclasses.replace(saved.vcpus[0].regs, rip=1 << 64)
        bad = dataclasses.replace(saved.vcpus[0], regs=bad_regs)
        with pytest.raises(SnapshotError, match=r"vcpu0.regs.rip: .* does not fit a 64-bit"):
            st.restore_machine(fresh, dataclasses.replace(saved, vcpus=(bad,)))
        assert bytes(fd.get_regs()) == regs
        assert _timeless_devices(save_parts(fresh.devices)) == devices


def test_an_idle_guest_snapshot_is_mostly_holes(guests: dict[str, Path], tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    config = _config(guests, "peer", log, "mode=counter ticks=1000 period=50")
    with _paused_at(config, log, "peer: tick 1\n") as (m, _):
        snap = _snapshot(m, config, tmp_path / "snap")
    mem = tmp_path / "snap" / "memory.raw"
    assert mem.stat().st_size == MEMORY  # every page has its place ...
    assert mem.stat().st_blocks * 512 < MEMORY // 16  # ... the untouched ones are holes
    assert snap.memory.data_bytes < MEMORY // 16
    fmt.verify_memory(fmt.read(tmp_path / "snap"))


def test_state_is_taken_only_from_a_paused_machine(guests: dict[str, Path],
                                                   tmp_path: Path) -> None:
    config, saved = _counter_state(guests, tmp_path)
    with _machine(config) as m:
        m.start()
        with pytest.raises(SnapshotError, match="while it is running .pause it first"):
            st.capture_machine(m)
        m.pause()
        with pytest.raises(SnapshotError, match="into a fresh machine, not one paused"):
            st.restore_machine(m, saved)
