"""MSI (PCI 3.0, 6.8.1): the 64-bit capability with per-vector masking, as register logic.

The capability's bytes live in the function's configuration space (config.py); Msi is
its handler, reading them back to know what the guest programmed: Enable, Multiple
Message Enable (vectors = 2**MME, at most what the function offers), the address, the
16-bit data, and the mask and pending bits. ``notify(vector)`` delivers through
``deliver(vector)`` (the platform's irqfd for that vector, routed by routing.py to
``entry(vector)``: data with the vector number in its low bits, as 6.8.1.6 says), or
sets the vector's pending bit while it is masked; unmasking delivers it once.
``on_route`` fires when an unmasked vector's address/data may have changed.

What does not live here: MSI-X (msix.py), KVM routes (routing.py).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from corevisor.pci.config import PciFunction

__all__ = ["Msi", "capability_body", "CAP_SIZE"]

CTRL_ENABLE = 1 << 0
CTRL_64BIT = 1 << 7
CTRL_PER_VECTOR_MASK = 1 << 8
CAP_SIZE = 24  # ID, next, control, address low/high, data, reserved, mask, pending
_ADDR_LO, _ADDR_HI, _DATA, _MASK, _PENDING = 4, 8, 12, 16, 20


def capability_body(vectors: int) -> tuple[bytes, bytes]:
    """Bytes after ID/next, and their write mask, for a capability offering vectors (a
    power of 2, 1..32)."""
    if vectors not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"MSI: {vectors} vectors is not a power of 2 up to 32")
    mmc = vectors.bit_length() - 1
    control = (mmc << 1) | CTRL_64BIT | CTRL_PER_VECTOR_MASK
    body = struct.pack("<HIIHHII", control, 0, 0, 0, 0, 0, 0)
    vector_bits = (1 << vectors) - 1
    wmask = struct.pack("<HIIHHII", CTRL_ENABLE | 0x70, 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF, 0,
                        vector_bits, 0)
    return body, wmask


class Msi:
    """The MSI capability of one function (see the module docstring)."""

    def __init__(self, function: PciFunction, vectors: int,
                 deliver: Callable[[int], None]) -> None:
        self.function = function
        self.vectors = vectors
        self._deliver = deliver
        self.on_route: Callable[[int], None] = lambda vector: None
        self._lock = threading.Lock()
        body, wmask = capability_body(vectors)
        self.offset = function.add_capability(0x05, body, wmask, self)
        self._masked_before = 0

    def _get(self, at: int, size: int) -> int:
        return self.function.get(self.offset + at, size)

    @property
    def enabled(self) -> bool:
        return bool(self._get(2, 2) & CTRL_ENABLE)

    def enabled_vectors(self) -> int:
        """2**MME, capped at what the function offers."""
        mme = (self._get(2, 2) >> 4) & 7
        return min(1 << mme, self.vectors)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked) the guest programmed for vector."""
        addr = self._get(_ADDR_LO, 4) | self._get(_ADDR_HI, 4) << 32
        data = self._get(_DATA, 2)
        n = self.enabled_vectors()
        data = (data & ~(n - 1)) | (vector & (n - 1))
        masked = not self.enabled or vector >= n or bool(self._get(_MASK, 4) >> vector & 1)
        return addr, data, masked

    def notify(self, vector: int) -> bool:
        """Send vector, or mark it pending while masked; False if MSI is off or no such
        vector is enabled."""
        with self._lock:
            if not self.enabled or not 0 <= vector < self.enabled_vectors():
                return False
            if self._get(_MASK, 4) >> vector & 1:
                pending = self._get(_PENDING, 4) | 1 << vector
                self.function.put(self.offset + _PENDING, 4, pending)
                return True
        self._deliver(vector)
        return True

    # --- config.py Capability protocol ------------------------------------------------
    def read(self, offset: int, size: int, value: int) -> int:
        return value

    def written(self, offset: int, size: int) -> None:
        """A guest write: re-announce the routes, deliver what was unmasked and pending."""
        for v in range(self.vectors):
            self.on_route(v)
        due: list[int] = []
        with self._lock:
            if not self.enabled:
                return
            pending = self._get(_PENDING, 4)
            mask = self._get(_MASK, 4)
            for v in range(self.enabled_vectors()):
                if pending >> v & 1 and not mask >> v & 1:
                    pending &= ~(1 << v)
                    due.append(v)
            self.function.put(self.offset + _PENDING, 4, pending)
        for v in due:
            self._deliver(v)
