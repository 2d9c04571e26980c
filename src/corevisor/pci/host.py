"""Bus 0 and how a guest reaches it: ports 0xCF8/0xCFC, ECAM, and the host bridge itself.

PciRoot is the one bus of a corevisor PC: up to 32 single-function slots, slot 0 being
the host bridge. Two Devices (devices/__init__.py protocol) give the guest its
configuration space:

- ConfigPorts, configuration mechanism #1 (PCI 3.0, 3.2.2.3.2) at 0xCF8-0xCFF: a 32-bit
  write to 0xCF8 latches {enable bit 31, bus, device, function, register}, and 1-, 2- or
  4-byte accesses to 0xCFC-0xCFF reach that dword's bytes. As on PIIX and ICH chipsets,
  a byte written to 0xCF9 is the reset control register: bit 2 resets the machine (Linux's
  ``reboot=pci``).
- Ecam, the memory-mapped configuration space (PCIe 3.0, 7.2.2): 4 KiB per function at
  (bus << 20 | device << 15 | function << 12), described to the guest by the ACPI MCFG
  table; one bus, so the window is 1 MiB.

Anything not on bus 0, an empty slot, a function other than 0, or a malformed access
reads as all ones and is ignored on write — what a PC returns for "no device".

HostBridge is function 00.0: an Intel 440FX (8086:1237) with QEMU's subsystem IDs
(1af4:1100), because that is how SeaBIOS recognises the machine it runs on (its
qemu_detect and make_bios_writable: fw/paravirt.c, fw/shadow.c) and the only north
bridge whose shadow-RAM control it drives. Its PAM registers (0x59-0x5F, 440FX
datasheet 3.2.18) say, per 16 KiB of 0xC0000-0xEFFFF and for the 64 KiB at 0xF0000,
whether reads and writes go to RAM or to the BIOS ROM; they matter only on a machine
with firmware, which sets ``on_pam`` (firmware/bios.py maps the memory slots).

What does not live here: one function's registers (config.py), the virtio functions
(virtio/pci.py), BAR placement and mapping (platform.py), the addresses (layout.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError
from corevisor.pci.config import (
    EXT_CONFIG_SIZE,
    NO_DEVICE,
    PciFunction,
    PciFunctionState,
)
from corevisor.snapshot import require_state, require_uint

__all__ = [
    "PciRoot",
    "ConfigPorts",
    "ConfigPortsState",
    "Ecam",
    "HostBridge",
    "HostBridgeState",
    "SLOTS",
    "ECAM_BUS_SIZE",
    "CONFIG_PORTS_SIZE",
    "PAM0",
    "PAM_REGISTERS",
    "pam_segments",
]

SLOTS = 32
ECAM_BUS_SIZE = 1 << 20  # 32 devices x 8 functions x 4 KiB
CONFIG_PORTS_SIZE = 8  # 0xCF8-0xCFF
_ADDRESS_ENABLE = 1 << 31
_RESET_CONTROL = 1  # 0xCF9, as an offset from 0xCF8
_RESET_CPU = 1 << 2

# The 440FX north bridge (Intel 82441FX PMC), as QEMU presents it to SeaBIOS.
I440FX_VENDOR = 0x8086
I440FX_DEVICE = 0x1237
QEMU_SUBSYSTEM_VENDOR = 0x1AF4
QEMU_SUBSYSTEM = 0x1100
CLASS_HOST_BRIDGE = 0x060000
PAM0 = 0x59
PAM_REGISTERS = 7


def pam_segments(pam: bytes) -> list[tuple[int, int, int]]:
    """(start, end, mode) for every shadow-RAM segment the PAM bytes control.

    mode is the 2-bit field of the datasheet: bit 0 reads from RAM, bit 1 writes to RAM
    (0: both go to the ROM/PCI side). PAM0's high nibble is 0xF0000-0xFFFFF; PAMn (n >=
    1) holds two 16 KiB segments from 0xC0000 + (n - 1) * 32 KiB, low nibble first.
    """
    out = [(0xF0000, 0x100000, (pam[0] >> 4) & 3)]
    for n in range(1, PAM_REGISTERS):
        base = 0xC0000 + (n - 1) * 0x8000
        out.append((base, base + 0x4000, pam[n] & 3))
        out.append((base + 0x4000, base + 0x8000, (pam[n] >> 4) & 3))
    return sorted(out)


@dataclass(frozen=True)
class HostBridgeState:
    """The host bridge's configuration space (the PAM bytes are in it)."""

    config: PciFunctionState


class HostBridge(PciFunction):
    """Function 00.0: an i440FX with QEMU's subsystem IDs and live PAM registers."""

    def __init__(self) -> None:
        super().__init__(
            vendor=I440FX_VENDOR,
            device=I440FX_DEVICE,
            class_code=CLASS_HOST_BRIDGE,
            revision=2,
            subsystem_vendor=QEMU_SUBSYSTEM_VENDOR,
            subsystem=QEMU_SUBSYSTEM,
            name="host bridge",
        )
        # PAM0's low nibble is reserved; the others are two 2-bit fields each.
        self._mask(PAM0, 1, 0x30)
        self._mask(PAM0 + 1, PAM_REGISTERS - 1, int.from_bytes(b"\x33" * 6, "little"))
        self.on_pam: Callable[[bytes], None] | None = None
        self._pam = self.pam()

    def pam(self) -> bytes:
        return self.get(PAM0, PAM_REGISTERS).to_bytes(PAM_REGISTERS, "little")

    def config_written(self, offset: int, size: int) -> None:
        if offset < PAM0 + PAM_REGISTERS and PAM0 < offset + size:
            self._pam_changed()

    def _pam_changed(self) -> None:
        pam = self.pam()
        if pam != self._pam:
            self._pam = pam
            if self.on_pam is not None:
                self.on_pam(pam)

    def save(self) -> HostBridgeState:  # type: ignore[override]
        return HostBridgeState(super().save())

    def restore(self, state: HostBridgeState) -> None:  # type: ignore[override]
        st = require_state("host bridge", state, HostBridgeState)
        config = self.check_state(st.config)
        self.load_state(config)
        self._pam = b""  # re-announce whatever the saved PAM bytes say
        self._pam_changed()


class PciRoot:
    """Bus 0: the functions by slot, reached by bus/device/function/register."""

    def __init__(self, host_bridge: PciFunction | None = None) -> None:
        self.slots: dict[int, PciFunction] = {}
        if host_bridge is not None:
            self.add(host_bridge, 0)

    def add(self, function: PciFunction, slot: int) -> None:
        if not 0 <= slot < SLOTS or slot in self.slots:
            raise ValueError(f"PCI slot {slot} is taken or does not exist")
        self.slots[slot] = function

    def free_slot(self) -> int | None:
        """The lowest empty slot (device order is slot order: the same machine every time)."""
        return next((s for s in range(1, SLOTS) if s not in self.slots), None)

    def function(self, bus: int, device: int, function: int) -> PciFunction | None:
        if bus or function:
            return None
        return self.slots.get(device)

    def read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        fn = self.function(bus, device, function)
        if fn is None:
            return (1 << (8 * size)) - 1 if 0 < size <= 4 else NO_DEVICE
        return fn.read(offset, size)

    def write(self, bus: int, device: int, function: int, offset: int, size: int,
              value: int) -> None:
        fn = self.function(bus, device, function)
        if fn is not None:
            fn.write(offset, size, value)


@dataclass(frozen=True)
class ConfigPortsState:
    """The latched CONFIG_ADDRESS register."""

    address: int = 0


class ConfigPorts:
    """Configuration mechanism #1 at 0xCF8-0xCFF (see the module docstring)."""

    def __init__(self, root: PciRoot, reset: Callable[[], None]) -> None:
        self.root = root
        self._reset = reset
        self._address = 0
        self._lock = threading.Lock()  # the address latch and the access it selects

    def _target(self) -> tuple[int, int, int, int] | None:
        a = self._address
        if not a & _ADDRESS_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7, a & 0xFC

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and size == 4:
            return self._address.to_bytes(4, "little")
        if offset < 4 or size not in (1, 2, 4) or offset + size > CONFIG_PORTS_SIZE:
            return b"\xff" * max(size, 0)
        with self._lock:
            target = self._target()
            if target is None:
                return b"\xff" * size
            bus, dev, fn, reg = target
            value = self.root.read(bus, dev, fn, reg + offset - 4, size)
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            self._address = int.from_bytes(data, "little") & 0x80FFFFFC
            return
        if offset == _RESET_CONTROL and size == 1:
            if data[0] & _RESET_CPU:
                self._reset()
            return
        if offset < 4 or size not in (1, 2, 4) or offset + size > CONFIG_PORTS_SIZE:
            return
        with self._lock:
            target = self._target()
            if target is None:
                return
            bus, dev, fn, reg = target
            self.root.write(bus, dev, fn, reg + offset - 4, size, int.from_bytes(data, "little"))

    def save(self) -> ConfigPortsState:
        return ConfigPortsState(self._address)

    def restore(self, state: ConfigPortsState) -> None:
        st = require_state("PCI config ports", state, ConfigPortsState)
        value = require_uint("PCI config ports", "address", st.address, 32)
        if value & ~0x80FFFFFC:
            raise DeviceError(f"PCI config ports state: address {value:#x} has reserved bits")
        self._address = value


class Ecam:
    """The memory-mapped configuration space of bus 0 (stateless: every access is
    self-contained)."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    @staticmethod
    def _split(offset: int) -> tuple[int, int, int, int]:
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF

    def read(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4) or offset % size or (offset & 0xFFF) + size > EXT_CONFIG_SIZE:
            return b"\xff" * max(size, 0)
        bus, dev, fn, reg = self._split(offset)
        value = self.root.read(bus, dev, fn, reg, size)
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (1, 2, 4) or offset % size:
            return
        bus, dev, fn, reg = self._split(offset)
        self.root.write(bus, dev, fn, reg, size, int.from_bytes(data, "little"))

