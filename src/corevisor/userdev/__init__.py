"""The public API of device models written in Python: what a device class declares and
the one door to the machine it gets (docs/devices.md is the reference).

A user device is a class that declares where its registers sit (``REGION``: ``Ports`` or
``Mmio``) and, optionally, its interrupt line (``IRQ``), and answers register accesses
as corevisor's own devices do (devices/__init__.py): ``read(offset, size) -> bytes`` and
``write(offset, data)``, offsets relative to its base. Or it is a PCI function
(``REGION = Pci(vendor=, device=, class_code=, bars=(Bar(size), Bar(size, io=True)))``)
on the machine's PCI bus: its BARs are placed by the PCI platform (or the guest's
firmware), its configuration space is corevisor's, its accesses arrive as
``read(bar, offset, size)`` and ``write(bar, offset, data)`` with the BAR's index, and
its line is its slot's INTx (level-triggered, shared, masked by INTX_DISABLE) or MSI.
corevisor constructs it as ``Class(host, **parameters)``: the parameters come from the
system file, and ``host`` (a ``Host``) is everything the device may use of the machine —
its interrupt line (``IrqLine``: KVM_IRQ_LINE into the in-kernel irqchip), the guest's
RAM through bounds-checked reads and writes (``GuestRam``: guest-physical addresses,
never a host pointer), timers that run on a thread the machine owns (``Timer``), and a log line.
Optional ``save()``/``restore(state)`` make the device part of snapshots.

    class Blinker:
        REGION = Ports(0x700, 1)
        IRQ = Irq(5)

        def __init__(self, host: Host, period_ms: int = 100) -> None:
            self.host, self.count = host, 0
            host.timer(self.tick).start(period_ms / 1000, periodic=True)

        def tick(self) -> None:
            self.count = (self.count + 1) & 0xFF
            self.host.irq.pulse()

        def read(self, offset: int, size: int) -> bytes:
            return bytes([self.count]) * size

        def write(self, offset: int, data: bytes) -> None:
            pass

What corevisor guarantees a device: its methods and its timers' callbacks are never
called concurrently (one lock per device), and only while its machine exists. What a
device must do: answer every access (guest input!) without raising and without
blocking. One that raises anyway is contained: it fails, answers as an absent device
from then on (reads all ones, writes ignored), and the machine reports it once; the
guest and every other device go on (userdev/attach.py).

What does not live here: reading a device's table and checking its class (load.py),
putting it into a machine and containing its failures (attach.py). Importing this
module imports no KVM code: a device's module imports it while a system file is read.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from corevisor.errors import DeviceError, GuestMemoryError

if TYPE_CHECKING:
    from corevisor.memory import GuestMemory

__all__ = [
    "Ports",
    "Mmio",
    "Pci",
    "Bar",
    "Irq",
    "Trigger",
    "Host",
    "IrqLine",
    "GuestRam",
    "Timer",
    "UserDevice",
    "GuestMemoryError",
    "MAX_PORTS",
    "MAX_MMIO",
    "MAX_GPA",
]

MAX_PORTS = 0x100  # ports one device may own: a register block, not the port space
MAX_MMIO = 1 << 28  # 256 MiB of MMIO registers: far beyond a register block
MAX_GPA = 1 << 39  # the highest guest-physical address an x86-64 host is sure to have
PORT_SPACE = 1 << 16


@dataclass(frozen=True)
class Ports:
    """A range of I/O ports, [base, base + size): the device's default place (a system
    file's ``base`` key moves it). 1 to 256 ports below 0x10000."""

    base: int
    size: int

    def __post_init__(self) -> None:
        _check_int("Ports.base", self.base)
        _check_int("Ports.size", self.size)
        if not 1 <= self.size <= MAX_PORTS:
            raise ValueError(f"Ports.size {self.size}: a device owns 1 to {MAX_PORTS} ports")
        if self.base < 0 or self.base + self.size > PORT_SPACE:
            raise ValueError(
                f"ports {self.base:#x}+{self.size} are not within 0x0-{PORT_SPACE - 1:#x}"
            )


@dataclass(frozen=True)
class Mmio:
    """A range of guest-physical addresses, [base, base + size), that is no RAM: every
    access there exits to the device. Up to 256 MiB, below 2^39; it must not overlap
    RAM or anything else in the machine's map (docs/pc-platform.md says where to put it)."""

    base: int
    size: int

    def __post_init__(self) -> None:
        _check_int("Mmio.base", self.base)
        _check_int("Mmio.size", self.size)
        if not 1 <= self.size <= MAX_MMIO:
            raise ValueError(f"Mmio.size {self.size:#x}: a device owns 1 byte to 256 MiB")
        if self.base < 0 or self.base + self.size > MAX_GPA:
            raise ValueError(f"MMIO {self.base:#x}+{self.size:#x} is not below {MAX_GPA:#x}")


@dataclass(frozen=True)
class Bar:
    """One BAR of a Pci function: size bytes of memory space (16 B to 256 MiB, 32-bit,
    placed below 4 GiB) or, with io, size I/O ports (4 to 256); a power of 2. Its index
    is its place in ``Pci.bars`` (BAR0 first)."""

    size: int
    io: bool = False

    def __post_init__(self) -> None:
        _check_int("Bar.size", self.size)
        if type(self.io) is not bool:
            raise ValueError(f"Bar.io {self.io!r} is not a boolean")
        low, high = (4, MAX_PORTS) if self.io else (16, MAX_MMIO)
        if self.size & (self.size - 1) or not low <= self.size <= high:
            kind = "an I/O BAR is 4 to 256 ports" if self.io else "a memory BAR is 16 B to 256 MiB"
            raise ValueError(f"Bar.size {self.size:#x}: {kind}, a power of 2")


@dataclass(frozen=True)
class Pci:
    """A PCI function on the machine's bus 0 (the partition needs PCI: ``transport =
    "pci"`` or a ``bios``): its IDs, its class code (class, subclass, prog-if as
    0xCCSSPP), its BARs (one to six, BAR0 first), and whether it interrupts
    (``interrupt``: pin INTA on the slot's routed line, level-triggered, and an MSI
    capability with one vector the guest may enable instead). corevisor answers its
    configuration space; the device sees only its BARs' accesses."""

    vendor: int
    device: int
    class_code: int
    bars: tuple[Bar, ...]
    revision: int = 0
    subsystem_vendor: int = 0
    subsystem: int = 0
    interrupt: bool = True

    def __post_init__(self) -> None:
        for what, bits in (("vendor", 16), ("device", 16), ("class_code", 24), ("revision", 8),
                           ("subsystem_vendor", 16), ("subsystem", 16)):
            value = getattr(self, what)
            _check_int(f"Pci.{what}", value)
            if not 0 <= value < 1 << bits:
                raise ValueError(f"Pci.{what} {value:#x} does not fit in {bits} bits")
        if self.vendor == 0xFFFF:
            raise ValueError("Pci.vendor 0xffff means no device: give a real vendor ID")
        if type(self.bars) is not tuple or not all(isinstance(b, Bar) for b in self.bars):
            raise ValueError(f"Pci.bars {self.bars!r} is not a tuple of Bar")
        if not 1 <= len(self.bars) <= 6:
            raise ValueError(f"Pci.bars: {len(self.bars)} BARs, a function has 1 to 6")
        if type(self.interrupt) is not bool:
            raise ValueError(f"Pci.interrupt {self.interrupt!r} is not a boolean")


class Trigger(enum.StrEnum):
    """How an interrupt line signals: an edge (the line's rise; ``IrqLine.pulse``) or a
    level (held high until the device lowers it; the guest must program its IOAPIC pin
    level-triggered)."""

    EDGE = "edge"
    LEVEL = "level"


@dataclass(frozen=True, init=False)
class Irq:
    """The device's interrupt line: an IOAPIC input (GSI) of the in-kernel irqchip, one of
    the ISA lines no built-in device uses (3, 5, 6, 7, 10, 11, 12, 14, 15); a system
    file's ``gsi`` key moves it. trigger: "edge" (the default) or "level"."""

    gsi: int
    trigger: Trigger

    def __init__(self, gsi: int, trigger: Trigger | str = Trigger.EDGE) -> None:
        _check_int("Irq.gsi", gsi)
        try:
            kind = Trigger(trigger)
        except ValueError:
            raise ValueError(f'Irq.trigger {trigger!r}: "edge" or "level"') from None
        object.__setattr__(self, "gsi", gsi)
        object.__setattr__(self, "trigger", kind)


def _check_int(what: str, value: object) -> None:
    if type(value) is not int:
        raise ValueError(f"{what} {value!r} is not an integer")


class UserDevice(Protocol):
    """What a device class must have (load.py checks it when a system file names it).

    Also optional: ``IRQ: Irq`` (its interrupt line), and ``save() -> state`` with
    ``restore(state)`` (both or neither; the state is plain values: None, bool, int,
    float, str, bytes and tuples of them). The constructor is ``__init__(self, host,
    **parameters)``: the host first, then keyword parameters, whose annotations (int,
    float, str, bool) are checked against the system file's values.
    """

    REGION: ClassVar[Ports | Mmio | Pci]  # a Pci device's read/write take the BAR first

    def read(self, offset: int, size: int) -> bytes:
        """The size bytes at offset: never raise, never block (guest input)."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Take data at offset: never raise, never block (guest input)."""
        ...


# ---------------------------------------------------------------------- the machine's side


class IrqLine:
    """The device's interrupt line, driven into the in-kernel irqchip (KVM_IRQ_LINE).

    set(True) raises it and set(False) lowers it (a level-triggered device holds it high
    while it wants service); pulse() raises and lowers it (an edge-triggered device's
    one interrupt). Setting the level it already has does nothing: no ioctl, no edge.
    """

    __slots__ = ("gsi", "trigger", "_drive", "_level")

    def __init__(self, gsi: int, trigger: Trigger, drive: Callable[[int], None]) -> None:
        """Made by corevisor: drive(level) is the ioctl on the machine's VM."""
        self.gsi = gsi
        self.trigger = trigger
        self._drive = drive
        self._level = False

    @property
    def level(self) -> bool:
        """Whether the line is high now."""
        return self._level

    def set(self, level: bool) -> None:
        level = bool(level)
        if level != self._level:
            self._level = level
            self._drive(int(level))

    def pulse(self) -> None:
        """A rising edge and back down (lowering it first if it was high)."""
        self.set(False)
        self.set(True)
        self.set(False)


class GuestRam:
    """The guest's RAM, by guest-physical address: the only memory a device may touch.

    Every access is bounds-checked (memory.py): one not wholly inside RAM, larger than
    MAX_ACCESS, or a write to memory the guest maps read-only raises GuestMemoryError,
    and nothing is read or written. An address a device uses usually came from the
    guest, so a device catches that error and answers the guest as hardware would (an
    error bit): one it lets through fails the device.
    """

    __slots__ = ("_memory",)
    MAX_ACCESS = 1 << 20  # bytes per call: a device moves more in pieces

    def __init__(self, memory: GuestMemory) -> None:
        """Made by corevisor around the machine's GuestMemory."""
        self._memory = memory

    def _check(self, gpa: object, size: object) -> None:
        if type(gpa) is not int or type(size) is not int:
            raise GuestMemoryError(f"guest access {gpa!r}+{size!r}: not integers")
        if size > self.MAX_ACCESS:
            raise GuestMemoryError(
                f"guest access {gpa:#x}+{size:#x}: more than {self.MAX_ACCESS:#x} bytes at once"
            )

    def read(self, gpa: int, size: int) -> bytes:
        """A copy of the size bytes at gpa."""
        self._check(gpa, size)
        return self._memory.read(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        """Copy data to gpa."""
        self._check(gpa, len(data))
        self._memory.write(gpa, bytes(data))

    def contains(self, gpa: int, size: int = 1) -> bool:
        """Whether [gpa, gpa + size) is RAM (a read there would succeed)."""
        return type(gpa) is int and type(size) is int and self._memory.contains(gpa, size)


class _Clock(Protocol):
    """What a Timer is armed on (attach.py's DeviceTimers)."""

    def arm(self, timer: Timer, delay: float, interval: float | None) -> None: ...

    def cancel(self, timer: Timer) -> None: ...

    def active(self, timer: Timer) -> bool: ...


class Timer:
    """A one-shot or periodic timer whose callback runs on the machine's device-timer
    thread (never on a vCPU), under the device's lock like its read and write.

    Made by Host.timer in the constructor. Timers armed before the machine starts count
    from its start; a periodic timer that falls behind skips the ticks it missed
    instead of firing them in a burst. Armed timers are part of the device's snapshot
    (by the order the constructor made them). Cancelled when the device fails and when
    the machine closes.
    """

    __slots__ = ("callback", "index", "_clock", "__weakref__")

    def __init__(self, clock: _Clock, callback: Callable[[], None], index: int) -> None:
        self.callback = callback
        self.index = index  # its place among its device's timers
        self._clock = clock

    def start(self, seconds: float, *, periodic: bool = False) -> None:
        """(Re)arm: fire once after seconds, or every seconds with periodic."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise DeviceError(f"Timer.start: {seconds!r} is not a number of seconds")
        if not (math.isfinite(seconds) and seconds > 0):
            raise DeviceError(f"Timer.start: {seconds!r} s (give a positive number of seconds)")
        self._clock.arm(self, float(seconds), float(seconds) if periodic else None)

    def cancel(self) -> None:
        """Disarm it (a callback already running finishes)."""
        self._clock.cancel(self)

    @property
    def active(self) -> bool:
        """Whether it is armed."""
        return self._clock.active(self)


class Host:
    """What a device gets from its machine, passed to its constructor: keep it.

    ``name`` is the device's name in the system; ``irq`` its interrupt line (only if
    the class declares an IRQ); ``memory`` the guest's RAM; ``timer(callback)`` makes a
    Timer; ``log(message)`` prints one ``corevisor: PARTITION: device NAME: message`` line.
    """

    __slots__ = ("name", "memory", "_irq", "_timer", "_log")

    def __init__(
        self,
        name: str,
        irq: IrqLine | None,
        memory: GuestRam,
        timer: Callable[[Callable[[], None]], Timer],
        log: Callable[[str], None],
    ) -> None:
        """Made by corevisor (attach.py)."""
        self.name = name
        self.memory = memory
        self._irq = irq
        self._timer = timer
        self._log = log

    @property
    def irq(self) -> IrqLine:
        """The device's interrupt line; DeviceError if its class declares no IRQ."""
        if self._irq is None:
            raise DeviceError(f"device {self.name}: its class declares no IRQ, so it has no line")
        return self._irq

    def timer(self, callback: Callable[[], None]) -> Timer:
        """A new, unarmed Timer calling callback (make them in the constructor)."""
        if not callable(callback):
            raise DeviceError(f"device {self.name}: a timer's callback must be callable")
        return self._timer(callback)

    def log(self, message: str) -> None:
        """One line on corevisor's stderr, naming the partition and the device."""
        self._log(str(message))
