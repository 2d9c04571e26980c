"""QEMU's firmware configuration device (fw_cfg) on x86 ports: selector, data and DMA.

The register interface of QEMU's docs/specs/fw_cfg.rst, as offsets from the device base
(layout.FW_CFG_PORT, 0x510; the bus gives it FW_CFG_PORT_SIZE ports):

* 0-1, a 16-bit write: the selector (little-endian). Selecting an item rewinds its data
  offset to 0; bit 15 picks the architecture-specific items, bit 14 (QEMU's old write
  channel) is ignored.
* 0 or 1, an 8-bit access: the data register. A read returns the next byte of the
  selected item and advances; past the item's end, or for an item that does not exist,
  it reads 0. Writes are ignored (as in QEMU since 2.4: writes only go through DMA).
* 4-11: the DMA address register, big-endian: 4-7 the high half, 8-11 the low half
  (or one 8-byte write at 4). Writing the low half runs the transfer described by the
  FWCfgDmaAccess at that guest-physical address, then the register is 0 again. Reads
  return the signature "QEMU CFG".

A DMA transfer touches guest RAM only through the bounds-checked GuestMemory: a
descriptor or buffer outside RAM sets the error bit in the descriptor's control word
(when the control word itself is in RAM) and ends the transfer; it never raises. Every
item is read-only to the guest, so a DMA write sets the error bit too.

Items are plain bytes or any object with len() and slicing that returns bytes (a file
read on demand: firmware/fw_cfg.py), so a large kernel or initrd is not copied into the
VMM's heap. Which items a corevisor machine offers, and their contents, is
firmware/fw_cfg.py's business; this module is the register logic and the file directory.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from corevisor.errors import DeviceError, GuestMemoryError
from corevisor.memory import GuestMemory

__all__ = ["FwCfg", "FwCfgState", "Blob", "Item", "file_dir_entries"]

# Selector keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h, hw/i386/fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 2
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3

_WRITE_CHANNEL = 0x4000  # ignored: the selector's old "write" bit
FW_CFG_VERSION = 1 << 0  # FW_CFG_ID: the traditional interface
FW_CFG_VERSION_DMA = 1 << 1  # FW_CFG_ID: the DMA interface
DMA_SIGNATURE = b"QEMU CFG"

# FWCfgDmaAccess.control bits
DMA_CTL_ERROR = 1 << 0
DMA_CTL_READ = 1 << 1
DMA_CTL_SKIP = 1 << 2
DMA_CTL_SELECT = 1 << 3
DMA_CTL_WRITE = 1 << 4
_DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address (big-endian)

FILE_NAME_MAX = 56  # including the NUL
MAX_FILES = 0x1000
_FILE_ENTRY = struct.Struct(">IHH56s")  # size, select, reserved, name
assert _FILE_ENTRY.size == 64 and _DMA_ACCESS.size == 16

# Port offsets from the device base.
_SELECTOR = 0
_DATA = 1
_DMA_HIGH = 4
_DMA_LOW = 8
PORT_SIZE = 12
# A DMA transfer moves data in pieces of at most this much, so a guest asking for 4 GiB
# costs time in its own RAM but never a 4 GiB buffer in the VMM.
_DMA_CHUNK = 1 << 20


class Blob(Protocol):
    """A read-only item that is not held in memory: its size and a way to read a range."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...


Item = bytes | Blob


@dataclass(frozen=True)
class FwCfgState:
    """The guest-visible registers: the selected key, its data offset, the DMA address.

    The items themselves are not state: they are rebuilt from the configuration.
    """

    selector: int = FW_CFG_SIGNATURE
    offset: int = 0
    dma_address: int = 0


def file_dir_entries(files: Mapping[str, Item]) -> list[tuple[str, int, int]]:
    """(name, select key, size) of each file, in the order of the directory.

    Files are sorted by name, as QEMU does for current machine types, so the keys a
    guest sees do not depend on the order in which the VMM added them.
    """
    return [(n, FW_CFG_FILE_FIRST + i, len(files[n])) for i, n in enumerate(sorted(files))]


class FwCfg:
    """The fw_cfg device model (see the module docstring)."""

    def __init__(
        self,
        memory: GuestMemory,
        items: Mapping[int, Item] | None = None,
        files: Mapping[str, Item] | None = None,
    ) -> None:
        self._memory = memory
        self._items: dict[int, Item] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION | FW_CFG_VERSION_DMA),
        }
        self._files: dict[str, Item] = {}
        self._file_keys: dict[int, str] = {}
        for key, item in (items or {}).items():
            self.add_item(key, item)
        for name, item in (files or {}).items():
            self.add_file(name, item)
        self._select(FW_CFG_SIGNATURE)
        self._dma_address = 0

    # --- content (VMM side) ---------------------------------------------------------
    def add_item(self, key: int, item: Item) -> None:
        """Offer item at a fixed key (below FW_CFG_FILE_FIRST, or architecture-specific)."""
        key &= ~_WRITE_CHANNEL
        if not 0 <= key <= 0xFFFF or FW_CFG_FILE_FIRST <= key < FW_CFG_ARCH_LOCAL:
            raise ValueError(f"fw_cfg: key {key:#x} is not a fixed item key")
        self._items[key] = item

    def add_file(self, name: str, item: Item) -> int:
        """Offer item as a named file in the directory; return its key (files sort by name,
        so adding one may renumber the others: add them all before the guest starts)."""
        raw = name.encode("ascii")
        if not raw or len(raw) >= FILE_NAME_MAX or b"\0" in raw:
            raise ValueError(f"fw_cfg: bad file name {name!r}")
        if name in self._files:
            raise ValueError(f"fw_cfg: file {name!r} added twice")
        if len(self._files) >= MAX_FILES:
            raise ValueError(f"fw_cfg: more than {MAX_FILES} files")
        self._files[name] = item
        entries = file_dir_entries(self._files)
        directory = struct.pack(">I", len(entries))
        for n, key, size in entries:
            directory += _FILE_ENTRY.pack(size, key, 0, n.encode("ascii"))
        self._items[FW_CFG_FILE_DIR] = directory
        self._file_keys = {key: n for n, key, _ in entries}
        return next(key for n, key, _ in entries if n == name)

    def item(self, key: int) -> Item | None:
        """The item a selector value reaches, or None."""
        key &= ~_WRITE_CHANNEL
        if key in self._file_keys:
            return self._files[self._file_keys[key]]
        return self._items.get(key)

    # --- registers (guest side) -----------------------------------------------------
    def _select(self, key: int) -> None:
        self._selector = key & 0xFFFF
        self._offset = 0
        self._current = self.item(self._selector)

    def read(self, offset: int, size: int) -> bytes:
        """Data byte at 0 or 1, the DMA signature at 4-11; anything else floats high."""
        if size == 1 and offset in (_SELECTOR, _DATA):
            item = self._current
            if item is None or self._offset >= len(item):
                return b"\0"
            byte = item[self._offset : self._offset + 1]
            self._offset += 1
            return byte if len(byte) == 1 else b"\0"
        if size > 0 and _DMA_HIGH <= offset and offset + size <= _DMA_HIGH + 8:
            return DMA_SIGNATURE[offset - _DMA_HIGH : offset - _DMA_HIGH + size]
        return b"\xff" * max(size, 0)

    def write(self, offset: int, data: bytes) -> None:
        """Selector (16-bit at 0), DMA address halves (32-bit at 4 and 8, or 64-bit at 4)."""
        if offset == _SELECTOR and len(data) == 2:
            self._select(int.from_bytes(data, "little"))
        elif offset == _DMA_HIGH and len(data) == 4:
            self._dma_address = int.from_bytes(data, "big") << 32
        elif offset == _DMA_LOW and len(data) == 4:
            address = self._dma_address | int.from_bytes(data, "big")
            self._dma_address = 0
            self._dma(address)
        elif offset == _DMA_HIGH and len(data) == 8:
            self._dma_address = 0
            self._dma(int.from_bytes(data, "big"))
        # data-register writes and every other access: ignored

    # --- DMA ------------------------------------------------------------------------
    def _dma(self, descriptor: int) -> None:
        """Run one FWCfgDmaAccess; its control word ends 0 (done) or DMA_CTL_ERROR."""
        try:
            control, length, address = _DMA_ACCESS.unpack(self._memory.read(descriptor, 16))
        except GuestMemoryError:
            self._dma_status(descriptor, DMA_CTL_ERROR)
            return
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        if control & DMA_CTL_READ:
            op = DMA_CTL_READ
        elif control & DMA_CTL_WRITE:
            op = DMA_CTL_WRITE
        elif control & DMA_CTL_SKIP:
            op = DMA_CTL_SKIP
        else:
            length = 0
        status = 0
        while length > 0 and not status:
            n = min(length, _DMA_CHUNK)
            status = self._dma_chunk(op, address, n)
            address += n
            length -= n
        self._dma_status(descriptor, status)

    def _dma_chunk(self, op: int, address: int, n: int) -> int:
        """Move n bytes of the selected item at its offset; return an error status or 0."""
        if op == DMA_CTL_WRITE:
            return DMA_CTL_ERROR  # every item is read-only
        item = self._current
        have = 0 if item is None else max(0, len(item) - self._offset)
        take = min(n, have)
        if op == DMA_CTL_READ:
            if not self._memory.writable(address, n):
                return DMA_CTL_ERROR
            data = b"" if item is None or not take else item[self._offset : self._offset + take]
            self._memory.write(address, data.ljust(n, b"\0"))
        self._offset += take
        return 0

    def _dma_status(self, descriptor: int, status: int) -> None:
        try:
            self._memory.write(descriptor, struct.pack(">I", status))
        except GuestMemoryError:
            pass  # the descriptor is not in RAM: there is nowhere to report to

    # --- state ----------------------------------------------------------------------
    def save(self) -> FwCfgState:
        """Capture the selector, the data offset and a half-written DMA address."""
        return FwCfgState(self._selector, self._offset, self._dma_address)

    def restore(self, state: FwCfgState) -> None:
        """Load saved registers after checking them all."""
        if not isinstance(state, FwCfgState):
            raise DeviceError(f"fw_cfg: cannot restore from {type(state).__name__}")
        for name, limit in (("selector", 1 << 16), ("offset", 1 << 32), ("dma_address", 1 << 64)):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value < limit:
                raise DeviceError(f"fw_cfg state: {name}={value!r} is out of range")
        self._select(state.selector)
        self._offset = state.offset
        self._dma_address = state.dma_address
