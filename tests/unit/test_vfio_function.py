"""A passed-through function's configuration space as the guest sees it (vfio/function.py).

The real device needs an IOMMU, which only the lab has (tests/lab/test_vfio.py drives
QEMU's edu device end to end); here the one justified driver-side fake stands in for
the VFIO device fd: 256 bytes of configuration space with a BAR and a capability list,
region and interrupt info, and a record of what reached it (config writes, SET_IRQS).
The assertions are on what a guest reads back and on what the device was told.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from corevisor.kvm import bindings as b
from corevisor.pci.config import BAR0, CAPABILITIES, COMMAND, INTERRUPT_LINE
from corevisor.vfio.container import Device, IrqInfo, RegionInfo
from corevisor.vfio.function import VfioBar, VfioFunction

CONFIG_OFFSET = 7 << 40  # where VFIO puts a PCI device's config region in its fd
MSI, MSIX, PM = 0x50, 0x60, 0x70


class FakeDevice:
    """A VFIO device fd's answers: edu's IDs, a 1 MiB BAR0, caps MSI -> MSI-X -> PM."""

    def __init__(self, msix_bar: int = 0) -> None:
        cfg = bytearray(256)
        struct.pack_into("<HHHH", cfg, 0, 0x1234, 0x11E8, 0, 0x10)  # COMMAND 0, STATUS caps
        cfg[0x08:0x0C] = bytes([0x10, 0, 0, 0xFF])
        struct.pack_into("<I", cfg, BAR0, 0xFEB00000)  # the host's address: never shown
        cfg[CAPABILITIES] = MSI
        cfg[MSI:MSI + 2] = bytes([0x05, MSIX])
        struct.pack_into("<H", cfg, MSI + 2, 0x80)  # 64-bit, one vector
        cfg[MSIX:MSIX + 2] = bytes([0x11, PM])
        # 4 vectors, the table at msix_bar + 0x800, the PBA at msix_bar + 0xC00
        struct.pack_into("<HII", cfg, MSIX + 2, 3, 0x800 | msix_bar, 0xC00 | msix_bar)
        cfg[PM:PM + 2] = bytes([0x01, 0])
        cfg[0x3D] = 1  # INTA
        self.config = cfg
        self.writes: list[tuple[int, bytes]] = []
        self.irqs: list[tuple[int, int, int]] = []  # (index, action, count)
        self.fd = -1

    def region(self, index: int) -> RegionInfo:
        sizes = {0: 1 << 20, b.VFIO_PCI_CONFIG_REGION_INDEX: 256}
        offset = CONFIG_OFFSET if index == b.VFIO_PCI_CONFIG_REGION_INDEX else index << 40
        return RegionInfo(index, sizes.get(index, 0), offset, b.VFIO_REGION_INFO_FLAG_READ)

    def irq(self, index: int) -> IrqInfo:
        return IrqInfo(index, {0: 1, 1: 1, 2: 4}.get(index, 0), b.VFIO_IRQ_INFO_EVENTFD)

    def pread(self, offset: int, size: int) -> bytes:
        at = offset - CONFIG_OFFSET
        return bytes(self.config[at:at + size])

    def pwrite(self, offset: int, data: bytes) -> None:
        if offset < CONFIG_OFFSET:  # a BAR
            self.writes.append((-1, data))
            return
        at = offset - CONFIG_OFFSET
        self.writes.append((at, data))
        if at == COMMAND:
            self.config[at:at + len(data)] = data

    def set_irqs(self, index: int, action: int, fds: list[int], start: int = 0) -> None:
        self.irqs.append((index, action, len(fds)))

    def close(self) -> None:
        pass


def _function(msix_bar: int = 0) -> tuple[VfioFunction, FakeDevice, list[tuple[int, int, int]]]:
    device = FakeDevice(msix_bar)
    fn = VfioFunction(cast(Device, device), cast(Any, None), "vfio 0000:00:04.0", print)
    routes: list[tuple[int, int, int]] = []
    fn.msi_gsis = [40]
    fn.set_msi_route = lambda gsi, addr, data: routes.append((gsi, addr, data))
    return fn, device, routes


def test_ids_and_pin_are_the_devices_bars_are_the_guests() -> None:
    fn, device, _ = _function()
    assert fn.read(0, 4) == 0x11E81234 and fn.read(0x3D, 1) == 1
    assert fn.read(BAR0, 4) == 0  # not the host's 0xFEB00000: unassigned until placed
    fn.write(BAR0, 4, 0xFFFFFFFF)
    assert fn.read(BAR0, 4) == 0xFFF00000  # sizing: 1 MiB, 32-bit memory
    fn.write(BAR0, 4, 0xC0000000)
    fn.write(INTERRUPT_LINE, 1, 11)
    assert (fn.read(BAR0, 4), fn.read(INTERRUPT_LINE, 1)) == (0xC0000000, 11)
    assert all(at not in (BAR0, INTERRUPT_LINE) for at, _ in device.writes)
    fn.write(COMMAND, 2, 0x6)  # memory decoding and bus mastering reach the device too
    assert (COMMAND, b"\x06\x00") in device.writes and fn.read(COMMAND, 2) == 0x6
    assert fn.windows()[0].base == 0xC0000000


def test_an_msix_table_outside_the_bars_takes_the_capability_out_of_the_list() -> None:
    fn, _, _ = _function(msix_bar=3)  # BAR3 does not exist
    assert fn.msix is None
    assert fn.read(CAPABILITIES, 1) == MSI
    assert fn.read(MSI, 2) == 0x7005  # MSI, next: PM (MSI-X skipped)
    assert fn.read(PM, 2) == 0x0001


def test_msix_enabled_and_a_vector_programmed_in_the_table_routes_it() -> None:
    fn, device, _ = _function()
    assert fn.msix is not None and fn.read(MSI, 2) == 0x6005  # listed: MSI -> MSI-X
    assert fn.read(MSIX, 4) == 0x00037011 and fn.read(MSIX + 4, 4) == 0x800
    routes: list[tuple[int, int, int]] = []
    fn.msix.gsis = [50, 51, 52, 53]
    fn.msix.set_route = lambda gsi, addr, data: routes.append((gsi, addr, data))
    fn.write(MSIX + 2, 2, 0x8000)  # enable
    assert device.irqs[-1] == (b.VFIO_PCI_MSIX_IRQ_INDEX, b.VFIO_IRQ_SET_ACTION_TRIGGER, 4)
    assert fn.read(MSIX + 2, 2) == 0x8003
    bar = VfioBar(cast(Device, device), device.region(0), fn.msix)
    entry = 0x800 + 16 * 2  # vector 2: address, data, then unmask
    bar.write(entry, struct.pack("<I", 0xFEE00000))
    bar.write(entry + 8, struct.pack("<I", 0x45))
    assert routes == []  # still masked (the reset state)
    bar.write(entry + 12, struct.pack("<I", 0))
    assert routes == [(52, 0xFEE00000, 0x45)]
    assert bar.read(entry + 8, 4) == struct.pack("<I", 0x45)
    assert bar.read(0xC00, 8) == bytes(8)  # the PBA: nothing pending
    assert all(at != -1 for at, _ in device.writes)  # the table never reached the device
    bar.write(0x10, b"\x01\x00\x00\x00")  # outside the table: the device's register
    assert device.writes[-1] == (-1, b"\x01\x00\x00\x00")


def test_msi_programmed_by_the_guest_routes_its_vector_and_turns_vfio_msi_on() -> None:
    fn, device, routes = _function()
    fn.intx_fds, fn._intx_on = (-1, -2), True  # INTx wired (wire_intx, without a VM)
    fn.write(MSI + 4, 4, 0xFEE01000)
    fn.write(MSI + 8, 4, 0)
    fn.write(MSI + 12, 2, 0x41)
    assert device.irqs == [] and routes == []
    fn.write(MSI + 2, 2, 0x81)  # enable (the 64-bit bit is read-only and stays)
    assert fn.read(MSI + 2, 2) == 0x81 and fn.read(MSI + 4, 4) == 0xFEE01000
    assert routes == [(40, 0xFEE01000, 0x41)]
    trigger, unmask = b.VFIO_IRQ_SET_ACTION_TRIGGER, b.VFIO_IRQ_SET_ACTION_UNMASK
    intx, msi = b.VFIO_PCI_INTX_IRQ_INDEX, b.VFIO_PCI_MSI_IRQ_INDEX
    assert device.irqs == [(intx, trigger, 0), (msi, trigger, 1)]  # INTx off, then MSI on
    assert all(not MSI <= at < MSI + 14 for at, _ in device.writes)  # emulated, not written
    fn.write(MSI + 12, 2, 0x42)  # a new message while on: a new route, VFIO untouched
    assert routes[-1] == (40, 0xFEE01000, 0x42) and len(device.irqs) == 2
    fn.write(MSI + 2, 2, 0x80)  # off again: MSI off, INTx back (trigger, then its unmask fd)
    assert device.irqs[2:] == [(msi, trigger, 0), (intx, trigger, 1), (intx, unmask, 1)]


def test_hostile_accesses_read_all_ones_and_change_nothing() -> None:
    fn, device, _ = _function()
    assert fn.read(1, 2) == 0xFFFF and fn.read(0, 3) == 0xFFFFFF
    fn.write(3, 2, 0xFFFF)
    fn.write(0x100, 4, 0xFFFFFFFF)
    assert device.writes == [] and fn.read(0x100, 4) == 0
