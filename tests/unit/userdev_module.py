"""A user device importable by module name (tests/unit/test_userdev.py names it as
"tests.unit.userdev_module:Plain")."""

from __future__ import annotations

from corevisor.userdev import Host, Ports


class Plain:
    REGION = Ports(0x720, 2)

    def __init__(self, host: Host) -> None:
        self.host = host

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass
