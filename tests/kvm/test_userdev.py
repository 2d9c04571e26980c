"""User-written devices on real KVM, judged by what the bundled `sensor` guest prints and
how the run ends: the example sensor (examples/sensor.py) read, its level-triggered
interrupt taken, its log written into guest memory; each way a device can fail,
contained (the device answers as absent, the machine says so once, the guest and the
other devices go on); a device that blocks; snapshots with and without a device's state.

The devices gone wrong are tests/kvm/userdevs.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from corevisor import machine as machine_module
from corevisor.arch.x86_64 import layout
from corevisor.builder import PartitionLinks, build
from corevisor.config import load_config
from corevisor.errors import CorevisorError, SnapshotError
from corevisor.machine import Machine
from corevisor.snapshot import format as fmt
from corevisor.snapshot import state as st
from corevisor.spec import PartitionSpec, SerialSpec
from corevisor.userdev.attach import UserDeviceState
from corevisor.vcpu import StopReport
from tests.kvm.conftest import corevisor
from tests.kvm.test_snapshot import _PauseAt

ROOT = Path(__file__).resolve().parents[2]
USERDEVS = Path(__file__).resolve().parent / "userdevs.py"
EXAMPLE = ROOT / "examples" / "sensor.py"
SECOND = f'class = "{EXAMPLE}:TempSensor"\nname = "other"\nbase = 0x710\ngsi = 6\ncelsius = 40'



def system(tmp_path: Path, guests: dict[str, Path], cmdline: str, *devices: str) -> Path:
    """A system file: the sensor guest with cmdline and these [[devices]] bodies."""
    text = f'[partitions.sensor]\nimage = "{guests["sensor"]}"\ncmdline = "{cmdline}"\n'
    for body in devices:
        text += f"[[partitions.sensor.devices]]\n{body}\n"
    path = tmp_path / "sensor.toml"
    path.write_text(text)
    return path


def alarms(out: str) -> list[int]:
    return [int(t) for t in re.findall(r"^sensor: alarm \d+ at (\d+) C$", out, re.M)]


def test_the_example_sensor_is_read_and_interrupts(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(ROOT / "examples" / "sensor.toml"))
    out = r.stdout
    start = int(re.search(r"^sensor: temperature (\d+) C$", out, re.M).group(1))  # type: ignore[union-attr]
    assert 21 <= start < 125, out
    assert f"sensor: alarm at {start + 3} C, interrupt on\n" in out
    got = alarms(out)
    # each alarm comes at or above its threshold, three degrees above the one before
    assert len(got) == 3 and got[0] >= start + 3, out
    assert all(b >= a + 3 for a, b in zip(got, got[1:], strict=False)), out
    assert "sensor: done, 3 alarms" in out
    assert r.returncode == 0, r.stderr
    assert r.stderr == "corevisor: sensor: guest exited with status 0\n"


def test_a_device_from_the_command_line(guests: dict[str, Path]) -> None:
    r = corevisor(
        "run", "sensor", "--device", f"{EXAMPLE}:TempSensor,celsius=60,step=2",
        "--cmdline", "count=2 rise=4",
    )
    start = int(re.search(r"^sensor: temperature (\d+) C$", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert start >= 60 and start % 2 == 0, r.stdout  # from 60, two degrees a sample
    assert f"sensor: alarm at {start + 4} C" in r.stdout
    assert len(alarms(r.stdout)) == 2 and "sensor: done, 2 alarms" in r.stdout
    assert r.returncode == 0, r.stderr


FAILURES = {
    "read": "ZeroDivisionError: integer division or modulo by zero (at userdevs.py:",
    "timer": "KeyError: 'sample' (at userdevs.py:",
    "write": "RuntimeError: status write refused (at userdevs.py:",
    "exit": "SystemExit: 3 (at userdevs.py:",
    "size": "it returned 2 bytes for a 1-byte read",
    "nasty": "Unprintable: <Unprintable that cannot be shown> (at userdevs.py:",
}
WHERE = {"read": "read(0x0, 1)", "timer": "timer 0 (sample)", "write": "write(0x2, 01)",
         "exit": "write(0x2, 01)", "size": "read(0x0, 1)", "nasty": "timer 0 (sample)"}


@pytest.mark.parametrize("where", FAILURES)
def test_a_failing_device_is_contained(
    guests: dict[str, Path], tmp_path: Path, where: str
) -> None:
    failing = f'class = "{USERDEVS}:FailingSensor"\nname = "flaky"\nwhere = "{where}"'
    path = system(tmp_path, guests, "count=3 timeout=500 second=0x710", failing, SECOND)
    r = corevisor("run", str(path))
    lines = r.stderr.splitlines()
    told = [line for line in lines if "device flaky" in line]
    head = f"corevisor: sensor: device flaky (userdevs.py:FailingSensor) failed in {WHERE[where]}: "
    assert len(told) == 1 and told[0].startswith(head), r.stderr
    assert FAILURES[where] in told[0] and told[0].endswith(
        "; it answers as an absent device from now on"
    ), told
    # the guest ran on: it saw the sensor go absent (all ones), finished and exited with
    # its own status, through the serial port and the exit port; the other sensor works
    out = r.stdout
    assert "sensor: done, " in out and "now 255 C" in out, out
    other = int(re.search(r"second sensor at 0x710: (\d+) C", out).group(1))  # type: ignore[union-attr]
    assert 40 < other < 255, out
    # (how many alarms it counted first depends on when the device failed)
    assert lines[-1] == f"corevisor: sensor: guest exited with status {r.returncode}", r.stderr
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr


def test_the_log_arrives_in_guest_memory(guests: dict[str, Path], tmp_path: Path) -> None:
    path = system(tmp_path, guests, "count=3 log=1", f'class = "{USERDEVS}:LoggingSensor"')
    r = corevisor("run", str(path))
    logged = [int(t) for t in re.findall(r"^sensor: log \d+: (\d+) C$", r.stdout, re.M)]
    assert len(logged) == 3 and logged == sorted(logged), r.stdout
    # each alarm's temperature as the device wrote it, read back from the guest's buffer
    assert all(a >= b for a, b in zip(alarms(r.stdout), logged, strict=True)), r.stdout
    assert "log write failed" not in r.stdout
    assert r.returncode == 0, r.stderr


def test_a_log_outside_ram_is_refused_by_the_memory(guests: dict[str, Path],
                                                    tmp_path: Path) -> None:
    outside = "count=2 log=0x20000000"  # 512 MiB: beyond the guest's 64 MiB of RAM
    checked = system(tmp_path, guests, outside, f'class = "{USERDEVS}:LoggingSensor"')
    r = corevisor("run", str(checked))
    assert re.search(r"^sensor: log write failed \(status 0x[23]\)$", r.stdout, re.M), r.stdout
    assert "sensor: done, 2 alarms" in r.stdout and r.returncode == 0, r.stdout + r.stderr
    unchecked = system(tmp_path, guests, outside + " timeout=500",
                       f'class = "{USERDEVS}:LoggingSensor"\nchecked = false')
    r = corevisor("run", str(unchecked))
    assert (
        "failed in timer 0 (sample): GuestMemoryError: guest access 0x20000000+0x4 is outside "
        "guest RAM (at memory.py:"
    ) in r.stderr, r.stderr
    # the device failed writing the log, before it raised its line: the guest saw no
    # alarm, and reads the failed device as absent
    assert "sensor: no alarm within 500 ms" in r.stdout, r.stdout
    assert "sensor: done, 0 alarms, now 255 C" in r.stdout and r.returncode == 1, r.stdout


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('class = "nowhere_at_all:Sensor"', 'partitions.sensor.devices[0].class: no module named '
         '"nowhere_at_all" (class = "nowhere_at_all:Sensor")'),
        (f'class = "{EXAMPLE}:TempSensor"\nbase = 0x3f8',
         "partitions.sensor.devices[0]: port 0x3f8+4 overlaps com1 (0x3f8-0x3ff)"),
        (f'class = "{EXAMPLE}:TempSensor"\ncelsius = 300', None),
    ],
)
def test_a_bad_device_is_one_line_and_exit_status_2(
    guests: dict[str, Path], tmp_path: Path, body: str, message: str | None
) -> None:
    path = system(tmp_path, guests, "", body)
    r = corevisor("run", str(path))
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    if message is not None:
        assert r.stderr == f"corevisor: {path}: {message}\n"
    else:  # the constructor itself refused (a byte cannot hold 300)
        assert r.stderr.startswith(
            "corevisor: partitions.sensor.devices[0] (device tempsensor, sensor.py:TempSensor): "
            "its constructor raised ValueError: "
        ) and r.stderr.count("\n") == 1, r.stderr


# ---------------------------------------------------------------------- in-process machines


def _spec(tmp_path: Path, guests: dict[str, Path], cmdline: str, *devices: str,
          log: str = "serial.log") -> PartitionSpec:
    config = load_config(system(tmp_path, guests, cmdline, *devices)).partitions[0]
    return PartitionSpec(name=config.name, image=config.image, cmdline=config.cmdline,
                         memory=32 << 20, serial=SerialSpec.file(tmp_path / log),
                         devices=config.devices)


@contextmanager
def _built(config: PartitionSpec, reports: list[str],
           serial: _PauseAt | None = None) -> Iterator[Machine]:
    links = PartitionLinks(serial=serial, report=lambda name, msg: reports.append(msg))
    m = build(config, links=links)
    try:
        yield m
    finally:
        m.close()
        if serial is not None:
            serial.close()


def test_a_blocking_device_stalls_its_vcpu_but_the_machine_still_stops(
    guests: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine_module, "ACK_TIMEOUT", 1.0)  # how long a pause may wait
    monkeypatch.setattr(machine_module, "JOIN_TIMEOUT", 1.0)  # and a stop for the thread
    config = _spec(tmp_path, guests, "count=1", f'class = "{USERDEVS}:BlockingSensor"')
    reports: list[str] = []
    blocking = None
    try:
        with _built(config, reports) as m:
            blocking = type(m.devices["device-blockingsensor"].device)
            m.start()
            assert blocking.entered.wait(120), "the guest never read the sensor"
            with pytest.raises(CorevisorError) as info:
                m.pause()  # vcpu0 is inside the device's read: it cannot park
            assert "device blockingsensor has been inside read(0x0, 1) on vcpu0 for " in str(
                info.value
            ), info.value
            m.stop("the test is done")
            assert m.report is not None and m.report.message == "the test is done"
        assert any(
            "device blockingsensor has been inside read(0x0, 1) on vcpu0" in r
            and r.endswith("the machine closed without it (that thread is left behind)")
            for r in reports
        ), reports
    finally:
        if blocking is not None:
            blocking.release.set()  # the abandoned thread may end now


def test_snapshots_refuse_a_device_without_state_and_a_failed_one(
    guests: dict[str, Path], tmp_path: Path
) -> None:
    config = _spec(tmp_path, guests, "", f'class = "{USERDEVS}:Stateless"')
    reports: list[str] = []
    with _built(config, reports) as m, pytest.raises(SnapshotError) as info:
        st.capture_machine(m)
    assert str(info.value) == (
        "device stateless (userdevs.py:Stateless) has no save() and restore(), so its machine "
        "cannot be snapshotted (docs/devices.md)"
    )
    config = _spec(tmp_path, guests, "", f'class = "{USERDEVS}:FailingSensor"\nafter = 1')
    with _built(config, reports) as m:
        assert m.pio.read(0x700, 1) == b"\xff"  # the first read fails it: absent at once
        assert m.pio.read(0x701, 1) == b"\xff"
        with pytest.raises(SnapshotError) as info:
            st.capture_machine(m)
    assert str(info.value).startswith(
        "device failingsensor failed in read(0x0, 1): ZeroDivisionError: "
    ) and str(info.value).endswith(": it has no state to save")
    assert len([r for r in reports if "failed in read" in r]) == 1


LOGGING = f'class = "{USERDEVS}:LoggingSensor"'


@contextmanager
def _paused_at_alarm_2(guests: dict[str, Path], tmp_path: Path,
                       reports: list[str]) -> Iterator[tuple[PartitionSpec, Machine]]:
    """The sensor guest with a LoggingSensor (4 alarms, a log), paused just after it
    printed its second alarm; serial output in a.log."""
    config = _spec(tmp_path, guests, "count=4 log=1", LOGGING, log="a.log")
    serial = _PauseAt(tmp_path / "a.log", "sensor: alarm 2 at ")
    with _built(config, reports, serial) as m:
        serial.machine = m
        m.start()
        assert serial.paused.wait(120) and serial.error is None, serial.error
        yield config, m


def _finished_all_four(report: StopReport, after: str, reports: list[str]) -> None:
    """The restored guest finished the alarms the first one had left, and its log (in
    the restored RAM, appended to by the restored device) holds all four."""
    assert (report.kind, report.code) == ("exit", 0), (report, after)
    assert "sensor: done, 4 alarms" in after, after
    assert len(re.findall(r"^sensor: log \d+: \d+ C$", after, re.M)) == 4, after
    assert not [r for r in reports if "failed" in r], reports


def test_a_sensor_restored_from_a_snapshot_goes_on(guests: dict[str, Path],
                                                   tmp_path: Path) -> None:
    reports: list[str] = []
    with _paused_at_alarm_2(guests, tmp_path, reports) as (config, m):
        saved = st.capture_machine(m)
        fmt.write(tmp_path / "snap", {"name": "sensor"}, saved, m.memory,
                  layout.ram_layout(config.memory))
    (dev,) = [state for name, state in saved.devices if name == "device-loggingsensor"]
    assert isinstance(dev, UserDeviceState)
    regs, log, entries, checked = dev.state
    assert log != 0 and entries >= 2 and checked is True
    restored = dataclasses.replace(config, serial=SerialSpec.file(tmp_path / "b.log"))
    snap = fmt.read(tmp_path / "snap")
    with _built(restored, reports) as m:
        fmt.copy_memory(snap, m.memory)
        st.restore_machine(m, snap.machine)
        assert m.devices["device-loggingsensor"].device.entries == entries
        report = m.run(120)
    _finished_all_four(report, (tmp_path / "b.log").read_text(), reports)


def test_a_sensor_snapshot_taken_running_restores_from_its_spec(
    guests: dict[str, Path], tmp_path: Path
) -> None:
    """The provisioning path: a snapshot of the running machine (frozen: the devices'
    timers parked too), its spec.json read back with the device in it, the machine
    rebuilt by builder.restore."""
    from corevisor.snapshot import partition

    reports: list[str] = []
    with _paused_at_alarm_2(guests, tmp_path, reports) as (_, m):
        m.resume()  # take() freezes a running machine itself
        partition.take(m, tmp_path / "snap")
    snap = partition.read(tmp_path / "snap")
    assert [d.cls for d in partition.restored_spec(snap, partition.Overrides()).devices] == [
        f"{USERDEVS}:LoggingSensor"
    ]
    overrides = partition.Overrides(serial=SerialSpec.file(tmp_path / "b.log"))
    with partition.restore(snap, overrides) as restored:
        report = restored.run(120)
    _finished_all_four(report, (tmp_path / "b.log").read_text(), reports)


@pytest.mark.parametrize(("where", "thread"), [("read", "vcpu0"), ("timer", "devices-sensor")])
def test_a_device_making_a_forbidden_call_stops_the_vmm_with_the_sandboxs_report(
    guests: dict[str, Path], tmp_path: Path, where: str, thread: str
) -> None:
    # the sandbox's contract comes first: a device's code on the vCPU thread and on the
    # devices thread is under the vCPU role's allowlist (docs/devices.md)
    body = f'class = "{USERDEVS}:ForbiddenSensor"\nwhere = "{where}"'
    r = corevisor("run", str(system(tmp_path, guests, "count=2", body)))
    assert r.returncode == 159, (r.stdout, r.stderr)
    assert re.search(
        rf"^corevisor: sandbox: thread {thread} \(tid \d+\) made a system call its seccomp "
        r"filter forbids: openat \(\d+\); stopping the VMM \(exit status 159\)$",
        r.stderr, re.M,
    ), r.stderr
    r = corevisor("run", str(system(tmp_path, guests, "count=2", body)), "--no-sandbox")
    assert "sensor: done, 2 alarms" in r.stdout and r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")
def test_the_example_runs_in_the_jail(guests: dict[str, Path], jail_user: tuple[int, int],
                                      tmp_path: Path) -> None:
    # the device's file is not in the jail: its module was loaded reading the system file
    root = tmp_path / "jail"
    root.mkdir()
    jail = ["--jail", str(root), "--uid", str(jail_user[0]), "--gid", str(jail_user[1])]
    r = corevisor("run", "sensor", "--device", f"{EXAMPLE}:TempSensor", "--cmdline", "count=2",
                  *jail)
    assert "sensor: done, 2 alarms" in r.stdout and r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "sandbox:" not in r.stderr, r.stderr


def test_the_api_builds_a_partition_with_a_device(tmp_path: Path,
                                                  guests: dict[str, Path]) -> None:
    from corevisor.errors import ApiError
    from tests.kvm.apihelp import daemon, until

    device = {"class": f"{EXAMPLE}:TempSensor", "celsius": 30}
    table = {"image": str(guests["sensor"]), "memory": "16M", "cmdline": "count=2",
             "serial": "null", "devices": [device]}
    with daemon(tmp_path) as (_, client):
        client.json("POST", "/partitions?start=true", {"partitions": {"sensor": table}})
        until(lambda: client.json("GET", "/partitions/sensor")["state"] == "stopped",
              "the sensor guest ends")
        got = client.json("GET", "/partitions/sensor")
        assert (got["status"], got["last"]) == (0, "guest exited with status 0"), got
        serial = client.request("GET", "/partitions/sensor/serial").decode()
        assert "sensor: done, 2 alarms" in serial, serial
        (shown,) = got["config"]["devices"]
        assert shown == {"class": f"{EXAMPLE}:TempSensor", "name": "tempsensor", "base": 0x700,
                         "gsi": 5, "celsius": 30}
        bad = {**table, "devices": [{**device, "celsius": "warm"}]}
        with pytest.raises(ApiError) as info:
            client.json("POST", "/partitions", {"partitions": {"warm": bad}})
        assert (info.value.status, str(info.value)) == (
            400, "partitions.warm.devices[0].celsius: expected an integer (TempSensor's "
            'parameter celsius: int), got a string "warm"')


# ---------------------------------------------------------------------- PCI functions

PCI_EXAMPLE = ROOT / "examples" / "pcisensor.py"


def pci_alarms(out: str) -> list[int]:
    return [int(t) for t in re.findall(r"^pcisensor: alarm \d+ at (\d+) C$", out, re.M)]


def _drove_the_pci_sensor(out: str, start_at_least: int, count: int) -> int:
    """The guest found 1234:5e50 with both BARs placed, read the same temperature through
    both, and took count alarms three degrees apart; returns the first temperature."""
    assert re.search(r"^pcisensor: BAR0 memory at 0xe01[0-9a-f]{5}, BAR1 ports at 0xc0[0-9a-f]{2}$",
                     out, re.M), out
    found = re.search(r"^pcisensor: temperature (\d+) C \(BAR1: (\d+) C\)$", out, re.M)
    assert found is not None, out
    start, through_ports = int(found.group(1)), int(found.group(2))
    assert start_at_least <= start <= through_ports < 125, out
    assert f"pcisensor: alarm at {start + 3} C, interrupt on\n" in out
    got = pci_alarms(out)
    assert len(got) == count and got[0] >= start + 3, out
    assert all(b >= a + 3 for a, b in zip(got, got[1:], strict=False)), out
    assert f"pcisensor: done, {count} alarms" in out
    return start


def test_the_example_pci_sensor_is_found_and_interrupts_by_intx(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(ROOT / "examples" / "pcisensor.toml"))
    out = r.stdout
    assert "pcisensor: 1234:5e50 at 00:01.0 (ECAM), class 118000\n" in out, out
    assert "pcisensor: INTx pin 1 line 10\n" in out, out  # slot 1's INTA: PIRQ A
    _drove_the_pci_sensor(out, 21, 3)
    # the function's STATUS said "interrupt pending" whenever the handler ran for an alarm
    assert "pcisensor: STATUS interrupt bit set in 3 of 3 handlers\n" in out, out
    assert r.returncode == 0, r.stderr
    assert r.stderr == "corevisor: pcisensor: guest exited with status 0\n"


def test_a_pci_sensor_over_0xcf8_by_msi_beside_a_virtio_pci_device(
    guests: dict[str, Path]
) -> None:
    r = corevisor(
        "run", str(guests["pcisensor"]), "--transport", "pci", "--rng",
        "--device", f"{PCI_EXAMPLE}:PciSensor,celsius=60,step=2",
        "--cmdline", "count=2 irq=msi pci=cf8",
    )
    out = r.stdout
    # user devices take the slots before the virtio functions
    assert "pcisensor: 1234:5e50 at 00:01.0 (0xCF8), class 118000\n" in out, out
    assert "pcisensor: MSI vector 0x26\n" in out, out
    assert _drove_the_pci_sensor(out, 60, 2) % 2 == 0, out  # from 60, two degrees a sample
    assert r.returncode == 0, r.stderr


def test_two_pci_sensors_on_one_intx_line(guests: dict[str, Path]) -> None:
    # slots 1 and 2 both route to GSI 10; the guest drives the first, the second (its
    # interrupt never enabled) must not disturb it (the OR of two requests on a line is
    # tests/unit/test_userdev_pci.py's)
    r = corevisor(
        "run", str(guests["pcisensor"]), "--transport", "pci",
        "--device", f"{PCI_EXAMPLE}:PciSensor",
        "--device", f"{PCI_EXAMPLE}:PciSensor,name=second,celsius=100",
        "--cmdline", "count=2",
    )
    assert "pcisensor: 1234:5e50 at 00:01.0 (ECAM)" in r.stdout, r.stdout
    _drove_the_pci_sensor(r.stdout, 20, 2)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_pci_device_without_a_pci_bus_is_one_line(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["pcisensor"]), "--device", f"{PCI_EXAMPLE}:PciSensor")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (
        "corevisor: --device: device pcisensor is a PCI function, but partition pcisensor "
        'has no PCI bus (give it transport = "pci" or a bios)\n'
    )


def test_a_failing_pci_device_is_contained(guests: dict[str, Path]) -> None:
    r = corevisor(
        "run", str(guests["pcisensor"]), "--transport", "pci",
        "--device", f"{USERDEVS}:FailingPciSensor", "--cmdline", "count=3 timeout=500",
    )
    out = r.stdout
    assert len(pci_alarms(out)) == 2, out  # the second alarm's clearing write failed it
    assert "pcisensor: no alarm within 500 ms\n" in out, out
    assert "pcisensor: done, 2 alarms, now 4294967295 C\n" in out, out
    assert "pcisensor: the device is gone (it reads all ones)\n" in out, out
    assert r.returncode == 1, r.stderr
    (failed,) = [line for line in r.stderr.splitlines() if "failed" in line]
    assert failed == (
        "corevisor: pcisensor: device failingpcisensor (userdevs.py:FailingPciSensor) failed "
        "in write(0, 0x8, 01000000): RuntimeError: status write refused (at userdevs.py:"
        f"{_line_of('status write refused')} in write); it answers as an absent device from "
        "now on"
    ), r.stderr


def _line_of(text: str) -> int:
    lines = USERDEVS.read_text().splitlines()
    return max(i for i, line in enumerate(lines, 1) if text in line)


def test_a_pci_sensor_snapshot_restores_its_function_and_goes_on(
    guests: dict[str, Path], tmp_path: Path
) -> None:
    """Taken running after the second alarm: the function's configuration space comes
    back with the device's registers — its BARs, and the MSI capability the guest
    programmed (without it the restored function would fall back to INTx, whose IOAPIC
    pin this guest never routed: no more alarms)."""
    from corevisor.pci.config import BAR0
    from corevisor.snapshot import partition

    path = tmp_path / "pci.toml"
    path.write_text(
        f'[partitions.pcisensor]\nimage = "{guests["pcisensor"]}"\n'
        f'cmdline = "count=4 irq=msi"\nmemory = "32M"\ntransport = "pci"\n'
        f'[[partitions.pcisensor.devices]]\n'
        f'class = "{PCI_EXAMPLE}:PciSensor"\n'
    )
    config = dataclasses.replace(load_config(path).partitions[0],
                                 serial=SerialSpec.file(tmp_path / "a.log"))
    serial = _PauseAt(tmp_path / "a.log", "pcisensor: alarm 2 at ")
    reports: list[str] = []
    with _built(config, reports, serial) as m:
        serial.machine = m
        m.start()
        assert serial.paused.wait(120) and serial.error is None, serial.error
        m.resume()  # take() freezes a running machine itself
        partition.take(m, tmp_path / "snap")
    snap = partition.read(tmp_path / "snap")
    (state,) = [s for name, s in snap.machine.devices if name == "device-pcisensor"]
    assert isinstance(state, UserDeviceState) and state.config is not None
    bar0 = int.from_bytes(state.config.config[BAR0 : BAR0 + 4], "little")
    assert bar0 == 0xE0100000, hex(bar0)  # where the platform placed it
    assert b"\x26\x00" in state.config.config[0x40:], state.config  # the MSI data: vector
    overrides = partition.Overrides(serial=SerialSpec.file(tmp_path / "b.log"))
    with partition.restore(snap, overrides) as restored:
        report = restored.run(120)
    after = (tmp_path / "b.log").read_text()
    assert (report.kind, report.code) == ("exit", 0), (report, after)
    got = pci_alarms(after)
    assert len(got) == 2 and got[1] >= got[0] + 3, after  # alarms 3 and 4, after the restore
    assert "pcisensor: done, 4 alarms" in after, after
    assert not [r for r in reports if "failed" in r], reports


def test_a_pci_device_s_intx_is_in_the_mp_table(guests: dict[str, Path], tmp_path: Path) -> None:
    """The MP table lists every function with an interrupt pin: the user device in slot
    1 (INTA on 10) and the virtio-pci rng after it in slot 2 (INTA on 10 again)."""
    from tests.unit.test_mptable import mp_buses_and_interrupts

    path = tmp_path / "pci.toml"
    path.write_text(
        f'[partitions.pcisensor]\nimage = "{guests["pcisensor"]}"\nmemory = "32M"\n'
        f'transport = "pci"\nrng = true\n[[partitions.pcisensor.devices]]\n'
        f'class = "{PCI_EXAMPLE}:PciSensor"\n'
    )
    config = load_config(path).partitions[0]
    with _built(dataclasses.replace(config, serial=SerialSpec.file(tmp_path / "s.log")),
                []) as m:
        buses, ints = mp_buses_and_interrupts(m.memory)
    assert buses[0] == b"PCI   "
    pci = [(irq, pin) for _, _, _, bus, irq, _, pin in ints if bus == 0]
    assert pci == [(1 << 2, 10), (2 << 2, 10)], pci
