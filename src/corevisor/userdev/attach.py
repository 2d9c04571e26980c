"""User devices in a machine: on its buses (or its PCI bus: function.py), their lines and
timers wired, their failures contained (the builder's attach_user_devices step calls
``attach``).

Each device sits behind a ``Contained``, which is what the bus, the machine and
snapshots see. It serialises every call into the device (one lock: the vCPU threads and
the timer thread never run device code concurrently) and contains the device's bugs the
way the VMM contains a hostile guest's input: an exception out of read, write, a timer
callback or save (or a read that answers anything but ``size`` bytes) fails the device.
A failed device answers as an absent device from then on (reads all ones, writes
ignored, as the bus answers where no device is), its timers are cancelled and its line
is lowered, and the machine reports it once, in one line naming the device, the
exception and where it was raised (shown here on three lines)::

    corevisor: demo: device sensor (sensor.py:TempSensor) failed in read(0x0, 1):
        ZeroDivisionError: division by zero (at sensor.py:21 in read); it answers as an
        absent device from now on

The guest keeps running and every other device keeps working. What cannot be contained
in-process is a call that never returns: Python cannot stop another thread's code. Such
a call stalls the vCPU that made it (and whoever waits for the device's lock); pausing
the machine then fails naming the device and the call (``stalled``), stopping it still
works (the stuck thread is left behind, and named when the machine closes), and a call
that did return but took longer than SLOW_CALL is reported once.

``DeviceTimers`` is the machine's one thread for its user devices' timers: started with
the machine, parked while it is frozen for a snapshot, ended when it closes.

What does not live here: the API devices are written against (__init__.py), reading
their tables (load.py), the claims of their ranges and lines (resources.py).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corevisor import sandbox
from corevisor.errors import ConfigError, DeviceError, SnapshotError
from corevisor.pci.config import PciFunctionState
from corevisor.resources import Resources, claim_device
from corevisor.signals import start_thread
from corevisor.snapshot import require_bool, require_state
from corevisor.spec import DeviceSpace, DeviceSpec
from corevisor.userdev import GuestRam, Host, IrqLine, Pci, Timer, Trigger
from corevisor.userdev.function import BarPort, SharedLines, UserFunction
from corevisor.userdev.load import declared, load_class

if TYPE_CHECKING:
    from corevisor.machine import Machine
    from corevisor.memory import GuestMemory
    from corevisor.pci.platform import PciPlatform

__all__ = ["attach", "Contained", "DeviceTimers", "UserDeviceState", "SLOW_CALL"]

SLOW_CALL = 0.5  # seconds: a device call this long stalled its vCPU; reported once
MAX_STATE_DEPTH = 16
JOIN_TIMEOUT = 1.0  # seconds close() waits for the timer thread (a callback may be stuck)
PARK_TIMEOUT = 5.0  # seconds park() waits for a callback in progress to return


@dataclass(frozen=True)
class UserDeviceState:
    """A user device's part of a snapshot: its class (a state fits only the same one), its
    line's level, its armed timers as (index, seconds until due, period or None), and
    what its own save() returned (plain values); a PCI function's configuration space
    too (its BARs, COMMAND, MSI: what the guest programmed)."""

    cls: str
    irq: bool
    timers: tuple[tuple[int, float, float | None], ...]
    state: Any
    config: PciFunctionState | None = None


def attach(
    m: Machine,
    devices: tuple[DeviceSpec, ...],
    res: Resources,
    report: Callable[[str], None],
    pci: PciPlatform | None = None,
    place: bool = True,
) -> None:
    """Put each device on its bus at the range its spec names, with its line and timers;
    a PCI function on pci's bus 0 in the next free slot (its BARs placed there when
    place: no firmware to do it).

    report: the machine's one-line reports. A constructor that raises fails the build
    (DeviceError naming the device): a device that cannot be made is a bad system file.
    """
    clock = DeviceTimers(m.name)
    m.at_start(clock.start)
    m.at_close(clock.close)
    m.at_quiesce(clock.park, clock.unpark)  # no timer fires while a snapshot is taken
    lines = SharedLines(m.vm.irq_line)
    for i, spec in enumerate(devices):
        where = f"partitions.{m.name}.devices[{i}]"
        claim_device(res, spec, where)
        _, cls = load_class(spec.cls, where)
        region, _ = declared(cls, where)
        key = f"device-{spec.name}"
        if isinstance(region, Pci):
            dev = _attach_function(m, spec, cls, region, clock, report, where, pci, lines, place)
        else:
            dev = Contained(spec, cls, m.memory, m.vm.irq_line, clock, report, key=where)
            bus = m.pio if spec.space is DeviceSpace.PORT else m.mmio
            bus.attach(spec.base, spec.size, dev, key)
        m.at_close(dev.close)
        m.devices[key] = dev
        m.at_stall(dev.stalled)


def _attach_function(
    m: Machine,
    spec: DeviceSpec,
    cls: type,
    region: Pci,
    clock: DeviceTimers,
    report: Callable[[str], None],
    where: str,
    pci: PciPlatform | None,
    lines: SharedLines,
    place: bool,
) -> Contained:
    """A PCI device: its function in the lowest free slot, a BarPort per BAR."""
    if pci is None:
        raise ConfigError(f"{where}: device {spec.name} is a PCI function, but partition "
                          f'{m.name} has no PCI bus (give it transport = "pci" or a bios)')
    function = UserFunction(region, f"device {spec.name}", m.vm.signal_msi)
    slot = pci.root.free_slot()
    if slot is None:
        raise ConfigError(f"{where}: no free PCI slot for device {spec.name}")
    function.slot = slot
    dev = Contained(spec, cls, m.memory, m.vm.irq_line, clock, report, key=where,
                    function=function)
    function.lines = lines
    pci.add(function, {i: BarPort(dev, i) for i in range(len(region.bars))}, slot=slot)
    if place:
        pci.place(function)
    return dev


def _text(value: object, limit: int = 200) -> str:
    """str(value)'s first line, cut to limit; a device's own __str__ may raise too."""
    try:
        lines = str(value).strip().splitlines()
    except Exception:  # noqa: BLE001 - reporting a failure must not fail
        return f"<{type(value).__name__} that cannot be shown>"
    return lines[0][:limit] if lines else ""


def _why(e: BaseException) -> str:
    """The exception as one line: type, message, and the innermost frame it came from
    (from the code objects: no source file is opened, which a confined thread may not)."""
    message = _text(e)
    text = f"{type(e).__name__}: {message}" if message else type(e).__name__
    frames = list(traceback.walk_tb(e.__traceback__))
    if frames:
        frame, line = frames[-1]
        text += f" (at {Path(frame.f_code.co_filename).name}:{line} in {frame.f_code.co_name})"
    return text


# A call in progress: (kind, two arguments, thread name, monotonic start).
_Call = tuple[str, object, object, str, float]


def _what(call: _Call | None) -> str:
    """A call as messages show it: read(0x0, 1), write(0x1, 2a), timer 0 (sample)."""
    if call is None:
        return "?"
    kind, a, b = call[:3]
    if kind in ("read", "write"):
        at = f"{a[0]}, {a[1]:#x}" if isinstance(a, tuple) else f"{a:#x}"  # (bar, offset)
        if kind == "read":
            return f"read({at}, {b})"
        data = b if isinstance(b, bytes) else b""
        return f"write({at}, {data[:8].hex()})"
    if isinstance(a, Timer):
        return f"timer {a.index} ({getattr(a.callback, '__name__', '?')})"
    return kind


def _as_bytes(value: object, size: int) -> bytes | None:
    """A read's answer if it is size bytes (bytes, bytearray or memoryview), else None."""
    if type(value) is bytes:
        return value if len(value) == size else None
    if isinstance(value, bytearray | memoryview) and type(value) in (bytearray, memoryview):
        data = bytes(value)
        return data if len(data) == size else None
    return None


def _shown(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview) and type(value) in (
        bytes, bytearray, memoryview
    ):
        return f"{len(value)} bytes"
    try:
        shown = repr(value)[:40]
    except Exception:  # noqa: BLE001 - a device's own __repr__ may raise
        shown = "?"
    return f"{type(value).__name__} {shown}"


def _plain(value: object, where: str, depth: int = 0) -> Any:
    """A device's saved state as plain values (lists become tuples), or SnapshotError."""
    if depth > MAX_STATE_DEPTH:
        raise SnapshotError(f"{where}: its save() returned values nested too deeply")
    if value is None or type(value) in (bool, int, str, bytes):
        return value
    if type(value) is float:
        if math.isnan(value):
            raise SnapshotError(f"{where}: its save() returned NaN")
        return value
    if isinstance(value, tuple | list):
        return tuple(_plain(v, where, depth + 1) for v in value)
    raise SnapshotError(
        f"{where}: its save() returned a {type(value).__name__}; a state is plain values "
        "(None, bool, int, float, str, bytes and tuples of them)"
    )


class Contained:
    """One user device as the machine sees it: a Device on its bus, a Stateful part."""

    def __init__(
        self,
        spec: DeviceSpec,
        cls: type,
        memory: GuestMemory,
        irq_line: Callable[[int, int], None],
        clock: DeviceTimers,
        report: Callable[[str], None],
        key: str = "",
        function: UserFunction | None = None,
    ) -> None:
        """key: how a build error names the device (its table in the spec); function: its
        PCI function, whose interrupt request its line drives (function.py)."""
        self.spec = spec
        self.failure: str | None = None  # why it failed, once it has
        self._report = report
        self._clock = clock
        self._lock = threading.Lock()
        self._call: _Call | None = None  # the call in progress
        self._slow_told = False
        self._timers: list[Timer] = []
        gsi = spec.gsi
        self.irq = None
        self.function = function
        if function is not None:
            if function.msi is not None:  # it interrupts: INTx, or MSI once enabled
                self.irq = IrqLine(function.gsi, Trigger.LEVEL, function.set_request)
        elif gsi is not None:
            trigger = Trigger.LEVEL if spec.level else Trigger.EDGE
            self.irq = IrqLine(gsi, trigger, lambda level: irq_line(gsi, level))
        host = Host(spec.name, self.irq, GuestRam(memory), self._new_timer, self._log)
        self._savable = callable(getattr(cls, "save", None))
        try:
            self.device: Any = cls(host, **dict(spec.params))
        except (Exception, SystemExit) as e:
            for t in self._timers:
                clock.cancel(t)
            raise DeviceError(
                f"{key or spec.name} (device {spec.name}, {self.shown_class}): its constructor "
                f"raised {_why(e)}"
            ) from None

    @property
    def shown_class(self) -> str:
        """The class as messages show it: a file's by the file's name."""
        module, _, cls = self.spec.cls.rpartition(":")
        return f"{Path(module).name}:{cls}"

    @property
    def label(self) -> str:
        """"device NAME (CLASS)"."""
        return f"device {self.spec.name} ({self.shown_class})"

    def _log(self, message: str) -> None:
        self._report(f"device {self.spec.name}: {message}")

    def _new_timer(self, callback: Callable[[], None]) -> Timer:
        timer = Timer(self._clock, callback, len(self._timers))
        self._clock.add(timer, self._run_timer)
        self._timers.append(timer)
        return timer

    # --- calls into the device, contained ---------------------------------------------
    def _enter(self, kind: str, a: object = None, b: object = None) -> None:
        """A call starts: what it is (formatted only if it is ever shown), where, when."""
        self._call = (kind, a, b, threading.current_thread().name, time.monotonic())

    def _leave(self) -> None:
        call, self._call = self._call, None
        if call is not None and not self._slow_told:
            took = time.monotonic() - call[4]
            if took > SLOW_CALL:
                self._slow_told = True
                self._report(
                    f"device {self.spec.name} took {took:.1f} s in {_what(call)} on {call[3]}, "
                    "stalling it that long (a device call must not block: docs/devices.md)"
                )

    def _fail(self, why: str, what: str) -> None:
        """Fail the device (under its lock): absent from now on, told once."""
        if self.failure is not None:
            return
        self.failure = f"in {what}: {why}"
        for t in self._timers:
            self._clock.cancel(t)
        if self.irq is not None and self.irq.level:
            try:
                self.irq.set(False)
            except Exception:  # noqa: BLE001 - the VM may be closing; the line is moot then
                pass
        self._report(
            f"{self.label} failed {self.failure}; it answers as an absent device from now on"
        )

    def read(self, offset: int, size: int, bar: int | None = None) -> bytes:
        """The device's read; a PCI device's with the BAR first (bar: its index)."""
        with self._lock:
            if self.failure is None:
                self._enter("read", offset if bar is None else (bar, offset), size)
                try:
                    value = (self.device.read(offset, size) if bar is None
                             else self.device.read(bar, offset, size))
                except BaseException as e:  # noqa: BLE001 - SystemExit too: contained
                    self._fail(_why(e), _what(self._call))
                else:
                    data = _as_bytes(value, size)
                    if data is not None:
                        return data
                    self._fail(f"it returned {_shown(value)} for a {size}-byte read",
                               _what(self._call))
                finally:
                    self._leave()
        return b"\xff" * size

    def write(self, offset: int, data: bytes, bar: int | None = None) -> None:
        """The device's write; a PCI device's with the BAR first (bar: its index)."""
        with self._lock:
            if self.failure is None:
                self._enter("write", offset if bar is None else (bar, offset), data)
                try:
                    if bar is None:
                        self.device.write(offset, data)
                    else:
                        self.device.write(bar, offset, data)
                except BaseException as e:  # noqa: BLE001 - SystemExit too: contained
                    self._fail(_why(e), _what(self._call))
                finally:
                    self._leave()

    def _run_timer(self, timer: Timer) -> None:
        """On the timer thread: the callback of an armed timer that came due."""
        with self._lock:
            if self.failure is None:
                self._enter("timer", timer)
                try:
                    timer.callback()
                except BaseException as e:  # noqa: BLE001 - SystemExit too: contained
                    self._fail(_why(e), _what(self._call))
                finally:
                    self._leave()

    # --- the machine's questions ------------------------------------------------------
    def stalled(self) -> str | None:
        """The device call in progress, if any (why a vCPU may not answer a pause)."""
        call = self._call
        if call is None:
            return None
        return (
            f"device {self.spec.name} has been inside {_what(call)} on {call[3]} for "
            f"{time.monotonic() - call[4]:.1f} s"
        )

    def close(self) -> None:
        """With the machine: timers off; a call still in progress is named."""
        for t in self._timers:
            self._clock.cancel(t)
        stuck = self.stalled()
        if stuck is not None:
            self._report(f"{stuck}; the machine closed without it (that thread is left behind)")

    # --- snapshots ----------------------------------------------------------------------
    def save(self) -> UserDeviceState:
        where = f"device {self.spec.name}"
        with self._lock:
            if self.failure is not None:
                raise SnapshotError(f"{where} failed {self.failure}: it has no state to save")
            if not self._savable:
                raise SnapshotError(
                    f"{self.label} has no save() and restore(), so its machine cannot be "
                    "snapshotted (docs/devices.md)"
                )
            try:
                state = self.device.save()
            except KeyboardInterrupt:  # the user's, on the thread taking the snapshot
                raise
            except BaseException as e:  # noqa: BLE001 - contained like any device call
                self._fail(_why(e), "save()")
                raise SnapshotError(f"{where}: its save() raised {_why(e)}") from None
            plain = _plain(state, where)
            timers = []
            for t in self._timers:
                armed = self._clock.saved(t)
                if armed is not None:
                    timers.append((t.index, *armed))
            level = self.irq.level if self.irq is not None else False
            config = self.function.save() if self.function is not None else None
            return UserDeviceState(self.spec.cls, level, tuple(timers), plain, config)

    def restore(self, state: UserDeviceState) -> None:
        """The saved state into this (fresh, never started) device, all checked first."""
        where = f"device {self.spec.name}"
        st = require_state(where, state, UserDeviceState)
        if st.cls != self.spec.cls:
            raise DeviceError(f"{where}: the saved state is of {st.cls}, not {self.spec.cls}")
        level = require_bool(where, "irq", st.irq)
        if level and self.irq is None:
            raise DeviceError(f"{where}: the saved line is high, but the device has no IRQ")
        timers = self._check_timers(where, st.timers)
        if not self._savable:
            raise DeviceError(f"{self.label} has no restore()")
        config = None
        if self.function is not None:  # checked before anything is touched
            config = self.function.check_state(st.config)
        elif st.config is not None:
            raise DeviceError(f"{where}: the saved state has a PCI configuration space")
        with self._lock:
            if self.function is not None and config is not None:
                self.function.load_state(config)  # BARs re-mapped, MSI re-read
            try:
                self.device.restore(st.state)
            except (Exception, SystemExit) as e:
                raise DeviceError(f"{where}: its restore() raised {_why(e)}") from None
            for t in self._timers:
                self._clock.cancel(t)
            for index, due, interval in timers:
                self._clock.arm(self._timers[index], due, interval)
            if self.irq is not None:
                self.irq.set(level)

    def _check_timers(
        self, where: str, saved: object
    ) -> list[tuple[int, float, float | None]]:
        if type(saved) is not tuple:
            raise DeviceError(f"{where} state: timers is not a tuple")
        out = []
        for entry in saved:
            ok = type(entry) is tuple and len(entry) == 3
            if ok:
                index, due, interval = entry
                ok = (
                    type(index) is int
                    and 0 <= index < len(self._timers)
                    and type(due) is float
                    and math.isfinite(due)
                    and due >= 0
                    and (interval is None or (type(interval) is float and interval > 0
                                              and math.isfinite(interval)))
                )
            if not ok:
                raise DeviceError(
                    f"{where} state: timer {entry!r:.60} does not fit its "
                    f"{len(self._timers)} timers"
                )
            out.append((index, due, interval))
        return out


@dataclass
class _Entry:
    """An armed timer: due is an absolute monotonic time once the thread runs, and the
    delay from its start before that."""

    gen: int
    due: float
    interval: float | None


class DeviceTimers:
    """One machine's timer thread for its user devices (see the module docstring)."""

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self._cond = threading.Condition()
        self._runners: dict[Timer, Callable[[Timer], None]] = {}
        self._armed: dict[Timer, _Entry] = {}
        self._heap: list[tuple[float, int, int, Timer]] = []
        self._seq = itertools.count()
        self._gen = itertools.count(1)
        self._started = False
        self._closing = False
        self._parked = False
        self._firing = False
        self._thread: threading.Thread | None = None

    def add(self, timer: Timer, runner: Callable[[Timer], None]) -> None:
        with self._cond:
            self._runners[timer] = runner

    # --- the _Clock of userdev.Timer ----------------------------------------------------
    def arm(self, timer: Timer, delay: float, interval: float | None) -> None:
        with self._cond:
            entry = _Entry(next(self._gen), delay, interval)
            if self._started:
                entry.due = time.monotonic() + delay
                self._push(timer, entry)
            self._armed[timer] = entry
            self._cond.notify_all()

    def cancel(self, timer: Timer) -> None:
        with self._cond:
            self._armed.pop(timer, None)

    def active(self, timer: Timer) -> bool:
        with self._cond:
            return timer in self._armed

    def saved(self, timer: Timer) -> tuple[float, float | None] | None:
        """(seconds until due, period) of an armed timer, for a snapshot; else None."""
        with self._cond:
            entry = self._armed.get(timer)
            if entry is None:
                return None
            due = max(0.0, entry.due - time.monotonic()) if self._started else entry.due
            return due, entry.interval

    def _push(self, timer: Timer, entry: _Entry) -> None:
        heapq.heappush(self._heap, (entry.due, next(self._seq), entry.gen, timer))

    # --- the thread ---------------------------------------------------------------------
    def start(self) -> None:
        """With the machine: timers armed so far count from now."""
        with self._cond:
            now = time.monotonic()
            for timer, entry in self._armed.items():
                entry.due = now + entry.due
                self._push(timer, entry)
            self._started = True
        # under the vCPU role's allowlist, as the devices' read and write on the vCPU
        # threads are: one contract for all of a device's code (docs/devices.md)
        self._thread = start_thread(self._main, f"devices-{self.machine}"[:15], sandbox.VCPU)

    def _next(self) -> tuple[Timer, Callable[[Timer], None]] | None:
        """Wait for the next due timer (None: closing); re-arm it if periodic."""
        with self._cond:
            while True:
                if self._closing:
                    return None
                if self._parked or not self._heap:
                    self._cond.wait()
                    continue
                due, _, gen, timer = self._heap[0]
                entry = self._armed.get(timer)
                if entry is None or entry.gen != gen:
                    heapq.heappop(self._heap)  # cancelled or re-armed since
                    continue
                now = time.monotonic()
                if due > now:
                    self._cond.wait(due - now)
                    continue
                heapq.heappop(self._heap)
                if entry.interval is None:
                    del self._armed[timer]
                else:  # periodic: the next tick, skipping those already missed
                    entry.due = due + entry.interval
                    if entry.due <= now:
                        entry.due = now + entry.interval
                    self._push(timer, entry)
                self._firing = True
                return timer, self._runners[timer]

    def _main(self) -> None:
        while True:
            due = self._next()
            if due is None:
                return
            timer, runner = due
            try:
                runner(timer)  # contained: a failing callback fails its device only
            finally:
                with self._cond:
                    self._firing = False
                    self._cond.notify_all()

    def park(self) -> None:
        """Fire nothing until unpark (a frozen machine); returns once no callback runs."""
        with self._cond:
            self._parked = True
            self._cond.wait_for(lambda: not self._firing, PARK_TIMEOUT)
            if self._firing:
                self._parked = False
                raise DeviceError(
                    f"{self.machine}: a device's timer callback has not returned within "
                    f"{PARK_TIMEOUT:g} s"
                )

    def unpark(self) -> None:
        with self._cond:
            self._parked = False
            self._cond.notify_all()

    def close(self) -> None:
        """End the thread (a callback running finishes first, for up to JOIN_TIMEOUT)."""
        with self._cond:
            self._closing = True
            self._armed.clear()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
