"""Putting a partition's virtio devices into its VM: windows, GSIs, eventfds, I/O threads.

Placement comes from the machine's resource map (resources.py) and is the same every
time, so a guest (and a restored snapshot) sees the same machine: device i gets the
lowest free 4 KiB window of the virtio-mmio pool (from 0xC000_0000, the bottom of the
hole below 4 GiB) and the first free GSI of resources.VIRTIO_GSIS (ISA lines no legacy
device of ours uses; 16..23 are the channels'). Order: blk devices, net devices, rng,
console, each in config order.

Per device: a VirtioMmio on the MMIO bus, one KVM ioeventfd per queue on QueueNotify
(datamatch = queue index), one irqfd on its GSI, and an IoThread that starts with the
machine. Everything is owned by the machine from the moment it exists (an Owner), so a
step failing half-way (an irqfd refused) leaves nothing open. The guest learns about
the devices twice, as Linux does on x86 without PCI: ``virtio_mmio.device=4K@BASE:GSI``
on its command line and a LNRO0005 Device in the DSDT (arch/x86_64/aml.py).

What does not live here: the generic builder steps (builder.py), the device models.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

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
from corevisor.virtio.console import Console
from corevisor.virtio.device import VirtioDevice
from corevisor.virtio.mmio import MMIO_SIZE, REG, VirtioMmio
from corevisor.virtio.net import Net, default_mac, open_tap
from corevisor.virtio.rng import Rng
from corevisor.virtio.worker import IoThread

__all__ = ["Owner", "VirtioSlot", "make_devices", "attach", "cmdline"]

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
    """One placed device: where it is, what raises its interrupt, who serves it."""

    name: str
    base: int
    gsi: int
    transport: VirtioMmio
    worker: IoThread

    @property
    def size(self) -> int:
        """Bytes of its MMIO window."""
        return MMIO_SIZE


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


def cmdline(base_cmdline: str, slots: list[VirtioSlot]) -> str:
    """The guest command line with Linux's virtio_mmio.device=4K@BASE:GSI per device."""
    extra = " ".join(f"virtio_mmio.device=4K@{s.base:#x}:{s.gsi}" for s in slots)
    if not extra:
        return base_cmdline
    return f"{base_cmdline} {extra}" if base_cmdline else extra
