"""The virtio-mmio v2 transport: registers, negotiation, NEEDS_RESET, save/restore, I/O thread."""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Iterator

import pytest

from corevisor.errors import DeviceError
from corevisor.memory import GuestMemory
from corevisor.virtio.device import (
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from corevisor.virtio.mmio import (
    MAGIC,
    REG,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VirtioMmio,
)
from corevisor.virtio.rng import Rng
from corevisor.virtio.worker import IoThread
from tests.unit.virtio_driver import MIB, FakeDriver


@pytest.fixture
def reports() -> list[str]:
    return []


@pytest.fixture
def dev(mem: GuestMemory, reports: list[str]) -> Iterator[VirtioMmio]:
    d = VirtioMmio(Rng(), mem, reports.append)
    yield d
    d.close()


def test_identity_registers(dev: VirtioMmio) -> None:
    drv = FakeDriver(dev, dev.memory)
    assert drv.r32(REG.MAGIC) == MAGIC
    assert drv.r32(REG.VERSION) == 2
    assert drv.r32(REG.DEVICE_ID) == 4
    assert drv.r32(REG.VENDOR_ID) != 0
    drv.w32(REG.DEVICE_FEATURES_SEL, 1)
    assert drv.r32(REG.DEVICE_FEATURES) & 1  # VERSION_1 is bit 32
    drv.w32(REG.QUEUE_SEL, 0)
    assert drv.r32(REG.QUEUE_NUM_MAX) == 256
    drv.w32(REG.QUEUE_SEL, 1)
    assert drv.r32(REG.QUEUE_NUM_MAX) == 0  # no such queue
    assert dev.read(REG.MAGIC, 2) == b"\0\0"  # registers are 32-bit only
    assert dev.read(0x800, 4) == b"\0" * 4  # past the (empty) config space


def test_features_without_version_1_refused(dev: VirtioMmio, reports: list[str]) -> None:
    drv = FakeDriver(dev, dev.memory)
    drv.negotiate(VIRTIO_F_EVENT_IDX)
    assert not drv.r32(REG.STATUS) & STATUS_FEATURES_OK
    assert "FEATURES_OK refused" in reports[0]
    drv.w32(REG.STATUS, 0)
    assert drv.r32(REG.STATUS) == 0


def test_rng_request_and_interrupt(dev: VirtioMmio, mem: GuestMemory) -> None:
    drv = FakeDriver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1)
    assert dev.active
    q = drv.queues[0]
    head = q.add_chain([(0x80000, 64, True)])
    dev.handle_queue(0)
    assert q.get_used() == [(head, 64)]
    assert mem.read(0x80000, 64) != bytes(64)
    assert drv.r32(REG.INTERRUPT_STATUS) == INT_USED_BUFFER
    assert os.eventfd_read(dev.interrupt.fd) >= 1
    drv.w32(REG.INTERRUPT_ACK, INT_USED_BUFFER)
    assert drv.r32(REG.INTERRUPT_STATUS) == 0


def test_hostile_chain_sets_needs_reset(
    dev: VirtioMmio, mem: GuestMemory, reports: list[str]
) -> None:
    drv = FakeDriver(dev, mem)
    drv.start()
    q = drv.queues[0]
    q.write_desc(q.desc, 0, 0x80000, 8, 3, 1)  # WRITE|NEXT -> 1
    q.write_desc(q.desc, 1, 0x80000, 8, 3, 0)  # WRITE|NEXT -> 0: a loop
    q.publish(0)
    dev.handle_queue(0)
    status = drv.r32(REG.STATUS)
    assert status & STATUS_NEEDS_RESET and status & STATUS_DRIVER_OK
    assert drv.r32(REG.INTERRUPT_STATUS) & INT_CONFIG_CHANGE
    assert drv.r32(REG.CONFIG_GENERATION) == 1
    assert len(reports) == 1 and "needs reset" in reports[0] and "loop" in reports[0]
    # Nothing more happens until reset; then the device works again.
    q.add_chain([(0x80000, 8, True)])
    dev.handle_queue(0)
    assert q.get_used() == []
    drv.queues.clear()
    drv.start()
    q = drv.queues[0]
    head = q.add_chain([(0x80000, 8, True)])
    dev.handle_queue(0)
    assert q.get_used() == [(head, 8)]


def test_bad_queue_layout_fails_at_driver_ok(dev: VirtioMmio, reports: list[str]) -> None:
    drv = FakeDriver(dev, dev.memory)
    drv.negotiate()
    drv.next_free = 2 * MIB - 64  # rings would run past the end of RAM
    drv.setup_queue(0)
    drv.w32(REG.STATUS, 0xF)
    assert drv.r32(REG.STATUS) & STATUS_NEEDS_RESET
    assert "outside guest RAM" in reports[0]


def test_queue_layout_is_frozen_after_ready(dev: VirtioMmio) -> None:
    drv = FakeDriver(dev, dev.memory)
    drv.negotiate()
    drv.setup_queue(0)
    drv.w32(REG.QUEUE_DESC_LOW, 0x4444)
    assert drv.r32(REG.QUEUE_DESC_LOW) != 0x4444


def test_save_restore(dev: VirtioMmio, mem: GuestMemory, reports: list[str]) -> None:
    drv = FakeDriver(dev, mem)
    drv.start(VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC)
    q = drv.queues[0]
    q.add_chain([(0x80000, 8, True)])
    dev.handle_queue(0)
    state = dev.save()
    other = VirtioMmio(Rng(), mem, reports.append)
    try:
        other.restore(state)
        assert other.save() == state
        assert other.active
        head = q.add_chain([(0x80000, 8, True)])
        other.handle_queue(0)
        assert q.get_used()[-1] == (head, 8)
    finally:
        other.close()
    with pytest.raises(DeviceError, match="never offered"):
        dev.restore(state.__class__(**{**state.__dict__, "driver_features": 1 << 60}))


def test_io_thread_serves_kicks_and_raises_irqfd(dev: VirtioMmio, mem: GuestMemory) -> None:
    drv = FakeDriver(dev, mem)
    drv.start()
    worker = IoThread(dev, "rng-test")
    worker.start()
    try:
        q = drv.queues[0]
        head = q.add_chain([(0x80000, 32, True)])
        # The kick, as KVM's ioeventfd would deliver it (no vCPU involved).
        dev.write(REG.QUEUE_NOTIFY, struct.pack("<I", 0))
        assert select.select([dev.interrupt.fd], [], [], 5)[0], "no interrupt within 5 s"
        assert q.get_used() == [(head, 32)]
    finally:
        worker.close()
