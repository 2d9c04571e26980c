"""virtio-rng (virtio 1.x, 5.4): one request queue, filled from the host's os.urandom.

The driver posts device-writable buffers; the device fills each one completely. A
request with no writable byte at all is a malformed chain (QueueError): the spec has
the driver offer write-only buffers, so a read-only one means a broken or hostile
driver. A request gets at most MAX_PER_REQUEST bytes (the spec lets the device write
fewer than offered and report how many), so a 4 GiB chain cannot keep the I/O thread
busy or make the VMM allocate much: the driver simply asks again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from corevisor.snapshot import require_state
from corevisor.virtio.device import VirtioDevice
from corevisor.virtio.queue import DescriptorChain, QueueError

__all__ = ["Rng", "RngState", "VIRTIO_ID_RNG"]

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 256
MAX_PER_REQUEST = 64 << 10


@dataclass(frozen=True)
class RngState:
    """Nothing: every request is answered whole when it is served, and the entropy
    itself is never state (a restored guest must not replay the old bytes)."""


class Rng(VirtioDevice):
    """An entropy source for the guest."""

    device_type = VIRTIO_ID_RNG
    queue_sizes = (QUEUE_SIZE,)
    name = "virtio-rng"

    def process_queue(self, index: int) -> None:
        self.serve(0, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        if not chain.writable:
            raise QueueError(f"rng request {chain.head} has no device-writable buffer")
        writer = chain.writer()
        writer.write(os.urandom(min(writer.remaining, MAX_PER_REQUEST)))
        return writer.written

    def save(self) -> RngState:
        return RngState()

    def check_state(self, state: object) -> None:
        require_state(self.name, state, RngState)

    def load_state(self, state: object) -> None:
        """Nothing to take over."""
