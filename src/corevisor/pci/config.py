"""One PCI function's configuration space: header, write masks, BARs, capabilities.

PciFunction holds the 4 KiB a function answers with (256 bytes of standard space, the
rest of ECAM's extended space reads as zero), plus two masks that say, per bit, what a
guest write does: ``wmask`` bits are writable, ``w1cmask`` bits are cleared by writing
1 (status errors). Everything else is read-only, so a guest can never change a vendor
ID, a BAR's size or type bits, or a capability's layout. Accesses are 1, 2 or 4 bytes
inside the space; anything else reads as all ones and is ignored on write (a hostile
guest's odd access never raises).

BARs (PCI 3.0, 6.2.5.1) are declared with their size and kind (I/O, 32- or 64-bit
memory); the write mask of each BAR register is what makes sizing work: writing all
ones reads back ~(size - 1) plus the type bits. What a function *decodes* is derived,
never stored: a BAR with its decode bit on in COMMAND (I/O or memory space) and a
non-zero address is a BarWindow. After every write that could change that set (COMMAND,
a BAR register), the function compares it with the last one and tells its platform
(``on_window``: platform.py moves the bus mapping and its ioeventfds).

Capabilities are added at build time (add_capability) and chained from 0x34 upwards
from 0x40; one may take a Capability handler that sees the guest's writes to it after
the mask was applied, and may answer reads dynamically (MSI-X's control word, virtio's
PCI-configuration access window).

What does not live here: how a function is reached (host.py), MSI-X/MSI state
(msix.py, msi.py), placing BARs and mapping them (platform.py).
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from corevisor.errors import DeviceError
from corevisor.snapshot import require_bytes, require_state

__all__ = [
    "PciFunction",
    "PciFunctionState",
    "Bar",
    "BarKind",
    "BarWindow",
    "Capability",
    "CONFIG_SIZE",
    "EXT_CONFIG_SIZE",
    "VENDOR_ID",
    "DEVICE_ID",
    "COMMAND",
    "STATUS",
    "REVISION",
    "CLASS",
    "HEADER_TYPE",
    "BAR0",
    "SUBSYSTEM_VENDOR_ID",
    "SUBSYSTEM_ID",
    "CAPABILITIES",
    "INTERRUPT_LINE",
    "INTERRUPT_PIN",
    "COMMAND_IO",
    "COMMAND_MEMORY",
    "COMMAND_MASTER",
    "COMMAND_INTX_DISABLE",
    "STATUS_INTERRUPT",
    "STATUS_CAP_LIST",
    "CAP_ID_MSI",
    "CAP_ID_VENDOR",
    "CAP_ID_MSIX",
    "NO_DEVICE",
]

CONFIG_SIZE = 256  # through 0xCF8/0xCFC
EXT_CONFIG_SIZE = 4096  # through ECAM

# Type-0 header registers (PCI 3.0, 6.1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS = 0x09  # prog-if, subclass, class: 3 bytes
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
NUM_BARS = 6
FIRST_CAPABILITY = 0x40

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
_COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR
    | COMMAND_INTX_DISABLE
)
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
# Error bits a guest clears by writing 1: parity, signalled/received aborts, SERR.
_STATUS_W1C = 0xF900

CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11

BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_PREFETCH = 0x8
NO_DEVICE = 0xFFFFFFFF  # what an absent function (or a bad access) reads as


class BarKind(enum.Enum):
    """The address space a BAR decodes in and how wide its address register is."""

    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class Bar:
    """A BAR as the device declares it: which register, how big, which kind."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size & (self.size - 1) or not 0 < self.size:
            raise ValueError(f"BAR{self.index}: size {self.size:#x} is not a power of 2")
        if self.kind is BarKind.IO and not 4 <= self.size <= 256:
            raise ValueError(f"BAR{self.index}: an I/O BAR is 4-256 ports, not {self.size}")
        if self.kind is not BarKind.IO and self.size < 16:
            raise ValueError(f"BAR{self.index}: a memory BAR is at least 16 bytes")
        if self.kind is BarKind.MEM32 and self.size > 1 << 31:
            raise ValueError(f"BAR{self.index}: {self.size:#x} is too big for 32 bits")
        last = self.index + (1 if self.kind is BarKind.MEM64 else 0)
        if not 0 <= self.index or last >= NUM_BARS:
            raise ValueError(f"BAR{self.index}: no such BAR register")

    @property
    def io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.io:
            return BAR_IO
        bits = BAR_MEM_64 if self.kind is BarKind.MEM64 else 0
        return bits | (BAR_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True)
class BarWindow:
    """What a BAR decodes right now: port or memory space, base, size."""

    io: bool
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


class Capability(Protocol):
    """A capability's behaviour beyond plain bytes (offsets relative to the capability)."""

    def read(self, offset: int, size: int, value: int) -> int:
        """The value to return for a read that stored bytes would answer with value."""
        ...

    def written(self, offset: int, size: int) -> None:
        """The guest wrote [offset, offset+size) (after the write masks applied)."""
        ...


@dataclass(frozen=True)
class PciFunctionState:
    """The first 256 bytes of configuration space: everything a guest can change there
    (the extended space holds nothing writable). Capability and BAR behaviour is
    rebuilt from these bytes on restore."""

    config: bytes


class PciFunction:
    """One function's configuration space (see the module docstring).

    on_window(index, old, new) is called (lock not held) when BAR index starts,
    stops or moves decoding; the platform sets it.
    """

    def __init__(
        self,
        *,
        vendor: int,
        device: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor: int = 0,
        subsystem: int = 0,
        interrupt_pin: int = 0,
        bars: Sequence[Bar] = (),
        name: str = "pci",
    ) -> None:
        self.name = name
        self._lock = threading.RLock()
        self._cfg = bytearray(EXT_CONFIG_SIZE)
        self._wmask = bytearray(EXT_CONFIG_SIZE)
        self._w1c = bytearray(EXT_CONFIG_SIZE)
        self._caps: list[tuple[int, int, Capability | None]] = []
        self._next_cap = FIRST_CAPABILITY
        self._last_cap = 0  # the offset of the last capability's next pointer (0: none)
        self.bars: dict[int, Bar] = {}
        self.on_window: Callable[[int, BarWindow | None, BarWindow | None], None] = (
            lambda index, old, new: None
        )
        self._set(VENDOR_ID, 2, vendor)
        self._set(DEVICE_ID, 2, device)
        self._set(REVISION, 1, revision)
        self._set(CLASS, 3, class_code)
        self._set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self._set(SUBSYSTEM_ID, 2, subsystem)
        self._set(INTERRUPT_PIN, 1, interrupt_pin)
        self._mask(COMMAND, 2, _COMMAND_WRITABLE)
        self._mask(STATUS, 2, _STATUS_W1C, w1c=True)
        self._mask(CACHE_LINE_SIZE, 1, 0xFF)
        self._mask(LATENCY_TIMER, 1, 0xFF)
        self._mask(INTERRUPT_LINE, 1, 0xFF)
        for bar in bars:
            self._declare_bar(bar)
        self._windows = self._decoded()

    # --- building (VMM side) ----------------------------------------------------------
    def _set(self, offset: int, size: int, value: int) -> None:
        self._cfg[offset : offset + size] = value.to_bytes(size, "little")

    def _mask(self, offset: int, size: int, bits: int, w1c: bool = False) -> None:
        target = self._w1c if w1c else self._wmask
        target[offset : offset + size] = bits.to_bytes(size, "little")

    def _declare_bar(self, bar: Bar) -> None:
        for other in self.bars.values():
            taken = {other.index, other.index + (other.kind is BarKind.MEM64)}
            if {bar.index, bar.index + (bar.kind is BarKind.MEM64)} & taken:
                raise ValueError(f"{self.name}: BAR{bar.index} overlaps BAR{other.index}")
        self.bars[bar.index] = bar
        reg = BAR0 + 4 * bar.index
        self._set(reg, 4, bar.type_bits)
        low = ~(bar.size - 1) & (0xFFFFFFFC if bar.io else 0xFFFFFFF0) & 0xFFFFFFFF
        self._mask(reg, 4, low)
        if bar.kind is BarKind.MEM64:
            self._mask(reg + 4, 4, (~(bar.size - 1) >> 32) & 0xFFFFFFFF)

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        wmask: bytes = b"",
        handler: Capability | None = None,
    ) -> int:
        """Append a capability (body: its bytes after the ID and next pointer; wmask: the
        writable bits of body, zero-padded); return its offset in configuration space."""
        length = 2 + len(body)
        offset = self._next_cap
        if offset + length > CONFIG_SIZE:
            raise ValueError(f"{self.name}: capabilities do not fit in 256 bytes")
        self._cfg[offset] = cap_id
        self._cfg[offset + 2 : offset + length] = body
        self._wmask[offset + 2 : offset + 2 + len(wmask)] = wmask
        if self._last_cap:
            self._cfg[self._last_cap] = offset
        else:
            self._cfg[CAPABILITIES] = offset
            self._cfg[STATUS] |= STATUS_CAP_LIST
        self._last_cap = offset + 1
        self._next_cap = (offset + length + 3) & ~3
        self._caps.append((offset, length, handler))
        return offset

    # --- what the function decodes ------------------------------------------------------
    def _u32(self, offset: int) -> int:
        value: int = struct.unpack_from("<I", self._cfg, offset)[0]
        return value

    def command(self) -> int:
        return self._cfg[COMMAND] | self._cfg[COMMAND + 1] << 8

    def bar_address(self, index: int) -> int:
        """The address BAR index holds (its type bits stripped), decoded or not."""
        bar = self.bars[index]
        reg = BAR0 + 4 * index
        value = self._u32(reg) & (0xFFFFFFFC if bar.io else 0xFFFFFFF0)
        if bar.kind is BarKind.MEM64:
            value |= self._u32(reg + 4) << 32
        return value

    def _decoded(self) -> dict[int, BarWindow]:
        cmd = self.command()
        out: dict[int, BarWindow] = {}
        for index, bar in self.bars.items():
            if not cmd & (COMMAND_IO if bar.io else COMMAND_MEMORY):
                continue
            base = self.bar_address(index)
            if base:
                out[index] = BarWindow(bar.io, base, bar.size)
        return out

    def windows(self) -> dict[int, BarWindow]:
        """The BARs decoding right now, by index."""
        with self._lock:
            return dict(self._windows)

    def place_bar(self, index: int, base: int) -> None:
        """Firmware's job done by the VMM: give BAR index the address base and turn on
        its decoding (the platform's allocator chose base from the machine's windows)."""
        bar = self.bars[index]
        if base % bar.size:
            raise ValueError(f"{self.name}: BAR{index} at {base:#x} is not size-aligned")
        with self._lock:
            reg = BAR0 + 4 * index
            self._set(reg, 4, (base & 0xFFFFFFFF) | bar.type_bits)
            if bar.kind is BarKind.MEM64:
                self._set(reg + 4, 4, base >> 32)
            cmd = self.command() | (COMMAND_IO if bar.io else COMMAND_MEMORY)
            self._set(COMMAND, 2, cmd)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute the decoded windows and tell the platform what changed."""
        with self._lock:
            old, new = self._windows, self._decoded()
            self._windows = new
        for index in sorted(set(old) | set(new)):
            if old.get(index) != new.get(index):
                self.on_window(index, old.get(index), new.get(index))

    # --- the guest's accesses -------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A 1-, 2- or 4-byte read (naturally aligned); all ones for anything else."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= EXT_CONFIG_SIZE - size:
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else NO_DEVICE
        with self._lock:
            value = int.from_bytes(self._cfg[offset : offset + size], "little")
        # Handlers run without the lock: one may take its device's lock (virtio's
        # configuration-access window reads a BAR), while a device holding its own lock
        # may update this space (the interrupt-status bit).
        for cap_off, length, handler in self._caps:
            if handler is not None and cap_off < offset + size and offset < cap_off + length:
                value = handler.read(offset - cap_off, size, value)
        return self.config_read(offset, size, value)

    def config_read(self, offset: int, size: int, value: int) -> int:
        """Subclasses' hook for header fields that are not stored bytes."""
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """A 1-, 2- or 4-byte write through the write masks; anything else is ignored."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= EXT_CONFIG_SIZE - size:
            return
        value &= (1 << (8 * size)) - 1
        touched: list[tuple[Capability, int]] = []
        with self._lock:
            for i in range(size):
                at = offset + i
                byte = (value >> (8 * i)) & 0xFF
                keep = self._cfg[at] & ~self._wmask[at] & ~(self._w1c[at] & byte)
                self._cfg[at] = (keep | (byte & self._wmask[at])) & 0xFF
            for cap_off, length, handler in self._caps:
                if handler is not None and cap_off < offset + size and offset < cap_off + length:
                    touched.append((handler, cap_off))
        self.config_written(offset, size)
        for handler, cap_off in touched:
            handler.written(offset - cap_off, size)
        if offset < BAR0 + 4 * NUM_BARS and offset + size > COMMAND:
            self._refresh()

    def config_written(self, offset: int, size: int) -> None:
        """Subclasses' hook: the guest wrote [offset, offset+size) of the header."""

    # --- helpers for capabilities and subclasses --------------------------------------------
    def get(self, offset: int, size: int) -> int:
        """Stored bytes as an int, without hooks (for capability handlers)."""
        with self._lock:
            return int.from_bytes(self._cfg[offset : offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        """Store bytes directly, bypassing the masks (device-side updates)."""
        with self._lock:
            self._set(offset, size, value & ((1 << (8 * size)) - 1))

    def set_status_bits(self, bits: int, on: bool) -> None:
        """Set or clear read-only STATUS bits (the interrupt-pending bit)."""
        with self._lock:
            old = self._cfg[STATUS] | self._cfg[STATUS + 1] << 8
            new = old | bits if on else old & ~bits
            self._set(STATUS, 2, new)

    # --- save / restore ---------------------------------------------------------------------
    def save(self) -> PciFunctionState:
        with self._lock:
            return PciFunctionState(bytes(self._cfg[:CONFIG_SIZE]))

    def check_state(self, state: object) -> PciFunctionState:
        """state, if it can be this function's: its read-only bytes are this function's
        own (same IDs, BAR sizes and capability layout); raises DeviceError otherwise."""
        st = require_state(f"{self.name} config space", state, PciFunctionState)
        data = require_bytes(self.name, "config", st.config, CONFIG_SIZE)
        if len(data) != CONFIG_SIZE:
            raise DeviceError(f"{self.name} state: {len(data)} bytes of config space, not 256")
        with self._lock:
            for i, byte in enumerate(data):
                fixed = ~(self._wmask[i] | self._w1c[i]) & 0xFF
                if i in (STATUS, STATUS + 1):
                    fixed &= ~STATUS_INTERRUPT & 0xFF
                if (byte ^ self._cfg[i]) & fixed:
                    raise DeviceError(
                        f"{self.name} state: read-only config byte {i:#x} is {byte:#04x}, "
                        f"this device has {self._cfg[i]:#04x}"
                    )
        return st

    def restore(self, state: PciFunctionState) -> None:
        """Take over saved configuration space; the platform re-maps the BARs it decodes
        and every capability handler re-reads what concerns it."""
        st = self.check_state(state)
        self.load_state(st)

    def load_state(self, st: PciFunctionState) -> None:
        """Take over a state check_state accepted."""
        with self._lock:
            self._cfg[:CONFIG_SIZE] = st.config
            handlers = [(h, length) for _, length, h in self._caps if h is not None]
        for handler, length in handlers:
            handler.written(0, length)
        self._refresh()
