"""MSI-X (PCI 3.0, 6.8.2): the capability's control word, the vector table, the PBA.

Msix is the state of one function's MSI-X: N table entries of {address, data, vector
control} (16 bytes each; the mask bit set at reset), the pending-bit array, and the
capability's Enable and Function Mask bits. It is a capability handler for the config
space (config.py) and answers the table and PBA through table_read/table_write and
pba_read, called by whatever BAR holds them (the function's MMIO handler), so it is
register logic with no base address.

Delivering is ``notify(vector)``: with MSI-X enabled, the function unmasked and the
vector unmasked, it calls ``deliver(vector)`` (the platform writes the vector's irqfd,
whose GSI KVM routes to the entry's address/data); otherwise the vector's pending bit is
set, and unmasking later delivers it once and clears the bit (6.8.3.5). ``on_route``
is called (outside the lock) whenever an unmasked vector's address/data may have
changed, so the platform can update the KVM route before the next delivery; a driver
changes an entry only while it is masked, as the specification requires, and the route
follows when it unmasks.

Accesses to the table are 32-bit or 64-bit, aligned (6.8.2.9): others read as zero and
are ignored; the PBA is read-only. Never raises on guest input.

What does not live here: the KVM routing table (routing.py), where the table lives in a
BAR (the device: virtio/pci.py).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError
from corevisor.pci.config import CAP_ID_MSIX, PciFunction
from corevisor.snapshot import require_bool, require_bytes, require_state

__all__ = ["Msix", "MsixState", "ENTRY_SIZE", "MAX_VECTORS", "capability_body"]

ENTRY_SIZE = 16
MAX_VECTORS = 2048
CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1 << 0
_ENTRY = struct.Struct("<IIII")  # address low, address high, data, vector control


@dataclass(frozen=True)
class MsixState:
    """The guest-visible MSI-X state: the table, the pending bits, the two control bits."""

    table: bytes
    pending: bytes
    enabled: bool
    function_mask: bool


def capability_body(vectors: int, table_bar: int, table_offset: int, pba_bar: int,
                    pba_offset: int) -> tuple[bytes, bytes]:
    """The capability's bytes after ID and next pointer, and their write mask."""
    body = struct.pack("<HII", vectors - 1, table_offset | table_bar, pba_offset | pba_bar)
    wmask = struct.pack("<H", CTRL_ENABLE | CTRL_FUNCTION_MASK) + bytes(8)
    return body, wmask


class Msix:
    """One function's MSI-X vectors (see the module docstring)."""

    def __init__(
        self,
        function: PciFunction,
        vectors: int,
        deliver: Callable[[int], None],
        table: tuple[int, int],
        pba: tuple[int, int],
    ) -> None:
        """Add the capability to function: vectors entries, the table at (BAR, offset),
        the PBA at (BAR, offset); deliver(vector) sends an unmasked vector."""
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X: {vectors} vectors (1..{MAX_VECTORS})")
        self.function = function
        self.vectors = vectors
        self.name = f"{function.name} MSI-X"
        self._deliver = deliver
        self.on_route: Callable[[int], None] = lambda vector: None
        self.on_enable: Callable[[bool], None] = lambda enabled: None
        self._lock = threading.Lock()
        self.reset()
        body, wmask = capability_body(vectors, *table, *pba)
        self.offset = function.add_capability(CAP_ID_MSIX, body, wmask, self)

    def reset(self) -> None:
        """Every vector masked, nothing pending, MSI-X off (the function's reset)."""
        with self._lock:
            self._table = bytearray(ENTRY_SIZE * self.vectors)
            for v in range(self.vectors):
                self._table[ENTRY_SIZE * v + 12] = VECTOR_MASKED
            self._pending = bytearray((self.vectors + 63) // 64 * 8)
            self.enabled = False
            self.function_mask = False

    # --- the capability's control word (config.py Capability protocol) --------------
    def read(self, offset: int, size: int, value: int) -> int:
        return value

    def written(self, offset: int, size: int) -> None:
        """The guest wrote the capability: pick up Enable and Function Mask."""
        if offset + size <= 2 or offset >= 4:
            return
        ctrl = self.function.get(self.offset + 2, 2)
        self.set_control(bool(ctrl & CTRL_ENABLE), bool(ctrl & CTRL_FUNCTION_MASK))

    def set_control(self, enabled: bool, function_mask: bool) -> None:
        with self._lock:
            was = self.enabled
            self.enabled, self.function_mask = enabled, function_mask
        if was != enabled:
            self.on_enable(enabled)
        if enabled and not function_mask:
            for v in range(self.vectors):
                self.on_route(v)
            self._flush_pending()

    # --- table and PBA (the BAR's MMIO handler) -------------------------------------------
    def table_read(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset % size or not 0 <= offset <= len(self._table) - size:
            return bytes(max(size, 0))
        with self._lock:
            return bytes(self._table[offset : offset + size])

    def table_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or offset % size or not 0 <= offset <= len(self._table) - size:
            return
        vector = offset // ENTRY_SIZE
        with self._lock:
            self._table[offset : offset + size] = data
            usable = self.enabled and not self.function_mask
            unmasked = not self._table[ENTRY_SIZE * vector + 12] & VECTOR_MASKED
        if usable and unmasked:
            self.on_route(vector)
            self._flush_pending()

    def pba_read(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset % size or not 0 <= offset <= len(self._pending) - size:
            return bytes(max(size, 0))
        with self._lock:
            return bytes(self._pending[offset : offset + size])

    # --- delivery (any thread) ---------------------------------------------------------------
    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) of a vector; masked includes Function Mask and Enable."""
        with self._lock:
            lo, hi, data, ctrl = _ENTRY.unpack_from(self._table, ENTRY_SIZE * vector)
            masked = not self.enabled or self.function_mask or bool(ctrl & VECTOR_MASKED)
        return lo | hi << 32, data, masked

    def pending(self, vector: int) -> bool:
        with self._lock:
            return bool(self._pending[vector // 8] >> (vector % 8) & 1)

    def notify(self, vector: int) -> bool:
        """Send vector, or mark it pending while it is masked; False for no such vector."""
        if not 0 <= vector < self.vectors:
            return False
        with self._lock:
            ctrl = self._table[ENTRY_SIZE * vector + 12]
            if not self.enabled:
                return False
            if self.function_mask or ctrl & VECTOR_MASKED:
                self._pending[vector // 8] |= 1 << (vector % 8)
                return True
        self._deliver(vector)
        return True

    def _flush_pending(self) -> None:
        """Deliver (once) every pending vector that is no longer masked."""
        due: list[int] = []
        with self._lock:
            if not self.enabled or self.function_mask:
                return
            for v in range(self.vectors):
                bit = 1 << (v % 8)
                if self._pending[v // 8] & bit and not self._table[ENTRY_SIZE * v + 12] & 1:
                    self._pending[v // 8] &= ~bit
                    due.append(v)
        for v in due:
            self._deliver(v)

    # --- save / restore -----------------------------------------------------------------------
    def save(self) -> MsixState:
        with self._lock:
            return MsixState(bytes(self._table), bytes(self._pending), self.enabled,
                             self.function_mask)

    def check_state(self, state: object) -> MsixState:
        st = require_state(self.name, state, MsixState)
        table = require_bytes(self.name, "table", st.table, len(self._table))
        pending = require_bytes(self.name, "pending", st.pending, len(self._pending))
        if len(table) != len(self._table) or len(pending) != len(self._pending):
            raise DeviceError(f"{self.name} state: {len(table) // ENTRY_SIZE} vectors, this "
                              f"function has {self.vectors}")
        require_bool(self.name, "enabled", st.enabled)
        require_bool(self.name, "function_mask", st.function_mask)
        return st

    def load_state(self, st: MsixState) -> None:
        """Take over a checked state; routes are re-announced (on_route) for every vector."""
        with self._lock:
            self._table[:] = st.table
            self._pending[:] = st.pending
            self.enabled, self.function_mask = st.enabled, st.function_mask
        self.on_enable(st.enabled)
        for v in range(self.vectors):
            self.on_route(v)

    def restore(self, state: MsixState) -> None:
        self.load_state(self.check_state(state))
