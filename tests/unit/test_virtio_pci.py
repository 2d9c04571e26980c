"""The virtio-pci transport without KVM: capabilities, common configuration, notification,
ISR and INTx, MSI-X vectors, the PCI-configuration window, save/restore, hostile BAR
accesses. The driver side walks the capabilities the way Linux's virtio_pci_modern does
and lays its queues out with the shared FakeQueue."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corevisor.errors import DeviceError
from corevisor.memory import GuestMemory
from corevisor.pci.config import CAP_ID_MSIX, CAP_ID_VENDOR, COMMAND, STATUS, STATUS_INTERRUPT
from corevisor.virtio.common import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
)
from corevisor.virtio.device import VIRTIO_F_VERSION_1
from corevisor.virtio.pci import (
    COMMON,
    DEVICE,
    ISR,
    NO_VECTOR,
    NOTIFY,
    REGS_BAR,
    VirtioPci,
)
from corevisor.virtio.rng import Rng
from tests.unit.virtio_driver import FakeQueue


class PciDriver:
    """Just enough of a virtio-pci driver: capabilities, common config, queues."""

    def __init__(self, dev: VirtioPci, mem: GuestMemory) -> None:
        self.dev, self.mem, self.next_free = dev, mem, 0x10000
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (bar, offset, cap)
        f = dev.function
        cap = f.read(0x34, 1)
        while cap:
            if f.read(cap, 1) == CAP_ID_VENDOR:
                self.caps[f.read(cap + 3, 1)] = (f.read(cap + 4, 1), f.read(cap + 8, 4), cap)
            cap = f.read(cap + 1, 1)

    def r(self, off: int, size: int) -> int:
        return int.from_bytes(self.dev.bar_read(REGS_BAR, COMMON + off, size), "little")

    def w(self, off: int, size: int, value: int) -> None:
        self.dev.bar_write(REGS_BAR, COMMON + off, value.to_bytes(size, "little"))

    def start(self, features: int = VIRTIO_F_VERSION_1) -> FakeQueue:
        self.w(0x14, 1, 0)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.w(0x08, 4, sel)
            self.w(0x0C, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        self.w(0x16, 2, 0)
        size = self.r(0x18, 2)
        desc, avail, used = 0x10000, 0x11000, 0x12000
        for off, addr in ((0x20, desc), (0x28, avail), (0x30, used)):
            self.w(off, 4, addr & 0xFFFFFFFF)
            self.w(off + 4, 4, addr >> 32)
        self.w(0x1C, 2, 1)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        return FakeQueue(self.mem, size, desc, avail, used)


def _program_vector(dev: VirtioPci, v: int) -> None:
    """Table entry v: the BSP's local APIC, vector 0x40 + v, unmasked (32-bit writes,
    as drivers make them)."""
    for i, word in enumerate((0xFEE0_0000, 0, 0x40 + v, 0)):
        dev.bar_write(1, 16 * v + 4 * i, struct.pack("<I", word))


@pytest.fixture
def dev(mem: GuestMemory) -> Iterator[VirtioPci]:
    d = VirtioPci(Rng(), mem, lambda msg: None)
    yield d
    d.close()


def test_identity_and_capabilities(dev: VirtioPci, mem: GuestMemory) -> None:
    f = dev.function
    assert f.read(0, 4) == 0x1044_1AF4  # 1af4:1040 + rng (4)
    assert f.read(0x08, 1) == 1  # revision 1: non-transitional
    assert f.read(0x3D, 1) == 1  # INTA
    drv = PciDriver(dev, mem)
    assert drv.caps[1][:2] == (REGS_BAR, COMMON) and drv.caps[3][:2] == (REGS_BAR, ISR)
    assert drv.caps[4][:2] == (REGS_BAR, DEVICE) and drv.caps[2][:2] == (REGS_BAR, NOTIFY)
    assert f.read(drv.caps[2][2] + 16, 4) == 4  # notify_off_multiplier
    assert 5 in drv.caps  # the PCI-configuration access window
    kinds = []
    cap = f.read(0x34, 1)
    while cap:
        kinds.append(f.read(cap, 1))
        cap = f.read(cap + 1, 1)
    assert kinds[0] == CAP_ID_MSIX and kinds.count(CAP_ID_VENDOR) == 5


def test_negotiation_queues_and_a_request(dev: VirtioPci, mem: GuestMemory) -> None:
    drv = PciDriver(dev, mem)
    assert drv.r(0x12, 2) == 1  # num_queues
    assert drv.r(0x10, 2) == NO_VECTOR and drv.r(0x1A, 2) == NO_VECTOR
    q = drv.start()
    assert dev.active and drv.r(0x14, 1) & STATUS_DRIVER_OK
    assert drv.r(0x1E, 2) == 0  # queue 0's notify offset
    head = q.add_chain([(0x80000, 32, True)])
    dev.bar_write(REGS_BAR, NOTIFY, b"\0\0")  # reaches the queue's eventfd
    assert os.eventfd_read(dev.notify_fds[0]) >= 1
    dev.handle_queue(0)
    assert q.get_used() == [(head, 32)]
    # INTx: the ISR has the used-buffer bit, the line was raised, PCI status says so
    assert os.eventfd_read(dev.interrupt.fd) >= 1
    assert dev.function.read(STATUS, 2) & STATUS_INTERRUPT
    assert dev.bar_read(REGS_BAR, ISR, 1) == b"\x01"
    assert dev.bar_read(REGS_BAR, ISR, 1) == b"\x00"  # read-to-clear
    assert not dev.function.read(STATUS, 2) & STATUS_INTERRUPT


def test_layout_is_frozen_once_enabled(dev: VirtioPci, mem: GuestMemory) -> None:
    drv = PciDriver(dev, mem)
    drv.start()
    drv.w(0x16, 2, 0)
    drv.w(0x20, 4, 0xDEAD000)
    drv.w(0x18, 2, 8)
    assert drv.r(0x20, 4) == 0x10000 and drv.r(0x18, 2) == 256
    assert drv.r(0x20, 8) == 0x10000  # a 64-bit read of the same field
    drv.w(0x16, 2, 9)  # no such queue: reads as absent
    assert drv.r(0x18, 2) == 0 and drv.r(0x1A, 2) == NO_VECTOR


def test_features_refused_without_version_1(dev: VirtioPci, mem: GuestMemory) -> None:
    drv = PciDriver(dev, mem)
    drv.w(0x08, 4, 0)
    drv.w(0x0C, 4, 0)
    drv.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert not drv.r(0x14, 1) & STATUS_FEATURES_OK


def test_msix_vectors_take_over_from_intx(dev: VirtioPci, mem: GuestMemory) -> None:
    drv = PciDriver(dev, mem)
    msix = dev.msix
    dev.function.write(msix.offset + 2, 2, 0x8000)  # enable MSI-X
    for v in range(2):
        _program_vector(dev, v)
    q = drv.start()
    drv.w(0x16, 2, 0)
    drv.w(0x1A, 2, 1)
    assert drv.r(0x1A, 2) == 1
    drv.w(0x1A, 2, 7)  # more than the function has: refused
    assert drv.r(0x1A, 2) == NO_VECTOR
    drv.w(0x1A, 2, 1)
    drv.w(0x10, 2, 0)
    q.add_chain([(0x80000, 16, True)])
    dev.handle_queue(0)
    assert os.eventfd_read(dev.vector_fds[1]) == 1  # the queue's vector
    assert dev.interrupt.status == 0  # no ISR bits with MSI-X
    with pytest.raises(BlockingIOError):
        os.eventfd_read(dev.interrupt.fd)  # and no INTx
    dev.fail("test")  # NEEDS_RESET: a configuration change on the config vector
    assert drv.r(0x14, 1) & STATUS_NEEDS_RESET
    assert os.eventfd_read(dev.vector_fds[0]) == 1


def test_intx_disable_keeps_the_line_low(dev: VirtioPci, mem: GuestMemory) -> None:
    drv = PciDriver(dev, mem)
    dev.function.write(COMMAND, 2, 0x0400 | 0x2)
    q = drv.start()
    q.add_chain([(0x80000, 16, True)])
    dev.handle_queue(0)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(dev.interrupt.fd)
    assert dev.bar_read(REGS_BAR, ISR, 1) == b"\x01"  # the ISR still tells


def test_pci_configuration_window(dev: VirtioPci, mem: GuestMemory) -> None:
    drv = PciDriver(dev, mem)
    cap = drv.caps[5][2]
    f = dev.function
    f.write(cap + 4, 1, REGS_BAR)
    f.write(cap + 8, 4, COMMON + 0x12)  # num_queues
    f.write(cap + 12, 4, 2)
    assert f.read(cap + 16, 2) == 1
    f.write(cap + 8, 4, COMMON + 0x14)  # device_status, written through the window
    f.write(cap + 12, 4, 1)
    f.write(cap + 16, 1, STATUS_ACKNOWLEDGE)
    assert drv.r(0x14, 1) == STATUS_ACKNOWLEDGE
    f.write(cap + 12, 4, 3)  # a length the window refuses
    assert f.read(cap + 16, 4) in (0, STATUS_ACKNOWLEDGE)


def test_save_restore(dev: VirtioPci, mem: GuestMemory) -> None:
    drv = PciDriver(dev, mem)
    dev.function.place_bar(REGS_BAR, 0xE000_4000)
    dev.function.write(dev.msix.offset + 2, 2, 0x8000)
    _program_vector(dev, 1)
    q = drv.start()
    drv.w(0x16, 2, 0)
    drv.w(0x1A, 2, 1)
    q.add_chain([(0x80000, 16, True)])
    state = dev.save()
    fresh = VirtioPci(Rng(), mem, lambda msg: None)
    try:
        moved = []
        fresh.function.on_window = lambda i, old, new: moved.append((i, new))
        fresh.restore(state)
        assert fresh.active and fresh.queue_vectors == [1] and fresh.msix.enabled
        assert moved and moved[0][1] is not None and moved[0][1].base == 0xE000_4000
        fresh.handle_queue(0)  # the request queued before the save is served after it
        assert os.eventfd_read(fresh.vector_fds[1]) == 1
        with pytest.raises(DeviceError):
            fresh.restore(type(state)(**{**state.__dict__, "queue_vectors": (9,)}))
    finally:
        fresh.close()


@settings(deadline=None, max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([1, 4, 2]), st.integers(-4, 0x4010),
                          st.binary(max_size=9)), max_size=80))
def test_hostile_bar_accesses_never_raise(ops: list[tuple[int, int, bytes]]) -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    d = VirtioPci(Rng(), mem, lambda msg: None)
    try:
        for bar, offset, data in ops:
            d.bar_write(bar, offset, data)
            d.bar_read(bar, offset, len(data))
            d.function.write(offset & 0xFFF, len(data), int.from_bytes(data, "little"))
            d.function.read(offset & 0xFFF, len(data))
            if d.active:
                d.handle_queue(0)
        assert d.function.read(0, 4) == 0x1044_1AF4
        assert d.status & ~0xCF == 0
    finally:
        d.close()
        mem.close()
