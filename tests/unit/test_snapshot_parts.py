"""save()/restore() of every stateful part: state -> restore -> save gives the same state,
a bad state is refused before anything changes, and every part is a Stateful."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from corevisor.channel import (
    Channel,
    ChannelEnd,
    ChannelState,
    DoorbellPort,
    DoorbellPortState,
    ReadOnlyGuard,
    ReadOnlyGuardState,
    ends_for,
)
from corevisor.devices.debug_exit import DebugExit
from corevisor.devices.i8042 import I8042
from corevisor.devices.postcode import PostCode
from corevisor.devices.rtc import Rtc
from corevisor.devices.uart16550 import Uart16550
from corevisor.errors import DeviceError, SnapshotError
from corevisor.hypercall import (
    HYPERCALL_PORT,
    Generation,
    GuestClock,
    HypercallHost,
    Hypercalls,
    HypercallsState,
)
from corevisor.hypercall import handler_table as hypercall_handlers
from corevisor.memory import GuestMemory
from corevisor.snapshot import Stateful, restore_parts, save_parts
from corevisor.snapshot.codec import decode, encode
from corevisor.spec import ChannelSpec, Doorbell
from corevisor.system import Watchdog, WatchdogState
from corevisor.virtio.blk import VIRTIO_BLK_T_IN, Blk, BlkState
from corevisor.virtio.console import RX, Console, ConsoleState
from corevisor.virtio.device import VirtioDevice
from corevisor.virtio.mmio import VirtioMmio
from corevisor.virtio.net import Net, NetState
from corevisor.virtio.rng import Rng, RngState
from tests.unit.virtio_driver import FakeDriver


def _round_trip(make: Any, state: Any) -> Any:
    """Restore state into a fresh part, save it again; also through the codec."""
    other = make()
    other.restore(decode(encode(state)))
    assert other.save() == state
    return other


# --- virtio back ends ----------------------------------------------------------------


def _transport(device: VirtioDevice, mem: GuestMemory) -> tuple[VirtioMmio, FakeDriver]:
    dev = VirtioMmio(device, mem, lambda msg: None)
    drv = FakeDriver(dev, mem)
    drv.start()
    return dev, drv


def test_blk_state_round_trip_and_counters(mem: GuestMemory, image: Path) -> None:
    dev, drv = _transport(Blk(image), mem)
    try:
        mem.write(0x80000, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        drv.queues[0].add_chain([(0x80000, 16, False), (0x90000, 512, True), (0xA0000, 1, True)])
        dev.handle_queue(0)
        state = dev.save()
        assert state.device == BlkState(4096, False, b"disk.img", 1, 0)
    finally:
        dev.close()  # the restored device takes the disk's write lock (inputs.lock_file)
    other = _round_trip(lambda: VirtioMmio(Blk(image), mem, lambda msg: None), state)
    other.close()


def test_blk_refuses_a_disk_of_another_size(mem: GuestMemory, image: Path, tmp_path: Path) -> None:
    dev, _ = _transport(Blk(image), mem)
    bigger = tmp_path / "big.img"
    bigger.write_bytes(bytes(8192))
    other = VirtioMmio(Blk(bigger), mem, lambda msg: None)
    try:
        before = other.save()
        with pytest.raises(DeviceError, match="4096-byte disk"):
            other.restore(dev.save())
        assert other.save() == before  # nothing changed
    finally:
        dev.close()
        other.close()


def test_net_state_keeps_the_mac_the_guest_read(mem: GuestMemory) -> None:
    r, w = os.pipe()  # stands in for the TAP: the state has nothing of the fd
    os.set_blocking(r, False)
    net = Net(r, b"\x52\x54\x00\x01\x02\x03")
    dev, _ = _transport(net, mem)
    try:
        state = dev.save()
        assert state.device == NetState(b"\x52\x54\x00\x01\x02\x03", True, 0, 0, 0, 0)
        r2, w2 = os.pipe()
        other = _round_trip(
            lambda: VirtioMmio(Net(r2, b"\x52\x54\x00\x09\x09\x09"), mem, lambda m: None), state
        )
        assert other.device.mac == b"\x52\x54\x00\x01\x02\x03"
        assert other.read(0x100, 6) == b"\x52\x54\x00\x01\x02\x03"  # config space too
        other.close()
        os.close(w2)
        with pytest.raises(DeviceError, match="mac"):
            net.restore(dataclasses.replace(state.device, mac=b"\x01"))
    finally:
        dev.close()
        os.close(w)


def test_console_pending_input_survives_and_is_delivered(mem: GuestMemory) -> None:
    console = Console(lambda data: None)
    console.enqueue_input(b"typed before the snapshot")
    state = console.save()
    assert state == ConsoleState(b"typed before the snapshot")
    restored = Console(lambda data: None)
    dev, drv = _transport(restored, mem)
    try:
        restored.restore(decode(encode(state)))
        assert restored.save() == state
        head = drv.queues[RX].add_chain([(0x90000, 64, True)])
        dev.handle_queue(RX)
        assert drv.queues[RX].get_used() == [(head, 25)]
        assert mem.read(0x90000, 25) == b"typed before the snapshot"
        with pytest.raises(DeviceError):
            restored.restore(ConsoleState(b"x" * (65 << 10)))
    finally:
        dev.close()
        console.close()


def test_rng_state_is_empty_and_checked() -> None:
    rng = Rng()
    assert rng.save() == RngState()
    _round_trip(Rng, rng.save())
    with pytest.raises(DeviceError):
        rng.restore(BlkState(0, False, b"", 0, 0))  # type: ignore[arg-type]


def test_transport_refuses_a_bad_queue_state_before_changing_anything(mem: GuestMemory) -> None:
    dev, _ = _transport(Rng(), mem)
    try:
        state = dev.save()
        bad_queue = dataclasses.replace(state.queues[0], next_avail=1 << 20)
        fresh = VirtioMmio(Rng(), mem, lambda msg: None)
        before = fresh.save()
        with pytest.raises(DeviceError, match="next_avail"):
            fresh.restore(dataclasses.replace(state, queues=(bad_queue,)))
        with pytest.raises(DeviceError):
            fresh.restore(dataclasses.replace(state, device=NetState(b"", False, 0, 0, 0, 0)))
        assert fresh.save() == before
        fresh.close()
    finally:
        dev.close()


# --- hypercalls, channels, doorbells, guards, watchdog --------------------------------


def test_hypercall_counters_clock_and_generation_round_trip(mem: GuestMemory) -> None:
    host_ns = [5_000]
    host = HypercallHost(memory=mem, console=lambda data: None,
                         clock=GuestClock(lambda: host_ns[0]), generation=Generation(2, 77))
    calls = Hypercalls(mem, hypercall_handlers(host), host.clock, host.generation)
    mem.write(0x1000, struct.pack("<6Q", 0, 0, 0, 0, 0, 0))  # HC_VERSION
    calls.write(0, (0x1000).to_bytes(4, "little"))
    calls.write(0, b"\x01")  # not a call
    assert calls.save() == HypercallsState(calls=1, ignored=1, clock_ns=5_000, generation=2,
                                           generation_id=77)
    # Another host whose monotonic clock reads 9 s: the guest's clock goes on from 5 us.
    other_ns = [9_000_000_000]
    restored = _round_trip(
        lambda: Hypercalls(mem, {}, GuestClock(lambda: other_ns[0])), calls.save()
    )
    other_ns[0] += 1_000
    assert restored.clock.now_ns() == 6_000
    assert (restored.generation.count, restored.generation.ident) == (2, 77)
    with pytest.raises(DeviceError):
        calls.restore(HypercallsState(calls=-1, ignored=0))
    with pytest.raises(DeviceError):
        calls.restore(HypercallsState(calls=0, ignored=0, clock_ns=-1))
    assert HYPERCALL_PORT == 0x500


def _channel(doorbell: Doorbell = Doorbell.KERNEL) -> Channel:
    return Channel(ChannelSpec("link", ("a", "b"), 4096, 0xD000_0000, doorbell=doorbell))


def test_channel_doorbells_waiting_are_kept_and_rung_again() -> None:
    ch = _channel()
    try:
        os.eventfd_write(ch.bells["b"], 2)  # two rings for b, its VM not there to take them
        state = ch.save()
        assert state == ChannelState("link", 4096, (("a", 0), ("b", 2)), ())
        assert os.eventfd_read(ch.bells["b"]) == 2  # saving did not swallow them
        other = _channel()
        try:
            other.restore(decode(encode(state)))
            assert os.eventfd_read(other.bells["b"]) == 2
            with pytest.raises(DeviceError, match="doorbells"):
                other.restore(dataclasses.replace(state, bells=(("c", 1),)))
            with pytest.raises(DeviceError):
                other.restore(dataclasses.replace(state, bells=(("a", 0), ("b", -1))))
        finally:
            other.close()
    finally:
        ch.close()


def test_channel_relay_rings_are_saved_once() -> None:
    ch = _channel(Doorbell.THREAD)
    try:
        os.eventfd_write(ch.rings["a"], 1)
        state = ch.save()
        assert dict(state.rings)["a"] == 1 and dict(state.bells) == {"a": 0, "b": 0}
    finally:
        ch.close()


def test_channel_end_restore_checks_the_place() -> None:
    ch = _channel()
    try:
        (end,) = ends_for("a", [ch])
        state = end.save()
        end.restore(decode(encode(state)))
        moved = dataclasses.replace(end, gpa=0xD010_0000)
        with pytest.raises(DeviceError, match="the guest saw"):
            moved.restore(state)
        assert isinstance(end, ChannelEnd)
    finally:
        ch.close()


def test_doorbell_port_and_guard_round_trip() -> None:
    port = DoorbellPort()
    port.write(0, b"\x07\0\0\0")
    assert port.save() == DoorbellPortState(1)
    _round_trip(DoorbellPort, port.save())
    reports: list[str] = []
    guard = ReadOnlyGuard("link", reports.append)
    guard.write(0, b"x")
    assert guard.save() == ReadOnlyGuardState("link", 1)
    restored = _round_trip(lambda: ReadOnlyGuard("link", reports.append), guard.save())
    restored.write(0, b"y")
    assert len(reports) == 1  # the restored guard knows the first refusal was reported
    with pytest.raises(DeviceError, match="channel other"):
        guard.restore(ReadOnlyGuardState("other", 1))


def test_watchdog_keeps_what_was_left() -> None:
    now = [100.0]
    dog = Watchdog(clock=lambda: now[0])
    dog.kick(500)
    now[0] += 0.2
    state = dog.save()
    assert state == WatchdogState(500, 300)
    later = [5000.0]  # another host's clock: only what was left matters
    other = Watchdog(clock=lambda: later[0])
    other.restore(decode(encode(state)))
    assert other.deadline == pytest.approx(5000.3)
    assert not other.expired(5000.29) and other.expired(5000.3)
    disarmed = Watchdog()
    disarmed.restore(WatchdogState(0, None))
    assert disarmed.deadline is None
    with pytest.raises(DeviceError):
        other.restore(WatchdogState(500, -1))


# --- the protocol and the walk ---------------------------------------------------------


def test_every_stateful_part_satisfies_the_protocol(mem: GuestMemory, image: Path) -> None:
    ch = _channel()
    blk = Blk(image)
    parts: list[object] = [
        Uart16550(lambda data: None, lambda level: None),
        I8042(lambda: None),
        Rtc(),
        PostCode(),
        DebugExit(lambda code: None),
        Hypercalls(mem, {}),
        DoorbellPort(),
        ReadOnlyGuard("link", lambda msg: None),
        VirtioMmio(Rng(), mem, lambda msg: None),
        blk,
        Console(lambda data: None),
        Rng(),
        ch,
        ends_for("a", [ch])[0],
        Watchdog(),
    ]
    try:
        for part in parts:
            assert isinstance(part, Stateful), type(part).__name__
            state = part.save()  # type: ignore[attr-defined]
            assert decode(encode(state)) == state
    finally:
        ch.close()
        blk.close()


def test_restore_parts_refuses_another_machine_before_touching_it() -> None:
    a, b = PostCode(), PostCode()
    a.write(0, b"\x42")
    states = save_parts({"postcode": a})
    with pytest.raises(DeviceError, match=r"parts without state \['extra'\]"):
        restore_parts({"postcode": b, "extra": PostCode()}, states)
    assert b.save().writes == 0
    restore_parts({"postcode": b}, states)
    assert b.last == 0x42


def test_a_device_without_state_support_refuses_with_its_name() -> None:
    class Passthrough(VirtioDevice):
        name = "vfio-0000:01:00.0"

    with pytest.raises(SnapshotError, match="vfio-0000:01:00.0: this device's state cannot"):
        Passthrough().save()
