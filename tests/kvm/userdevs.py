"""User devices for the tests (named in system files as "tests/kvm/userdevs.py:Class"):
the example sensor gone wrong in each way the containment promises to survive, a sensor
that keeps a log in guest memory, one whose calls block, and the PCI example failing.

Each is the example (examples/sensor.py, loaded from its file as a system file would)
with one thing changed, driven by the bundled `sensor` guest.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from pathlib import Path

from corevisor.userdev import GuestMemoryError, Host, Ports

_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> types.ModuleType:
    """examples/NAME.py, loaded from its file as a system file would load it."""
    spec = importlib.util.spec_from_file_location(f"corevisor_example_{name}",
                                                  _EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _example("sensor")
TempSensor = example.TempSensor


class Unprintable(Exception):
    """An exception whose message cannot even be formed."""

    def __str__(self) -> str:
        raise RuntimeError("no words")


class FailingSensor(TempSensor):  # type: ignore[misc, valid-type]
    """Fails in `where` ("read", "timer", "write", "exit", "size", "nasty": an exception
    that cannot be shown, as a sample) the `after`-th time
    (samples count once the guest has turned the interrupt on, so the guest has always
    seen the sensor first)."""

    def __init__(self, host: Host, where: str = "read", after: int = 2, **kw: int) -> None:
        super().__init__(host, **kw)
        self.where, self.left = where, after

    def _due(self, where: str) -> bool:
        if self.where != where:
            return False
        self.left -= 1
        return self.left <= 0

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and self._due("read"):
            return bytes([100 // self.left])  # left is 0: ZeroDivisionError, on purpose
        if offset == 0 and self._due("size"):
            return b"\x00\x00"  # two bytes for a one-byte read
        return super().read(offset, size)  # type: ignore[no-any-return]

    def write(self, offset: int, data: bytes) -> None:
        if offset == 2 and self._due("write"):
            raise RuntimeError("status write refused")
        if offset == 2 and self._due("exit"):
            sys.exit(3)  # a device must not end the VMM
        super().write(offset, data)

    def sample(self) -> None:
        if self.regs[3] & 1 and self._due("timer"):
            raise KeyError("sample")
        if self.regs[3] & 1 and self._due("nasty"):
            raise Unprintable
        super().sample()


class LoggingSensor(TempSensor):  # type: ignore[misc, valid-type]
    """The sensor plus a log in guest memory: +4 (a 32-bit write) sets its address, and
    each alarm appends the temperature there as a u32, before the line rises. A log
    address outside RAM sets status bit 1 (checked=True, as a driver expects) or fails the
    device (checked=False: the GuestMemoryError is let through), so the line never rises
    for that alarm and the guest sees none."""

    REGION = Ports(0x700, 8)

    def __init__(self, host: Host, checked: bool = True, **kw: int) -> None:
        self.checked, self.log, self.entries, self.alarmed = checked, 0, 0, False
        super().__init__(host, **kw)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:
            self.log, self.entries = int.from_bytes(data, "little"), 0
            return
        super().write(offset, data)

    def update(self) -> None:
        alarm = bool(self.regs[2] & 1)
        if self.log and alarm and not self.alarmed:  # a new alarm: logged first
            where = self.log + 4 * self.entries
            try:
                self.host.memory.write(where, self.regs[0].to_bytes(4, "little"))
                self.entries += 1
            except GuestMemoryError:
                if not self.checked:
                    raise
                self.regs[2] |= 2
        self.alarmed = alarm
        super().update()

    def save(self) -> tuple[bytes, int, int, bool]:
        return bytes(self.regs), self.log, self.entries, self.checked

    def restore(self, state: tuple[bytes, int, int, bool]) -> None:
        regs, self.log, self.entries, self.checked = state
        super().restore(regs)
        self.alarmed = bool(self.regs[2] & 1)


class BlockingSensor(TempSensor):  # type: ignore[misc, valid-type]
    """Its temperature read blocks until the test sets `release` (entered is set first)."""

    entered = threading.Event()
    release = threading.Event()

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            self.entered.set()
            self.release.wait()
        return super().read(offset, size)  # type: ignore[no-any-return]


class Stateless:
    """A device with no save()/restore(): a machine with it cannot be snapshotted."""

    REGION = Ports(0x710, 1)

    def __init__(self, host: Host) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return b"\x2a" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


class Exploding:
    """A constructor that raises: the build fails, naming the device."""

    REGION = Ports(0x710, 1)

    def __init__(self, host: Host, volts: int = 5) -> None:
        raise ValueError(f"{volts} V is too much")

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


class ForbiddenSensor(TempSensor):  # type: ignore[misc, valid-type]
    """Opens a file (a system call no device thread may make under the sandbox) the first
    time the guest reads the temperature ("read", on the vCPU thread) or at the first
    sample once the interrupt is on ("timer", on the devices thread)."""

    def __init__(self, host: Host, where: str = "read", **kw: int) -> None:
        super().__init__(host, **kw)
        self.where = where

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and self.where == "read":
            open("/dev/null").close()  # noqa: SIM115 - the forbidden call itself
        return super().read(offset, size)  # type: ignore[no-any-return]

    def sample(self) -> None:
        if self.regs[3] & 1 and self.where == "timer":
            open("/dev/null").close()  # noqa: SIM115
        super().sample()


PciSensor = _example("pcisensor").PciSensor


class FailingPciSensor(PciSensor):  # type: ignore[misc, valid-type]
    """The PCI example, failing on the `after`-th write to its status register (BAR0 +8:
    the guest's interrupt handler clearing an alarm)."""

    def __init__(self, host: Host, after: int = 2, **kw: int) -> None:
        super().__init__(host, **kw)
        self.left = after

    def write(self, bar: int, offset: int, data: bytes) -> None:
        if (bar, offset) == (0, 8):
            self.left -= 1
            if self.left <= 0:
                raise RuntimeError("status write refused")
        super().write(bar, offset, data)
