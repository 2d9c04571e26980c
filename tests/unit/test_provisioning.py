"""Provisioning without KVM: spec.json, restore overrides, the migration link and its
addresses, the dirty-page runs, the VMM's write tracking, and quiescing an I/O thread
and serial input."""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
from pathlib import Path

import pytest

from corevisor.builder import InputGate
from corevisor.errors import GuestMemoryError, MigrationError, SnapshotError
from corevisor.memory import GuestMemory
from corevisor.snapshot import migrate
from corevisor.snapshot.partition import Overrides, apply, spec_from_json, spec_to_json
from corevisor.spec import (
    BlkSpec,
    DeviceSpace,
    DeviceSpec,
    ExitMode,
    HostPort,
    NetSpec,
    PartitionSpec,
    RestartPolicy,
    SerialSpec,
    VirtioSpec,
)
from corevisor.virtio.mmio import REG, VirtioMmio
from corevisor.virtio.rng import Rng
from corevisor.virtio.worker import IoThread
from tests.unit.virtio_driver import FakeDriver

FULL = PartitionSpec(
    name="full", image=Path("/img/guest.elf"), cpus=2, memory=96 << 20, pin=(0, 1),
    cmdline="a=b c", serial=SerialSpec.file(Path("/logs/full.log")), dedicated=True,
    exits=ExitMode.HALT_POLL, halt_poll_ns=1000, restart=RestartPolicy.RESTART,
    watchdog_ms=500, initrd=Path("/img/initrd"), gdb=HostPort("127.0.0.1", 1234),
    virtio=VirtioSpec(blk=(BlkSpec(Path("/d/a.img"), True),), net=(NetSpec("tap0"),),
                      rng=True, console=True),
    devices=(DeviceSpec("/d/sensor.py:TempSensor", "tempsensor", DeviceSpace.PORT, 0x700, 4,
                        5, True, (("celsius", 30), ("gain", 1.5), ("taps", (1, (2, 3))),
                                  ("label", "x"), ("on", True), ("off", None))),),
)


def test_spec_json_gives_back_every_field() -> None:
    doc = json.loads(json.dumps(spec_to_json(FULL)))  # through real JSON text
    assert spec_from_json(doc, "spec.json") == FULL
    plain = PartitionSpec(name="p", image=Path("guest.elf"))  # a relative path ...
    back = spec_from_json(json.loads(json.dumps(spec_to_json(plain))), "spec.json")
    assert back.image == Path("guest.elf").absolute()  # ... is written absolute


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(kind="system"), "not the spec of a partition snapshot"),
    (lambda d: d["partition"].update(cpus="2"), r"partition.cpus: expected int, got str"),
    (lambda d: d["partition"].update(cpus=True), r"partition.cpus: expected int, got bool"),
    (lambda d: d["partition"].update(exits="fast"), r"partition.exits: 'fast' is not a"),
    (lambda d: d["partition"].update(extra=1), r"partition: unknown key 'extra'"),
    (lambda d: d["partition"].update(image="a\0b"), r"partition.image: expected a path"),
    (lambda d: d["partition"].update(pin={"a": 1}), r"partition.pin: expected a list"),
    (lambda d: d["partition"]["serial"].update(path=None), r"partition.serial: serial file"),
    (lambda d: d["partition"]["virtio"].update(blk=[{"readonly": 1}]), r"blk\[0\].readonly"),
    (lambda d: d["partition"].pop("image"), r"partition: .*image"),
    (lambda d: d["partition"]["devices"][0]["params"][0].__setitem__(1, {"a": 1}),
     r"partition.devices\[0\].params\[0\]\[1\]: expected a plain value, got dict"),
])
def test_a_crafted_spec_json_is_one_error_naming_the_key(change: object, message: str) -> None:
    doc = json.loads(json.dumps(spec_to_json(FULL)))
    change(doc)  # type: ignore[operator]
    with pytest.raises(SnapshotError, match=message):
        spec_from_json(doc, "spec.json")


def test_overrides_replace_what_a_clone_must_not_share() -> None:
    o = Overrides(name="clone1", serial=SerialSpec.null(), taps=("tap7",),
                  disks=(Path("/d/clone1.img"),), pin=(1,))
    got = apply(FULL, o, "spec.json")
    assert (got.name, got.serial, got.pin) == ("clone1", SerialSpec.null(), (1,))
    assert got.virtio.net == (NetSpec("tap7"),)
    assert got.virtio.blk == (BlkSpec(Path("/d/clone1.img"), True),)  # still read-only
    assert (got.cpus, got.memory, got.cmdline) == (FULL.cpus, FULL.memory, FULL.cmdline)
    assert apply(FULL, Overrides(), "spec.json") is FULL
    with pytest.raises(SnapshotError, match="the saved guest has 1 TAP; 2 given instead"):
        apply(FULL, Overrides(taps=("a", "b")), "spec.json")
    with pytest.raises(SnapshotError, match="the saved guest has 1 disk; 0 given instead"):
        apply(FULL, Overrides(disks=()), "spec.json")


# --- migration pieces ------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("tcp:127.0.0.1:4444", migrate.Address("tcp", host="127.0.0.1", port=4444)),
    ("tcp:[::1]:80", migrate.Address("tcp", host="::1", port=80)),
    ("unix:/run/x.sock", migrate.Address("unix", path="/run/x.sock")),
])
def test_addresses(text: str, want: migrate.Address) -> None:
    assert migrate.Address.parse(text) == want
    assert str(want) == text


@pytest.mark.parametrize("text", ["tcp:host", "tcp:h:0", "tcp:h:70000", "udp:h:1", "unix:",
                                  "4444", "unix:/" + "x" * 120])
def test_bad_addresses_say_what_is_expected(text: str) -> None:
    with pytest.raises(MigrationError, match="not a migration address|longer than 107"):
        migrate.Address.parse(text)


def test_dirty_pages_go_in_runs() -> None:
    assert list(migrate._runs([])) == []
    assert list(migrate._runs([3, 4, 5, 9, 11, 12])) == [(3, 3), (9, 1), (11, 2)]


def test_the_vmm_s_own_writes_are_tracked_without_losing_one() -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        mem.write(0x3000, b"x")  # not tracked yet
        mem.track_writes()
        mem.write(0x1ff0, bytes(0x20))  # straddles pages 1 and 2
        mem.fill(0x8000, 0x2000)
        mem.discard(0x20000, 0x1000)
        assert mem.take_written() == {1, 2, 8, 9, 0x20}
        assert mem.take_written() == set()
        # Writers racing take_written: every page written is taken exactly once.
        stop = threading.Event()
        pages = range(0, 256)

        def writer() -> None:
            while not stop.is_set():
                for p in pages:
                    mem.write(p * 4096, b"y")

        t = threading.Thread(target=writer)
        t.start()
        taken: set[int] = set()
        for _ in range(50):
            taken |= mem.take_written()
        stop.set()
        t.join()
        taken |= mem.take_written()
        assert taken == set(pages)
        view = mem.span(0x1000, 16)
        with pytest.raises(TypeError):
            view[0] = 1  # a read-only span
        view.release()
        with pytest.raises(GuestMemoryError):
            mem.span((1 << 20) - 8, 16)
        mem.track_writes(False)
        mem.write(0, b"z")
        assert mem.take_written() == set()
    finally:
        mem.close()


def _pair() -> tuple[migrate._Link, socket.socket]:
    a, b = socket.socketpair()
    return migrate._Link(a, "the peer"), b


def test_a_link_refuses_what_is_not_the_protocol() -> None:
    link, other = _pair()
    try:
        other.sendall(struct.pack("<BQ", 99, 0))
        with pytest.raises(MigrationError, match=r"sent a corrupt message \(kind 99"):
            link.expect(migrate.ACCEPT)
        other.sendall(struct.pack("<BQ", migrate.ERROR, 5) + b"nope!")
        with pytest.raises(MigrationError, match="^the peer: nope!$"):
            link.expect(migrate.ACCEPT)
        other.sendall(struct.pack("<BQ", migrate.READY, 0))
        with pytest.raises(MigrationError, match="sent READY, expected ACCEPT"):
            link.expect(migrate.ACCEPT)
        other.sendall(struct.pack("<BQ", migrate.HELLO, migrate.MAX_CONTROL + 1))
        with pytest.raises(MigrationError, match="control message"):
            link.expect(migrate.HELLO)
        other.close()
        with pytest.raises(MigrationError, match="closed the connection"):
            link.expect(migrate.ACCEPT)
        assert link.peer_gone()
    finally:
        link.close()


@pytest.mark.parametrize("hello", [
    b"not json", json.dumps({"protocol": 2}).encode(), json.dumps({"protocol": 1}).encode(),
    json.dumps({"protocol": 1, "ram": [[0, 4096]], "host": "00", "spec": {}, "local": 0}).encode(),
])
def test_a_corrupt_hello_is_refused(hello: bytes) -> None:
    with pytest.raises(MigrationError, match="corrupt HELLO|speaks migration protocol 2"):
        migrate._hello(hello, "the source")


@pytest.mark.parametrize("message, error", [
    (struct.pack("<BQQ", migrate.PAGES, 8 + 4096, 1 << 20) + bytes(4096), "outside RAM"),
    (struct.pack("<BQQ", migrate.PAGES, 8 + 100, 0) + bytes(100), "pages out of turn"),
    (struct.pack("<BQ", migrate.GO, 0), "sent GO during the copy"),
    (struct.pack("<BQ", migrate.ABORT, 4) + b"why!", "the source gave up: why!"),
])
def test_what_a_target_refuses_during_the_copy(message: bytes, error: str) -> None:
    link, other = _pair()
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    incoming = migrate.Incoming({}, [(0, 1 << 20)], False, None)  # type: ignore[arg-type]
    try:
        other.sendall(message)
        with pytest.raises(MigrationError, match=error):
            migrate._take(link, mem, incoming, None)
    finally:
        mem.close()
        link.close()
        other.close()


# --- quiescing ---------------------------------------------------------------------------


def test_a_parked_io_thread_serves_nothing_until_unparked() -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    dev = VirtioMmio(Rng(), mem, lambda msg: None)
    worker = IoThread(dev, "rng-test")
    try:
        drv = FakeDriver(dev, mem)
        drv.start()
        worker.start()
        worker.park()  # acknowledged: the thread now waits
        q = drv.queues[0]
        head = q.add_chain([(0x80000, 32, True)])
        dev.write(REG.QUEUE_NOTIFY, struct.pack("<I", 0))
        # The kick is still waiting in its eventfd: nobody took it.
        assert select.select([dev.notify_fds[0]], [], [], 0)[0]
        assert q.get_used() == []
        worker.unpark()
        assert select.select([dev.interrupt.fd], [], [], 30)[0], "not served after unpark"
        assert q.get_used() == [(head, 32)]
    finally:
        worker.close()
        dev.close()
        mem.close()


def test_held_serial_input_arrives_in_order_after_the_freeze() -> None:
    got: list[bytes] = []
    gate = InputGate(got.append)
    gate.feed(b"a")
    gate.park()
    gate.feed(b"b")
    gate.feed(b"c")
    assert got == [b"a"]
    gate.unpark()
    gate.feed(b"d")
    assert got == [b"a", b"b", b"c", b"d"]
