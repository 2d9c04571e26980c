"""One resource allocator per machine: GSIs, I/O ports, guest-physical ranges, memory slots.

Every number a machine hands out — the GSI of a device, the MMIO window of a virtio
device, the port of a legacy device, the KVM memory slot of a region, the address of a
channel — is claimed here, so two claimants can never silently share one: an overlap
is refused with both named (``channels.d.gpa: 0xe0001000+4K overlaps channel c
(0xe0000000-0xe0002000)``).

``machine_map(name, memory, pci=...)`` is a corevisor machine before any device exists:
its RAM, the fixed areas of the address map (arch/x86_64/layout.py), the legacy ports (and
those the in-kernel irqchip and PIT answer) and the GSIs the in-kernel devices use; with PCI
also the configuration ports, the ECAM window, the BAR windows (pools: 32-bit, 64-bit, I/O)
and the INTx GSIs. Validation (config/validate.py) places channels in two partitions' maps
at once; user devices claim the ranges and lines they name (claim_device); the builder
allocates virtio windows and GSIs, PCI BARs and MSI GSIs, memory slots and channel slots
from the machine's map. A pool (the virtio-mmio windows, the PCI windows) is a claim that
only allocations made *from* it may overlap.

What does not live here: the address constants themselves (layout.py; the ABI's ports
in hypercall.py and channel.py), the KVM calls that use the numbers (builder.py).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from corevisor.arch.x86_64 import layout
from corevisor.config.parse import format_size
from corevisor.devices.pm1 import PM1_SIZE
from corevisor.errors import ConfigError
from corevisor.spec import MAX_CHANNELS, MAX_VIRTIO_DEVICES, DeviceSpace, DeviceSpec

__all__ = [
    "Space",
    "Claim",
    "Resources",
    "machine_map",
    "LEGACY_PORTS",
    "FIXED_GSIS",
    "VIRTIO_GSIS",
    "CHANNEL_GSIS",
    "CHANNEL_SLOTS",
    "VIRTIO_WINDOWS",
    "VIRTIO_WINDOW_SIZE",
    "IN_KERNEL_PORTS",
    "DEVICE_GSIS",
    "claim_device",
    "MSI_GSIS",
    "FIRMWARE_SLOTS",
    "PCI_MMIO32",
    "PCI_MMIO64",
    "PCI_IO",
]


class Space(enum.Enum):
    """The kinds of number a machine hands out; each is a separate number line."""

    GSI = "GSI"
    PIO = "port"
    GPA = "guest-physical"
    SLOT = "memory slot"


# The PC devices every guest expects at their usual ports (builder.attach_legacy_devices)
# and the paravirtual ports of docs/paravirt-abi.md (hypercall.py, channel.py).
LEGACY_PORTS: dict[str, tuple[int, int]] = {
    "i8042": (0x60, 5),
    "rtc": (0x70, 2),
    "postcode": (0x80, 1),
    "debug-exit": (0xF4, 4),
    "com1": (layout.COM1_PORT, 8),
    "hypercall": (layout.HYPERCALL_PORT, 4),
    "doorbell": (layout.DOORBELL_PORT, 4),
    "pvpanic": (layout.PVPANIC_PORT, 1),
    "fw-cfg": (layout.FW_CFG_PORT, layout.FW_CFG_PORT_SIZE),
    "pm1": (layout.PM1A_EVT_PORT, PM1_SIZE),
    "pm-timer": (layout.PM_TMR_PORT, 4),
}
# Ports the in-kernel irqchip and PIT answer (builder.attach_irqchip): an access there
# never leaves the kernel, so no device of ours may claim them. (Port 0x61, the PIT's
# speaker port, sits inside the i8042's claim.)
IN_KERNEL_PORTS: dict[str, tuple[int, int]] = {
    "the in-kernel PIC (master)": (0x20, 2),
    "the in-kernel PIT": (0x40, 4),
    "the in-kernel PIC (slave)": (0xA0, 2),
    "the in-kernel PIC's ELCR": (0x4D0, 2),
}
# GSIs of the in-kernel PIT (KVM's default routing puts IRQ0 on IOAPIC pin 0), COM1 and
# the ACPI SCI (level-triggered, its MADT override says so: no edge device may share it).
FIXED_GSIS: dict[str, int] = {
    "the PIT": 0,
    "COM1": layout.COM1_IRQ,
    "the ACPI SCI": layout.SCI_IRQ,
}
# The ISA lines no legacy device of ours uses, one per virtio device, in order (IRQ 3,
# COM2's line on a PC, comes last so the first devices keep the lines they always had).
VIRTIO_GSIS = (5, 6, 7, 10, 11, 12, 14, 15, 3)
# The lines a user device (userdev/) may name: the same free ISA lines. Its line is
# fixed (the guest's driver knows it, as it knows real hardware's), so it is claimed
# first and virtio devices take the next free ones.
DEVICE_GSIS = tuple(sorted(VIRTIO_GSIS))
# IOAPIC pins 16..23, above the ISA interrupts: one per channel, by the partition's index.
CHANNEL_GSIS = range(16, 24)
# KVM memory slots of channel mappings (RAM takes the lowest ones).
CHANNEL_SLOTS = range(16, 16 + len(CHANNEL_GSIS))
assert len(VIRTIO_GSIS) == MAX_VIRTIO_DEVICES and len(CHANNEL_GSIS) == MAX_CHANNELS
VIRTIO_WINDOW_SIZE = 0x1000
VIRTIO_WINDOWS = "the virtio-mmio device windows"
# GSIs above the IOAPIC's 24 pins: one per MSI/MSI-X vector in use (pci/routing.py).
MSI_GSIS = range(24, 1024)
# KVM memory slots of the firmware: its ROM below 4 GiB and the shadow-RAM segments of
# 0xC0000-0xFFFFF (firmware/bios.py), above the channels'.
FIRMWARE_SLOTS = range(CHANNEL_SLOTS.stop, CHANNEL_SLOTS.stop + 16)
PCI_MMIO32 = "the PCI MMIO window below 4 GiB"
PCI_MMIO64 = "the PCI MMIO window above 4 GiB"
PCI_IO = "the PCI I/O port window"


class Claim(NamedTuple):  # a NamedTuple, not a dataclass: cheaper at start-up
    """[start, end) of one space, held by owner; pool claims may be allocated from."""

    space: Space
    start: int
    end: int
    owner: str
    pool: bool = False

    def describe(self) -> str:
        """The claimed range as a message shows it."""
        if self.space is Space.GPA:
            return f"{self.start:#x}-{self.end:#x}"
        if self.space is Space.PIO:
            return f"{self.start:#x}-{self.end - 1:#x}"
        return str(self.start) if self.end == self.start + 1 else f"{self.start}-{self.end - 1}"


def _what(space: Space, start: int, size: int) -> str:
    """The range being claimed, as a message names it."""
    if space is Space.GPA:
        return f"{start:#x}+{format_size(size)}"
    if space is Space.PIO:
        return f"port {start:#x}" + (f"+{size}" if size > 1 else "")
    return f"{space.value} {start}" + (f"-{start + size - 1}" if size > 1 else "")


class Resources:
    """The numbers one machine has handed out, by space."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._claims: dict[Space, list[Claim]] = {s: [] for s in Space}

    def claims(self, space: Space) -> tuple[Claim, ...]:
        return tuple(sorted(self._claims[space], key=lambda c: c.start))

    def conflict(
        self, space: Space, start: int, size: int, pool: str | None = None
    ) -> Claim | None:
        """The first claim [start, start+size) would overlap (pool: allowed inside it)."""
        for c in self._claims[space]:
            if start < c.end and c.start < start + size:
                if pool is not None and c.pool and c.owner == pool:
                    continue
                return c
        return None

    def claim(
        self,
        space: Space,
        start: int,
        size: int,
        owner: str,
        *,
        where: str | None = None,
        pool: str | None = None,
        reserve: bool = False,
    ) -> int:
        """Take [start, start+size) for owner, or raise naming both claimants.

        where: the key the claim comes from, for the message (default the owner);
        pool: the pool claim this one is allocated from; reserve: make this a pool.
        """
        if size <= 0:
            raise ValueError(f"{owner}: empty claim")
        if pool is not None and not self._inside_pool(space, start, size, pool):
            raise ConfigError(f"{where or owner}: {_what(space, start, size)} is outside {pool}")
        other = self.conflict(space, start, size, pool)
        if other is not None:
            raise ConfigError(
                f"{where or owner}: {_what(space, start, size)} overlaps {other.owner} "
                f"({other.describe()})"
            )
        self._claims[space].append(Claim(space, start, start + size, owner, reserve))
        return start

    def _inside_pool(self, space: Space, start: int, size: int, pool: str) -> bool:
        return any(
            c.pool and c.owner == pool and c.start <= start and start + size <= c.end
            for c in self._claims[space]
        )

    def allocate(
        self,
        space: Space,
        size: int,
        owner: str,
        *,
        within: tuple[int, int] | None = None,
        pool: str | None = None,
        align: int = 1,
        also: Sequence[Resources] = (),
    ) -> int | None:
        """Claim the lowest free, aligned [x, x+size) in within (or in pool's range) that
        is free in every map of also too (a channel: both partitions); None if none is."""
        if pool is not None:
            (p,) = [c for c in self._claims[space] if c.pool and c.owner == pool]
            within = (p.start, p.end)
        assert within is not None, "allocate needs within or pool"
        low, high = within
        start = -(-low // align) * align
        maps = (self, *also)
        moved = True
        while moved and start + size <= high:
            moved = False
            for res in maps:
                other = res.conflict(space, start, size, pool if res is self else None)
                if other is not None:
                    start = -(-other.end // align) * align
                    moved = True
        if start + size > high:
            return None
        for res in maps:
            res.claim(space, start, size, owner, pool=pool if res is self else None)
        return start

    def allocate_from(self, space: Space, candidates: Iterable[int], owner: str) -> int | None:
        """Claim the first free number of candidates (a GSI from a list); None if none is."""
        for n in candidates:
            if self.conflict(space, n, 1) is None:
                return self.claim(space, n, 1, owner)
        return None

    def release(self, space: Space, start: int, owner: str) -> None:
        """Give back owner's claim starting at start (a BAR the guest moved away)."""
        claims = self._claims[space]
        for i, c in enumerate(claims):
            if c.start == start and c.owner == owner:
                del claims[i]
                return
        raise KeyError(f"{self.name}: {owner} holds no {space.value} claim at {start:#x}")

    def pool_of(self, space: Space, start: int, size: int) -> str | None:
        """The pool [start, start+size) lies wholly inside, if any."""
        for c in self._claims[space]:
            if c.pool and c.start <= start and start + size <= c.end:
                return c.owner
        return None

    def owner_of(self, space: Space, owner: str) -> Claim:
        """The claim owner holds in space (a legacy device's ports)."""
        for c in self._claims[space]:
            if c.owner == owner:
                return c
        raise KeyError(f"{self.name}: no {space.value} claimed by {owner}")


def machine_map(name: str, memory: int, pci: bool = False) -> Resources:
    """A corevisor machine with memory bytes of RAM before any device: what is fixed.

    pci: the machine has a PCI host bridge (PCI devices, or firmware)."""
    res = Resources(name)
    for gpa, size in layout.ram_layout(memory):
        res.claim(Space.GPA, gpa, size, f"partition {name}'s RAM")
    for start, end, what in layout.FIXED_MMIO:
        res.claim(Space.GPA, start, end - start, what, reserve=what == VIRTIO_WINDOWS)
    for device, (port, size) in (*LEGACY_PORTS.items(), *IN_KERNEL_PORTS.items()):
        res.claim(Space.PIO, port, size, device)
    for device, gsi in FIXED_GSIS.items():
        res.claim(Space.GSI, gsi, 1, device)
    if pci:
        _claim_pci(res, memory)
    return res


def _claim_pci(res: Resources, memory: int) -> None:
    """The PCI host bridge's ports, ECAM, BAR windows and INTx lines (layout.py)."""
    res.claim(Space.PIO, layout.PCI_CONFIG_PORT, 8, "pci-config")
    res.claim(Space.PIO, layout.PCI_IO_START, layout.PCI_IO_END - layout.PCI_IO_START,
              PCI_IO, reserve=True)
    res.claim(Space.GPA, layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, "the PCI ECAM window")
    res.claim(Space.GPA, layout.PCI_MMIO32_START,
              layout.PCI_MMIO32_END - layout.PCI_MMIO32_START, PCI_MMIO32, reserve=True)
    start, end = layout.pci64_window(memory)
    res.claim(Space.GPA, start, end - start, PCI_MMIO64, reserve=True)
    for gsi in sorted(set(layout.PCI_PIRQ_GSIS)):
        res.claim(Space.GSI, gsi, 1, "PCI INTx")


def claim_device(res: Resources, device: DeviceSpec, where: str) -> None:
    """A user device's ports or MMIO range and its line, or a ConfigError naming where and
    what it overlaps (validation and the builder both claim through here). A PCI
    function claims nothing here: its BARs are claimed where the PCI platform places
    them, and its INTx line is PCI's (pci/platform.py)."""
    if device.space is DeviceSpace.PCI:
        return
    space = Space.PIO if device.space is DeviceSpace.PORT else Space.GPA
    owner = f"device {device.name}"
    res.claim(space, device.base, device.size, owner, where=where)
    if device.gsi is None:
        return
    res.claim(Space.GSI, device.gsi, 1, owner, where=where)  # a fixed line's owner named
    if device.gsi not in DEVICE_GSIS:
        raise ConfigError(
            f"{where}: GSI {device.gsi} is not a line a device may use (the free ISA lines: "
            f"{', '.join(map(str, DEVICE_GSIS))})"
        )
