"""Legacy (non-virtio) device models and the Device protocol they all satisfy.

A device here is pure register logic: the bus hands it an offset relative to the
device's own base and the access size, and the device answers with bytes. Devices know
no base addresses, issue no ioctls and start no threads; interrupts leave through a
callback injected at construction. That keeps them testable without /dev/kvm and lets
the same model sit on the PIO or the MMIO bus.

What does not live here: address decoding (bus.py), virtio devices (virtio/), and the
host side of a serial line (console.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Device"]


@runtime_checkable
class Device(Protocol):
    """What the bus needs from a device model.

    Both methods are called with whatever the guest did, so implementations must never
    raise on odd offsets, sizes or data: a guest must not be able to crash the VMM with
    an ``outb``. Unknown registers read as real hardware would (0xFF or 0) and writes to
    them are ignored.
    """

    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes read at ``offset`` (relative to the device's base)."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` (relative to the device's base)."""
        ...
