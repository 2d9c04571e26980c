"""The i8042 controller's data and command ports (command byte, self-test, output port,
the 0xFE reset pulse) under random guest accesses, then a save/restore round trip."""

from __future__ import annotations

from corevisor.devices.i8042 import I8042
from fuzz.common import Cursor, drive_device


def _make() -> I8042:
    return I8042(lambda: None)


def _command(dev: I8042, c: Cursor) -> None:
    dev.write(4, bytes([c.u(1)]))  # a controller command, then maybe its data byte
    dev.write(0, bytes([c.u(1)]))


def one_input(data: bytes) -> None:
    drive_device(data, _make, 5, _command)
