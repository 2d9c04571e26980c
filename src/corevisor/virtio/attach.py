"""Putting a partition's virtio devices into its VM: windows, GSIs, eventfds, I/O threads.

Placement comes from the machine's resource map (resources.py) and is the same every
time, so a guest (and a restored snapshot) sees the same machine: device i gets the
lowest free 4 KiB window of the virtio-mmio pool (from 0xC000_0000, the bottom of the
hole below 4 GiB) and the first free GSI of resources.VIRTIO_GSIS (ISA lines no legacy
device of ours uses; 16..23 are the channels'). Order: blk devices, net devices, rng,
console, each in config order.

Per device: a VirtioMmio on the MMIO bus, one KVM ioeventfd per queue on QueueNotify
(datamatch = queue index), one irqfd on its GSI, and an IoThread. The guest learns about
the devices twice, as Linux does on x86 without PCI: ``virtio_mmio.device=4K@BASE:GSI``
on its command line and a LNRO0005 Device in the DSDT (arch/x86_64/aml.py).

What does not live here: the generic builder steps (builder.py), the device models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

__all__ = ["VirtioSlot", "make_devices", "attach", "cmdline"]

assert MMIO_SIZE == VIRTIO_WINDOW_SIZE, "resources.py sizes the windows of this transport"


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

    def close(self) -> None:
        self.worker.close()
        self.transport.close()


def make_devices(
    config: VirtioSpec, partition: str, console_out: Callable[[bytes], None]
) -> list[tuple[str, VirtioDevice]]:
    """Open every backend (images, TAPs) and build the device models, in slot order."""
    devices: list[tuple[str, VirtioDevice]] = []
    try:
        for i, blk in enumerate(config.blk):
            devices.append(
                (f"virtio-blk{i}", Blk(blk.path, blk.readonly, f"partitions.{partition}.blk[{i}]"))
            )
        for i, net in enumerate(config.net):
            fd = open_tap(net.tap, f"partitions.{partition}.net[{i}]")
            mac = default_mac(f"{partition}/{net.tap}")
            devices.append((f"virtio-net{i}", Net(fd, mac, f"virtio-net({net.tap})")))
        if config.rng:
            devices.append(("virtio-rng", Rng()))
        if config.console:
            devices.append(("virtio-console", Console(console_out)))
    except BaseException:
        for _, d in devices:
            d.close()
        raise
    if len(devices) > len(VIRTIO_GSIS):
        for _, d in devices:
            d.close()
        raise ConfigError(f"partitions.{partition}: more than {len(VIRTIO_GSIS)} virtio devices")
    return devices


def attach(
    vm: VmFd,
    memory: GuestMemory,
    attach_mmio: Callable[[int, int, VirtioMmio, str], None],
    devices: list[tuple[str, VirtioDevice]],
    report: Callable[[str], None],
    res: Resources,
) -> list[VirtioSlot]:
    """Wire each device into the VM and start its I/O thread; returns the slots.

    attach_mmio(base, size, device, name) is the machine's MMIO bus attach; res the
    machine's resource map, which gives each device its window and GSI. The caller
    closes the slots (after the vCPUs stopped) through VirtioSlot.close.
    """
    slots: list[VirtioSlot] = []
    for name, device in devices:
        base = res.allocate(Space.GPA, MMIO_SIZE, name, pool=VIRTIO_WINDOWS, align=MMIO_SIZE)
        gsi = res.allocate_from(Space.GSI, VIRTIO_GSIS, name)
        if base is None or gsi is None:
            raise ConfigError(f"{res.name}: no free virtio-mmio window or GSI for {name}")
        transport = VirtioMmio(device, memory, report)
        worker = IoThread(transport, name)
        slot = VirtioSlot(name, base, gsi, transport, worker)
        slots.append(slot)
        for q, fd in enumerate(transport.notify_fds):
            vm.ioeventfd(fd, base + REG.QUEUE_NOTIFY, 4, pio=False, datamatch=q)
        vm.irqfd(transport.interrupt.fd, gsi)
        attach_mmio(base, MMIO_SIZE, transport, name)
        worker.start()
    return slots


def cmdline(base_cmdline: str, slots: list[VirtioSlot]) -> str:
    """The guest command line with Linux's virtio_mmio.device=4K@BASE:GSI per device."""
    extra = " ".join(f"virtio_mmio.device=4K@{s.base:#x}:{s.gsi}" for s in slots)
    if not extra:
        return base_cmdline
    return f"{base_cmdline} {extra}" if base_cmdline else extra
