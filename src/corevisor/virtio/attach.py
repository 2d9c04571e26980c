"""Putting a partition's virtio devices into its VM: windows or slots, GSIs, eventfds, threads.

Placement comes from the machine's resource map (resources.py) and is the same every
time, so a guest (and a restored snapshot) sees the same machine. Order: blk devices,
net devices, rng, console, each in config order. Two transports (spec.Transport):

- virtio-mmio (attach): device i gets the lowest free 4 KiB window of the virtio-mmio
  pool (from 0xC000_0000, the bottom of the hole below 4 GiB) and the first free GSI
  of resources.VIRTIO_GSIS (ISA lines no legacy device of ours uses; 16..23 are the
  channels'); a VirtioMmio on the MMIO bus, one KVM ioeventfd per queue on QueueNotify
  (datamatch = queue index), one edge-triggered irqfd on its GSI. The guest learns
  about the devices twice, as Linux does on x86 without PCI: ``virtio_mmio.device=
  4K@BASE:GSI`` on its command line and a LNRO0005 Device in the DSDT (aml.py).
- virtio-pci (attach_pci): device i is a VirtioPci function in the lowest free slot of
  bus 0 (from slot 1); its BARs are placed by the VMM (no firmware) or by the BIOS
  (pci/platform.py), and its doorbells follow them: a 2-byte ioeventfd per queue on
  the queue's notify address. INTA is a level-triggered irqfd with a resample fd on
  the slot's INTx GSI (layout.pci_intx_gsi); each MSI-X vector has an eventfd, an irqfd
  on a GSI of its own (resources.MSI_GSIS) and a KVM MSI route that follows what the
  guest writes into the vector's table entry (pci/routing.py).

Each device also gets an IoThread that starts with the machine. Everything is owned by
the machine from the moment it exists (an Owner), so a step failing half-way (an irqfd
refused) leaves nothing open.

What does not live here: the generic builder steps (builder.py), the device models, the
transports (mmio.py, pci.py), the PCI bus (pci/).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from corevisor.arch.x86_64 import layout
from corevisor.errors import ConfigError
from corevisor.kvm.ioctls import VmFd
from corevisor.memory import GuestMemory
from corevisor.resources import (
    VIRTIO_GSIS,
    VIRTIO_WINDOW_SIZE,
    VIRTIO_WINDOWS,
    Resources,
    Space,
)
from corevisor.spec import VirtioSpec
from corevisor.virtio.blk import Blk
from corevisor.virtio.common import VirtioTransport
from corevisor.virtio.console import Console
from corevisor.virtio.device import VirtioDevice
from corevisor.virtio.mmio import MMIO_SIZE, REG, VirtioMmio
from corevisor.virtio.net import Net, default_mac, open_tap
from corevisor.virtio.rng import Rng
from corevisor.virtio.worker import IoThread

if TYPE_CHECKING:  # the PCI stack only for machines that have it
    from corevisor.pci.platform import PciPlatform
    from corevisor.virtio.pci import VirtioPci

__all__ = ["Owner", "VirtioSlot", "make_devices", "attach", "attach_pci", "cmdline"]

assert MMIO_SIZE == VIRTIO_WINDOW_SIZE, "resources.py sizes the windows of this transport"


class _Closeable(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closeable)


class Owner(Protocol):
    """What owns the devices from the moment they exist (a Machine)."""

    def own(self, resource: _C) -> _C: ...

    def at_start(self, start: Callable[[], None]) -> None: ...


@dataclass
class VirtioSlot:
    """One placed device: where it is, what raises its interrupt, who serves it.

    A virtio-mmio device has its window (base) and GSI; a virtio-pci one its PCI slot
    and its INTx GSI (base 0: its BARs move with the guest's programming)."""

    name: str
    base: int
    gsi: int
    transport: VirtioTransport
    worker: IoThread
    pci_slot: int | None = None

    @property
    def size(self) -> int:
        """Bytes of its MMIO window."""
        return MMIO_SIZE

    @property
    def mmio(self) -> bool:
        return self.pci_slot is None


def make_devices(
    config: VirtioSpec, partition: str, console_out: Callable[[bytes], None], owner: Owner
) -> list[tuple[str, VirtioDevice]]:
    """Open every backend (images, TAPs) and build the device models, in slot order.

    Each device (and a TAP fd before its device exists) is owned by owner at once.
    """
    where = f"partitions.{partition}"
    if config.count > len(VIRTIO_GSIS):
        raise ConfigError(f"{where}: more than {len(VIRTIO_GSIS)} virtio devices")
    devices: list[tuple[str, VirtioDevice]] = []
    for i, blk in enumerate(config.blk):
        disk = owner.own(Blk(blk.path, blk.readonly, f"{where}.blk[{i}]"))
        devices.append((f"virtio-blk{i}", disk))
    for i, net in enumerate(config.net):
        tap = owner.own(_Fd(open_tap(net.tap, f"{where}.net[{i}]")))
        mac = default_mac(f"{partition}/{net.tap}")
        nic = owner.own(Net(tap.take(), mac, f"virtio-net({net.tap})"))
        devices.append((f"virtio-net{i}", nic))
    if config.rng:
        devices.append(("virtio-rng", owner.own(Rng())))
    if config.console:
        devices.append(("virtio-console", owner.own(Console(console_out))))
    return devices


class _Fd:
    """An fd owned until a device takes it over (take)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def take(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def attach(
    vm: VmFd,
    memory: GuestMemory,
    attach_mmio: Callable[[int, int, VirtioMmio, str], None],
    devices: list[tuple[str, VirtioDevice]],
    report: Callable[[str], None],
    owner: Owner,
    res: Resources,
) -> list[VirtioSlot]:
    """Wire each device into the VM; its I/O thread starts with the owner (at_start).

    attach_mmio(base, size, device, name) is the machine's MMIO bus attach; res the
    machine's resource map, which gives each device its window and GSI. Transports and
    workers are owned by owner as they are made; closing the owner stops each worker
    before its transport (newest first).
    """
    slots: list[VirtioSlot] = []
    for name, device in devices:
        base = res.allocate(Space.GPA, MMIO_SIZE, name, pool=VIRTIO_WINDOWS, align=MMIO_SIZE)
        gsi = res.allocate_from(Space.GSI, VIRTIO_GSIS, name)
        if base is None or gsi is None:
            raise ConfigError(f"{res.name}: no free virtio-mmio window or GSI for {name}")
        transport = owner.own(VirtioMmio(device, memory, report))
        worker = owner.own(IoThread(transport, name))
        slots.append(VirtioSlot(name, base, gsi, transport, worker))
        for q, fd in enumerate(transport.notify_fds):
            vm.ioeventfd(fd, base + REG.QUEUE_NOTIFY, 4, pio=False, datamatch=q)
        vm.irqfd(transport.interrupt.fd, gsi)
        attach_mmio(base, MMIO_SIZE, transport, name)
        owner.at_start(worker.start)
    return slots


def attach_pci(
    platform: PciPlatform,
    vm: VmFd,
    memory: GuestMemory,
    devices: list[tuple[str, VirtioDevice]],
    report: Callable[[str], None],
    owner: Owner,
    place: bool,
) -> list[VirtioSlot]:
    """Put each device on bus 0 as a virtio-pci function (see the module docstring).

    place: the VMM assigns the BARs (no firmware to do it)."""
    from corevisor.pci.platform import Ioeventfd
    from corevisor.virtio.pci import NOTIFY, NOTIFY_MULTIPLIER, REGS_BAR, VirtioPci

    slots: list[VirtioSlot] = []
    for name, device in devices:
        transport = owner.own(VirtioPci(device, memory, report))
        worker = owner.own(IoThread(transport, name))
        doors = [Ioeventfd(NOTIFY + NOTIFY_MULTIPLIER * q, 2, fd)
                 for q, fd in enumerate(transport.notify_fds)]
        slot = platform.add(transport.function, dict(transport.devices), {REGS_BAR: doors})
        gsi = layout.pci_intx_gsi(slot, 1)
        vm.irqfd(transport.interrupt.fd, gsi, resample_fd=transport.pci_interrupt.resample_fd)
        _wire_vectors(platform, vm, transport, name)
        if place:
            platform.place(transport.function)
        slots.append(VirtioSlot(name, 0, gsi, transport, worker, pci_slot=slot))
        owner.at_start(worker.start)
    return slots


def _wire_vectors(platform: PciPlatform, vm: VmFd, transport: VirtioPci, name: str) -> None:
    """One GSI, irqfd and (once programmed) MSI route per MSI-X vector."""
    gsis = [platform.routing.allocate(f"{name} MSI-X vector {v}")
            for v in range(transport.nvectors)]
    for fd, gsi in zip(transport.vector_fds, gsis, strict=True):
        vm.irqfd(fd, gsi)
    msix = transport.msix

    def route(vector: int) -> None:
        address, data, masked = msix.entry(vector)
        if not masked and address:
            platform.routing.set_msi(gsis[vector], address, data)

    msix.on_route = route


def cmdline(base_cmdline: str, slots: list[VirtioSlot]) -> str:
    """The guest command line with Linux's virtio_mmio.device=4K@BASE:GSI per device."""
    extra = " ".join(f"virtio_mmio.device=4K@{s.base:#x}:{s.gsi}" for s in slots if s.mmio)
    if not extra:
        return base_cmdline
    return f"{base_cmdline} {extra}" if base_cmdline else extra
