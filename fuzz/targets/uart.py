"""The 16550A UART's eight registers (DLAB, FIFO control, loopback, IIR priorities) under
random guest accesses interleaved with host input, then a save/restore round trip."""

from __future__ import annotations

from corevisor.devices.uart16550 import Uart16550
from fuzz.common import Cursor, drive_device


def _make() -> Uart16550:
    return Uart16550(lambda data: None, lambda level: None)


def _input(dev: Uart16550, c: Cursor) -> None:
    dev.enqueue_input(c.take(c.u(1) % 40))


def one_input(data: bytes) -> None:
    drive_device(data, _make, 8, _input)
