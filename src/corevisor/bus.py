"""Buses: map an address (I/O port or MMIO address) to the device that owns it.

Devices know only offsets; the bus owns the base addresses. The port-I/O bus keeps a
dict from every owned port to (device, base), so the vCPU exit path costs one dict
lookup. The MMIO bus, whose ranges are large, bisects a sorted list of ranges.
Accesses that hit no device read as all-ones and are ignored on write, as on a PC.

Mappings may change while vCPU threads use the bus (a guest moving a PCI BAR): the MMIO
bus replaces its sorted index with a new tuple in one assignment, so a concurrent
lookup sees the old index or the new one, never half of each.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from corevisor.devices import Device
from corevisor.errors import DeviceError


@dataclass(frozen=True)
class Mapping:
    """One device's address range on a bus."""

    base: int
    size: int
    device: Device
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    """An address space (port I/O or MMIO) of non-overlapping device ranges."""

    def __init__(self, name: str, dense: bool) -> None:
        self.name = name
        self._dense = dense  # per-address dict: right for the 64 KiB port space
        self._by_addr: dict[int, tuple[Device, int]] = {}
        # (starts, mappings), sorted by base: replaced whole, never mutated in place
        self._index: tuple[tuple[int, ...], tuple[Mapping, ...]] = ((), ())
        self.unhandled = 0  # accesses that hit no device

    def attach(self, base: int, size: int, device: Device, name: str) -> None:
        """Give device the range [base, base+size); overlaps are a programming error."""
        starts, maps = self._index
        for m in maps:
            if base < m.end and m.base < base + size:
                raise DeviceError(
                    f"{self.name} bus: {name} at {base:#x}+{size:#x} overlaps {m.name}"
                )
        m = Mapping(base, size, device, name)
        i = bisect.bisect(starts, base)
        self._index = (starts[:i] + (base,) + starts[i:], maps[:i] + (m,) + maps[i:])
        if self._dense:
            for addr in range(base, base + size):
                self._by_addr[addr] = (device, base)

    def detach(self, name: str) -> Mapping | None:
        """Remove the mapping called name (a BAR the guest moved); None if there is none."""
        starts, maps = self._index
        for i, m in enumerate(maps):
            if m.name == name:
                self._index = (starts[:i] + starts[i + 1 :], maps[:i] + maps[i + 1 :])
                if self._dense:
                    for addr in range(m.base, m.end):
                        self._by_addr.pop(addr, None)
                return m
        return None

    def port_map(self) -> dict[int, tuple[Device, int]]:
        """The live address -> (device, base) dict of a dense bus, for the vCPU hot path."""
        if not self._dense:
            raise DeviceError(f"{self.name} bus is not dense: use find()")
        return self._by_addr

    def find(self, addr: int) -> tuple[Device, int] | None:
        """Return (device, base) owning addr, or None."""
        if self._dense:
            return self._by_addr.get(addr)
        starts, maps = self._index
        i = bisect.bisect(starts, addr) - 1
        if i >= 0:
            m = maps[i]
            if addr < m.end:
                return m.device, m.base
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self.find(addr)
        if hit is None:
            self.unhandled += 1
            return b"\xff" * size
        dev, base = hit
        return dev.read(addr - base, size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self.find(addr)
        if hit is None:
            self.unhandled += 1
            return
        dev, base = hit
        dev.write(addr - base, data)

    def mappings(self) -> list[Mapping]:
        return list(self._index[1])
