"""System: a controller of partitions (one Machine each), their health monitor and events.

A System holds the partitions of a SystemSpec plus any added while it runs, the
channels between them and the shared console. Each partition is a state machine::

    created --start--> running --pause--> paused --resume--> running
    created | running | paused --stop--> stopped            (or the guest ends by itself)
    running | paused | stopped --restart--> restarting --> running
    running --crash, restart = "restart"--> restarting --> running   (the health monitor)
    created | stopped --remove--> gone

**Operations.** add, remove, start, pause, resume, stop and restart act on one
partition by name, from any thread, while the others keep running. Each checks its
transition and refuses with StateError (``cannot pause partition rtos: it is stopped``;
an API answers 409) or NotFoundError (``no partition named rtos``; 404). One
partition's operations are serialized by its lock; different partitions proceed in
parallel; the monitor never waits for a busy partition (it looks again next period).
An operation returns when its transition is done: start and resume once every vCPU
runs, pause once every vCPU has parked, stop once the vCPU threads have ended.

**The health monitor** (``run`` in the calling thread, or ``start_monitor`` for a
daemon) looks at every running partition every POLL_INTERVAL: its watchdog, whether its
guest halted with interrupts off (halt.py) and whether it stopped. Then:

- the guest exited (port 0xF4), powered off or reset: that partition is stopped, with
  the guest's status (0 for a reset or power-off);
- the guest stopped abnormally (triple fault, emulation failure, halted with interrupts
  off, a VMM fault) or its watchdog expired: ``restart = "stop"`` leaves it stopped,
  ``"restart"`` rebuilds it (fresh memory and devices, same cores, same channels:
  channel memory persists), at most MAX_RESTARTS times in RESTART_WINDOW seconds, then
  treats it as "stop"; ``"halt-system"`` stops every partition.

Other partitions are never touched (except by halt-system): each has its own VM,
threads and cores. A paused partition's watchdog does not run; resume re-arms it.

**Channels at run time.** ``add`` may bring new channels joining the new partition to
existing ones, and ``remove`` takes a partition's channels away with it. A guest finds
its channels once, at boot (HC_CHANNEL_INFO; ABI 1.0 has no hot-add), so the other end
must not be running or paused: a created one is rebuilt at once with its new channel
list, a stopped one gets it when it starts again; a running one refuses (StateError).

**Serial taps.** With ``tap_serial`` every partition's serial output also goes through
a SerialTap owned by the system (console.py), which outlives restarts: ``serial(name)``
gives it to a reader (the API's serial stream).

**Events.** Every state change, end, crash, restart, watchdog expiry and report is an
Event. ``subscribe(callback)`` receives them in order, one at a time, on the thread
that caused them or on the monitor's -- never on a vCPU or I/O thread (reports made
there are queued and delivered by the next operation or monitor look). A callback must
not block (an event stream queues and returns); it may call System methods. By default
one subscriber prints each event except state changes as ``corevisor: NAME: ...`` on
stderr, followed by the register dump of abnormal stops.

**run(timeout)** is the CLI's whole life: build every partition, start them all,
monitor until every one has stopped, release everything. Its exit status is 0 if every
partition ended with 0, else the status of the first partition (in time) that did not.
A partition stopped by the host counts as 1 (timeout, halt-system, the API), or 128 + N
when a signal N stopped the run (``request_stop``: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).

What does not live here: building one machine (builder.py), the machine's own
lifecycle (machine.py), channel resources (channel.py), hypercalls (hypercall.py),
validating the file (config/), signal handlers (signals.py).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from corevisor.arch.x86_64.cpu import format_registers
from corevisor.builder import PartitionLinks, build
from corevisor.channel import Channel, ChannelEnd, ends_for, open_channels
from corevisor.console import ConsoleMux, PrefixedSerial, SerialBackend, SerialTap, open_serial
from corevisor.errors import CorevisorError, MigrationError, NotFoundError, StateError, show
from corevisor.machine import Machine
from corevisor.outputs import silence
from corevisor.signals import describe, exit_status, start_thread
from corevisor.spec import ChannelSpec, PartitionSpec, RestartPolicy, SerialKind, SystemSpec
from corevisor.vcpu import StopReport

if TYPE_CHECKING:  # snapshots load their code only when one is taken or restored
    from corevisor.memory import GuestMemory
    from corevisor.runstats import MachineRun
    from corevisor.snapshot.format import Snapshot
    from corevisor.snapshot.migrate import MigrationResult, Progress
    from corevisor.snapshot.partition import Overrides
    from corevisor.snapshot.state import MachineSnapshot
    from corevisor.snapshot.system import SystemSnapshot

__all__ = [
    "System",
    "PartitionState",
    "PartitionInfo",
    "Event",
    "Watchdog",
    "MAX_RESTARTS",
    "RESTART_WINDOW",
    "EXIT_GUEST_FAULT",
]

EXIT_GUEST_FAULT = 1
EXIT_INTERRUPTED = 130
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0  # seconds
POLL_INTERVAL = 0.02  # the monitor's period: watchdog resolution and reaction time
_QUIET_KINDS = frozenset({"state", "restart", "removed"})  # not printed by the default echo


class PartitionState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    RESTARTING = "restarting"


_S = PartitionState


@dataclass(frozen=True)
class Event:
    """Something that happened to a partition (or to the system: partition "system").

    kind:
      "state"     a transition; ``state`` is the new state, message "OLD -> NEW"
      "exit"      the guest ended by itself (exit port, power-off, reset); ``status``
      "stopped"   the host stopped it (API, timeout, signal, halt-system); ``status``
      "crash"     the guest stopped abnormally; message says why and what the policy does
      "watchdog"  the watchdog expired (then handled like a crash, same message form)
      "restart"   rebuilt and started again (by the policy or by restart())
      "removed"   the partition is gone
      "error"     an operation in the background failed (a restart that could not build)
      "message"   a report from a device, the GDB stub or the system
    """

    partition: str
    kind: str
    message: str = ""
    state: PartitionState | None = None  # the partition's state after the event
    status: int | None = None
    registers: str = ""
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PartitionInfo:
    """A snapshot of one partition, for listings (an API's GET /partitions)."""

    name: str
    index: int
    state: PartitionState
    status: int | None  # how it last ended, once stopped
    restarts: int  # restarts so far (by the policy or restart())
    last: str  # why it last stopped ("" until then)
    config: PartitionSpec


class Watchdog:
    """A partition's watchdog: a deadline the guest pushes forward (HC_WATCHDOG).

    kick runs on a vCPU thread and only stores a float (atomic under the GIL); the
    monitor compares it with the clock every POLL_INTERVAL.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.period_ms = 0
        self.deadline: float | None = None

    def kick(self, ms: int) -> None:
        """Re-arm for ms milliseconds from now; 0 disarms."""
        self.period_ms = ms
        self.deadline = self._clock() + ms / 1000 if ms else None

    def rearm(self, at_least_ms: int = 0) -> None:
        """A full period from now, if armed (after a pause: the guest could not kick);
        at_least_ms: no shorter than that (a restored guest's first period)."""
        if self.deadline is not None:
            self.deadline = self._clock() + max(self.period_ms, at_least_ms) / 1000

    def expired(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    # --- save / restore ------------------------------------------------------------
    def save(self) -> WatchdogState:
        """The period and what is left of it (a deadline on this host's clock means
        nothing elsewhere); call with the machine paused."""
        deadline = self.deadline
        left = None if deadline is None else max(0, round((deadline - self._clock()) * 1000))
        return WatchdogState(self.period_ms, left)

    def restore(self, state: WatchdogState) -> None:
        """Re-arm with what was left: the guest, whose clocks did not move while saved,
        has exactly that long to kick."""
        from corevisor.snapshot import require_state, require_uint  # keeps the imports as they were

        st = require_state("watchdog", state, WatchdogState)
        require_uint("watchdog", "period_ms", st.period_ms, 63)
        if st.left_ms is not None:
            require_uint("watchdog", "left_ms", st.left_ms, 63)
        self.period_ms = st.period_ms
        self.deadline = None if st.left_ms is None else self._clock() + st.left_ms / 1000


@dataclass(frozen=True)
class WatchdogState:
    period_ms: int
    left_ms: int | None  # None: not armed


class _Partition:
    """One partition: its config and links, its current machine, what happened to it."""

    def __init__(
        self,
        index: int,
        config: PartitionSpec,
        links: PartitionLinks,
        watchdog: Watchdog,
        console: PrefixedSerial | SerialTap | None,
    ) -> None:
        self.index = index
        self.config = config
        self.links = links
        self.watchdog = watchdog
        self.console = console  # owned here (a shared terminal, a tap); outlives restarts
        self.state = _S.CREATED  # written under lock; read anywhere
        self.machine: Machine | None = None
        self.status: int | None = None
        self.window: collections.deque[float] = collections.deque()  # policy restarts
        self.restarts = 0
        self.last = ""
        self.expired = False  # the report being handled came from the watchdog
        self.restored = False  # its machine continues a saved guest (not started yet)
        self.lock = threading.RLock()

    @property
    def name(self) -> str:
        return self.config.name

    def info(self) -> PartitionInfo:
        return PartitionInfo(
            self.name, self.index, self.state, self.status, self.restarts, self.last,
            self.config,
        )


class System:
    """Partitions run together under a health monitor, controllable from any thread."""

    def __init__(
        self,
        config: SystemSpec,
        kvm_path: str = "/dev/kvm",
        err: TextIO | None = None,
        echo: bool = True,
        shared_console: bool | None = None,
        collect_stats: bool = False,
        tap_serial: bool = False,
    ) -> None:
        """echo: print events on err (stderr). shared_console: stdout partitions share
        the terminal line by line, with log files (default: unless the file has exactly
        one partition and no log_dir, which keeps plain stdout with input).
        collect_stats: --stats, every machine's statistics as it closes (runstats.py).
        tap_serial: every partition's serial output can be read with serial(name) (a
        daemon)."""
        self.config = config
        self.stats: list[MachineRun] | None = [] if collect_stats else None
        self.kvm_path = kvm_path
        self._err = err if err is not None else sys.stderr
        self._lock = threading.RLock()  # the partition table, channels, consoles, flags
        self._parts: dict[str, _Partition] = {}
        self._reserved: set[str] = set()  # names being added (built outside the lock)
        self._next_index = 0
        self._channels: list[Channel] = []
        self._channels_started = False
        if shared_console is None:
            shared_console = len(config.partitions) != 1 or config.log_dir is not None
        self._shared = shared_console
        self._tap = tap_serial
        self._mux: ConsoleMux | None = None
        self._width = 0
        self.log_dir: Path | None = None
        self._opened = False
        self._closed = False
        self._first_failure: int | None = None
        self._stop_request: tuple[int, str] | None = None
        self._stop_handled: tuple[int, str] | None = None
        self._subscribers: list[Callable[[Event], None]] = [self._echo] if echo else []
        self._events: collections.deque[Event] = collections.deque()
        self._delivering = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()
        self._migrations: dict[str, Progress] = {}  # the latest migration of each partition

    # --- events -----------------------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Receive every later Event (see the module docstring); returns unsubscribe."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def report(self, name: str, message: str, registers: str = "") -> None:
        """A "message" event about name (any thread; delivered later from a safe one)."""
        self._events.append(Event(name, "message", message, registers=registers))

    def _publish(
        self, p: _Partition, kind: str, message: str = "", status: int | None = None,
        registers: str = "",
    ) -> None:
        """Queue an event about p (delivered by _deliver, outside every partition lock)."""
        self._events.append(Event(p.name, kind, message, p.state, status, registers))

    def _deliver(self) -> None:
        """Hand queued events to the subscribers, in order, one deliverer at a time."""
        while self._events:
            if not self._delivering.acquire(blocking=False):
                return  # another thread (or this one, further up) is delivering them
            try:
                while self._events:
                    event = self._events.popleft()
                    for callback in list(self._subscribers):
                        try:
                            callback(event)
                        except Exception:  # noqa: BLE001 - a subscriber must not break us
                            self._write("corevisor: event subscriber failed:\n"
                                        + traceback.format_exc())
            finally:
                self._delivering.release()

    def _echo(self, event: Event) -> None:
        """The default subscriber: one line on stderr, plus a register dump if any."""
        if event.kind in _QUIET_KINDS:
            return
        text = f"corevisor: {event.partition}: {show(event.message, limit=None)}\n"
        self._write(text + (event.registers + "\n" if event.registers else ""))

    def _write(self, text: str) -> None:
        try:
            self._err.write(text)
            self._err.flush()
        except (OSError, ValueError):
            # A failed stderr loses the line, never the status: pointed at /dev/null,
            # what it still buffers drains at exit instead of making that fail (120).
            silence(self._err)

    def _set_state(self, p: _Partition, state: PartitionState) -> None:
        old, p.state = p.state, state
        self._publish(p, "state", f"{old.value} -> {state.value}")

    # --- looking partitions up -----------------------------------------------------------
    def partitions(self) -> list[PartitionInfo]:
        """Every partition, in the order they were added."""
        return [p.info() for p in list(self._parts.values())]

    def partition(self, name: str) -> PartitionInfo:
        return self._get(name).info()

    def serial(self, name: str) -> SerialTap:
        """The partition's serial tap (the system needs tap_serial)."""
        console = self._get(name).console
        if not isinstance(console, SerialTap):
            raise StateError(f"partition {name}: its serial output is not tapped")
        return console

    def channels(self) -> list[Channel]:
        """The open channels (borrowed; for their counters)."""
        return list(self._channels)

    def spec(self) -> SystemSpec:
        """The system as it is now: what a new partition is validated against
        (config/validate.validate_addition)."""
        with self._lock:
            parts = tuple(p.config for p in self._parts.values())
            channels = tuple(ch.config for ch in self._channels)
        return SystemSpec(parts, channels=channels, log_dir=self.log_dir)

    def machine(self, name: str) -> Machine | None:
        """The partition's current machine (borrowed: the monitor may close and replace
        it at any time; None while stopped)."""
        return self._get(name).machine

    @property
    def exit_status(self) -> int:
        """0 if every partition ended with 0, else the first non-zero status (in time)."""
        return self._first_failure or 0

    def _get(self, name: str) -> _Partition:
        p = self._parts.get(name)
        if p is None:
            raise NotFoundError(f"no partition named {name}")
        return p

    @contextlib.contextmanager
    def _operation(self, name: str) -> Iterator[_Partition]:
        """The partition, locked for one operation; events are delivered afterwards."""
        try:
            p = self._get(name)
            with p.lock:
                if self._parts.get(name) is not p:
                    raise NotFoundError(f"no partition named {name}")
                yield p
        finally:
            self._deliver()

    @staticmethod
    def _require(p: _Partition, verb: str, *allowed: PartitionState) -> None:
        if p.state not in allowed:
            raise StateError(f"cannot {verb} partition {p.name}: it is {p.state.value}")

    # --- opening --------------------------------------------------------------------------
    def open(self) -> None:
        """Open the channels and the shared console, then add every configured partition
        (built, not started). Idempotent; on failure close() releases what was opened."""
        with self._lock:
            if self._closed:
                raise StateError("cannot open the system: it is closed")
            if self._opened:
                return
            self._opened = True
            self._channels = open_channels(self.config.channels)
            if self._shared:
                self._open_console()
        for part in self.config.partitions:
            self.add(part)

    def _open_console(self) -> None:
        log_dir = self.config.log_dir
        if log_dir is None:
            log_dir = Path(tempfile.mkdtemp(prefix="corevisor-logs-"))
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CorevisorError(f"log_dir {log_dir}: {e.strerror or e}") from None
        self.log_dir = log_dir
        # The shared terminal reports its own failure (and a log's) as an event.
        self._mux = ConsoleMux(report=self.report)
        self._width = max((len(p.name) for p in self.config.partitions), default=0)
        n = len(self.config.partitions)
        self.report("system", f"{n} partition{'s' if n != 1 else ''}; serial logs in {log_dir}")
        self._deliver()

    def _console(self, config: PartitionSpec) -> PrefixedSerial | SerialTap | None:
        """The partition's serial backend if the system owns it: a shared-terminal one for
        a "stdout" partition, any backend behind a tap (None: the machine opens its own)."""
        shared: PrefixedSerial | None = None
        if (
            self._mux is not None and self.log_dir is not None
            and config.serial.kind is SerialKind.STDOUT
        ):
            width = max(self._width, len(config.name))
            log = str(self.log_dir / f"{config.name}.log")
            shared = self._mux.backend(config.name, log, width)
        if not self._tap:
            return shared
        inner: SerialBackend = shared if shared is not None else open_serial(
            config.serial, config.name, self.report
        )
        return SerialTap(inner)

    # --- operations -----------------------------------------------------------------------
    def add(self, config: PartitionSpec, channels: Sequence[ChannelSpec] = ()) -> PartitionInfo:
        """Build a new partition (state created) while the others run; not started.

        channels: new channels (validated and placed: validate_addition) joining it to
        existing partitions, which must be created or stopped (module docstring).
        """
        name = config.name
        index = self._reserve(name)
        try:
            peers = {end for c in channels for end in c.between} - {name}
            with self._locked(peers) as held:
                for peer in held:
                    self._require_idle(peer, f"add channel to partition {name}")
                opened = self._open_more(channels)
                try:
                    p = self._new_partition(index, config, ends_for(name, self._channels))
                except BaseException:
                    self._close_channels(opened)
                    raise
                with self._lock:
                    self._parts[name] = p
                self._publish(p, "state", "-> created")
                for peer in held:
                    self._rewire(peer)
            return p.info()
        finally:
            with self._lock:
                self._reserved.discard(name)
            self._deliver()

    def _reserve(self, name: str) -> int:
        """Claim name for a partition being built (outside the lock); its index. The
        caller discards the name from _reserved once the partition is in (or failed)."""
        with self._lock:
            if self._closed or not self._opened:
                raise StateError(f"cannot add partition {name}: the system is not open")
            if name in self._parts or name in self._reserved:
                raise StateError(f"cannot add partition {name}: a partition of that name exists")
            self._reserved.add(name)
            index = self._next_index
            self._next_index += 1
            return index

    @contextlib.contextmanager
    def _locked(self, names: set[str]) -> Iterator[list[_Partition]]:
        """The named partitions, each locked, in name order (so two operations that
        lock several never deadlock); NotFoundError for one that does not exist."""
        parts = [self._get(n) for n in sorted(names)]
        with contextlib.ExitStack() as stack:
            for p in parts:
                stack.enter_context(p.lock)
                if self._parts.get(p.name) is not p:
                    raise NotFoundError(f"no partition named {p.name}")
            yield parts

    @staticmethod
    def _require_idle(p: _Partition, what: str) -> None:
        """p's guest must not be running: it reads its channel list only at boot."""
        if p.state not in (_S.CREATED, _S.STOPPED):
            raise StateError(
                f"cannot {what}: partition {p.name} is {p.state.value} and its guest finds "
                "channels only at boot (stop it first)"
            )

    def _open_more(self, specs: Sequence[ChannelSpec]) -> list[Channel]:
        """Open channels at run time (their relays started if the others' are)."""
        opened = open_channels(specs)
        with self._lock:
            self._channels.extend(opened)
            if self._channels_started:
                for ch in opened:
                    ch.start()
        return opened

    def _close_channels(self, channels: Sequence[Channel]) -> None:
        with self._lock:
            self._channels = [ch for ch in self._channels if ch not in channels]
        for ch in channels:
            ch.close()

    def _rewire(self, p: _Partition) -> None:
        """p's channel list changed (p's lock held; p created or stopped): a created
        partition is rebuilt now, a stopped one picks it up when it starts again."""
        p.links = replace(p.links, channels=ends_for(p.name, self._channels))
        if p.state is not _S.CREATED:
            return
        self._close_machine(p)
        try:
            p.machine = build(p.config, self.kvm_path, p.links)
        except CorevisorError as e:
            self._end(p, EXIT_GUEST_FAULT, "error", f"rebuild with new channels failed: {e}")

    def _new_partition(
        self,
        index: int,
        config: PartitionSpec,
        channels: tuple[ChannelEnd, ...],
        make: Callable[[PartitionLinks], Machine] | None = None,
    ) -> _Partition:
        """make: how its machine is made from its links (default: build config)."""
        console = self._console(config)
        try:
            watchdog = Watchdog()
            links = PartitionLinks(
                index=index,
                channels=channels,
                serial=console,
                watchdog=watchdog.kick,
                report=self.report,
                parts=(("watchdog", watchdog),),
                stats=self.stats.append if self.stats is not None else None,
            )
            p = _Partition(index, config, links, watchdog, console)
            if make is not None:
                p.machine = make(links)
            else:
                p.machine = build(config, self.kvm_path, links)
        except BaseException:
            if console is not None:
                console.close()
            raise
        return p

    def start(self, name: str) -> None:
        """created -> running."""
        with self._operation(name) as p:
            self._require(p, "start", _S.CREATED)
            self._launch(p)

    def pause(self, name: str) -> None:
        """running -> paused: every vCPU parked; the watchdog does not run meanwhile."""
        with self._operation(name) as p:
            self._require(p, "pause", _S.RUNNING)
            m = p.machine
            assert m is not None
            try:
                m.pause()
            except StateError:  # the guest stopped just now; the monitor handles it
                raise StateError(f"cannot pause partition {name}: it has stopped") from None
            self._set_state(p, _S.PAUSED)

    def resume(self, name: str) -> None:
        """paused -> running, with the watchdog re-armed for a full period."""
        with self._operation(name) as p:
            self._require(p, "resume", _S.PAUSED)
            m = p.machine
            assert m is not None
            p.watchdog.rearm()
            try:
                m.resume()
            except StateError:
                raise StateError(f"cannot resume partition {name}: it has stopped") from None
            self._set_state(p, _S.RUNNING)

    def stop(self, name: str, why: str = "stopped by the host") -> None:
        """created | running | paused -> stopped (status 1); the vCPU threads end."""
        with self._operation(name) as p:
            self._require(p, "stop", _S.CREATED, _S.RUNNING, _S.PAUSED)
            self._stop(p, why, EXIT_GUEST_FAULT)

    def restart(self, name: str) -> None:
        """running | paused | stopped -> restarting -> running: a fresh machine."""
        with self._operation(name) as p:
            self._require(p, "restart", _S.RUNNING, _S.PAUSED, _S.STOPPED)
            self._restart(p, "restarted by the host", raise_errors=True)

    def remove(self, name: str) -> None:
        """created | stopped -> gone: its machine, console and channels are released (the
        other end of each channel must be created or stopped too)."""
        try:
            while True:
                peers = self._peers(name)
                with self._locked({name, *peers}) as held:
                    if self._peers(name) != peers:
                        continue  # a channel came or went meanwhile: lock the new set
                    p = next(q for q in held if q.name == name)
                    self._require(p, "remove", _S.CREATED, _S.STOPPED)
                    for q in held:
                        if q is not p:
                            self._require_idle(q, f"remove partition {name}")
                    self._close_machine(p)
                    if p.console is not None:
                        p.console.close()
                    with self._lock:
                        del self._parts[name]
                        gone = [ch for ch in self._channels if name in ch.config.between]
                        self._channels = [ch for ch in self._channels if ch not in gone]
                    for q in held:  # before the fds close: a created peer's VM holds them
                        if q is not p:
                            self._rewire(q)
                    for ch in gone:
                        ch.close()
                    self._publish(p, "removed", "removed")
                    return
        finally:
            self._deliver()

    def _peers(self, name: str) -> set[str]:
        """The partitions a channel joins to name."""
        with self._lock:
            return {e for ch in self._channels if name in ch.config.between
                    for e in ch.config.between} - {name}

    # --- snapshots ------------------------------------------------------------------------
    def snapshot(self, name: str, path: Path) -> Snapshot:
        """Save partition name (created, running or paused) into the directory path
        (docs/snapshot-format.md) and let it run on as it was. Refused before anything is
        paused for state corevisor cannot save; a failed write removes its files."""
        from corevisor.snapshot.partition import take

        with self._operation(name) as p:
            self._require(p, "snapshot", _S.CREATED, _S.RUNNING, _S.PAUSED)
            m = p.machine
            assert m is not None
            started = time.monotonic()
            try:
                snap = take(m, Path(path))
            except StateError:
                raise StateError(f"cannot snapshot partition {name}: it has stopped") from None
            finally:
                if p.state is _S.RUNNING:
                    p.watchdog.rearm()  # it could not kick while frozen
            took = (time.monotonic() - started) * 1000
            self._publish(p, "message", f"snapshot in {show(str(path))} ({took:.0f} ms, "
                          f"{snap.memory.data_bytes >> 20} MiB of RAM written)")
            return snap

    def restore(
        self, path: Path, overrides: Overrides | None = None, start: bool = True
    ) -> PartitionInfo:
        """Add a partition continuing the guest saved in the directory path, with
        overrides for what must differ (a clone's name, serial, TAPs, disks, cores);
        started unless start is False. Every check (format, checksums, version, the
        host's CPU, the spec against this host and system) runs before anything is
        built; a failure starts nothing and adds nothing."""
        from corevisor.snapshot import partition

        snap = partition.read(Path(path))
        config = partition.restored_spec(snap, overrides or partition.Overrides())
        self._check_addition(config)
        name = config.name

        def make(links: PartitionLinks) -> Machine:
            return partition.restore(snap, overrides, self.kvm_path, links, config)

        info = self._add_made(config, make)
        if start:
            self.start(name)
            info = self.partition(name)
        return info

    def snapshot_system(self, path: Path) -> SystemSnapshot:
        """Save every partition and every channel (its memory and waiting doorbells) at
        one instant into the directory path (snapshot/system.py): all partitions are
        frozen together, then each runs on as it was. A stopped partition is refused
        (remove it first); a failed write removes its files."""
        from corevisor.snapshot import system as saved
        from corevisor.snapshot.partition import movable

        with contextlib.ExitStack() as stack:
            parts = [self._get(n) for n in sorted(self._parts)]
            for p in parts:
                stack.enter_context(p.lock)
                self._require(p, "snapshot the system with partition", _S.CREATED,
                              _S.RUNNING, _S.PAUSED)
            machines = [p.machine for p in sorted(parts, key=lambda q: q.index)]
            for m in machines:
                assert m is not None
                movable(m)
            try:
                for m in machines:
                    stack.enter_context(m.frozen())  # type: ignore[union-attr]
                for ch in self._channels:
                    stack.enter_context(ch.held())
                snap = saved.write(Path(path), machines, self._channels)  # type: ignore[arg-type]
            finally:
                for p in parts:
                    if p.state is _S.RUNNING:
                        p.watchdog.rearm()
        self.report("system", f"system snapshot in {show(str(path))}")
        self._deliver()
        return snap

    def restore_system(self, path: Path, start: bool = True) -> list[PartitionInfo]:
        """Add every partition of a system snapshot (this system must have none yet),
        its channels opened with their saved memory, the waiting doorbells rung once
        every partition is restored; started unless start is False."""
        from corevisor.channel import open_channels
        from corevisor.snapshot import partition
        from corevisor.snapshot import system as saved

        snap = saved.read(Path(path))
        with self._lock:
            if self._parts or self._channels:
                raise StateError("cannot restore a system snapshot: this system is not empty")
            self._channels = open_channels([c.spec for c in snap.channels])
        for ch, c in zip(self._channels, snap.channels, strict=True):
            saved.load_channel(ch, c)
        for _, where in snap.partitions:
            self.restore(where, partition.Overrides(serial=None), start=False)
        for ch, c in zip(self._channels, snap.channels, strict=True):
            ch.restore(c.state)
        if start:
            for name, _ in snap.partitions:
                self.start(name)
        return self.partitions()

    def incoming(
        self,
        address: str,
        overrides: Overrides | None = None,
        on_progress: Callable[[dict[str, object]], None] | None = None,
    ) -> PartitionInfo:
        """Wait on address (tcp:HOST:PORT or unix:PATH) for one live migration and add
        the partition it brings, running (snapshot/migrate.py). The guest is checked
        (CPU, spec against this host and system, overrides applied) before any page is
        taken; a failure at any point leaves nothing behind here."""
        from corevisor.builder import prepare_restore, restore_state
        from corevisor.snapshot import migrate
        from corevisor.snapshot.partition import Overrides, spec_for_restore

        addr = migrate.Address.parse(address)
        o = overrides if overrides is not None else Overrides()
        listener = migrate.listen(addr)
        self.report("system", f"waiting for a migration on {addr}")
        self._deliver()

        def accept(inc: migrate.Incoming) -> PartitionSpec:
            migrate.with_host(inc, self.kvm_path)
            config = spec_for_restore(inc.spec, f"{addr}: the source's spec", o)
            self._check_addition(config)
            return config

        def build(config: PartitionSpec, memory: GuestMemory) -> str:
            self._add_made(config, lambda links: prepare_restore(
                config, memory, self.kvm_path, links
            ))
            return config.name

        def restore(name: str, state: MachineSnapshot) -> None:
            m = self.machine(name)
            assert m is not None
            restore_state(m, state, new_generation=False)

        def discard(name: str) -> None:
            with contextlib.suppress(CorevisorError):
                self.stop(name, "the migration failed")
            with contextlib.suppress(CorevisorError):
                self.remove(name)

        try:
            name = migrate.receive(
                listener, str(addr), accept, build, restore, self.start, discard, on_progress,
                cancelled=lambda: self._stop_request is not None,
            )
        except BaseException:
            if on_progress is not None:
                on_progress({"phase": "failed"})
            raise
        finally:
            listener.close()
            migrate.remove_socket(addr)
        if on_progress is not None:
            on_progress({"phase": "done"})
        self.report(name, f"migrated in through {addr}")
        self._deliver()
        return self.partition(name)

    def migrate(
        self,
        name: str,
        to: str,
        *,
        max_downtime: float | None = None,
        timeout: float | None = None,
        bandwidth: float | None = None,
        throttle: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> MigrationResult:
        """Move partition name (running or paused) live to the target waiting on `to`
        (`corevisor run --incoming ADDR`, or a System.incoming); it then ends here with
        status 0. On failure (MigrationError, one line) it runs on here as before.
        max_downtime: seconds the guest may be paused at the end (default 0.3);
        timeout: seconds before a guest that does not converge gives up; bandwidth:
        bytes/s at most. migration(name) tells the progress meanwhile."""
        from corevisor.snapshot import migrate

        address = migrate.Address.parse(to)
        with self._operation(name) as p:
            self._require(p, "migrate", _S.RUNNING, _S.PAUSED)
            m = p.machine
            assert m is not None
            progress = migrate.Progress(str(address))
            self._migrations[name] = progress
            try:
                result = migrate.send(
                    m, address,
                    max_downtime=migrate.DEFAULT_MAX_DOWNTIME if max_downtime is None
                    else max_downtime,
                    timeout=migrate.DEFAULT_TIMEOUT if timeout is None else timeout,
                    bandwidth=bandwidth, throttle=throttle, progress=progress,
                    on_progress=on_progress,
                )
            except CorevisorError as e:
                if p.state is _S.RUNNING:
                    p.watchdog.rearm()
                self._publish(p, "message", f"migration to {address} failed, it runs on "
                              f"here: {e}")
                raise MigrationError(str(e)) from None
            self._stop(p, f"migrated to {address} ({result.downtime_ms:.0f} ms down)", 0)
            return result

    def migration(self, name: str) -> Progress | None:
        """The progress of partition name's latest migration (None if it had none)."""
        self._get(name)
        return self._migrations.get(name)

    def _check_addition(self, config: PartitionSpec) -> None:
        """config checked against the partitions already here (names, dedicated cores,
        listening sockets, memory)."""
        from corevisor.config.host import gather
        from corevisor.config.validate import API_KEYS, validate_addition
        from corevisor.errors import ConfigError

        with self._lock:
            here = tuple(q.config for q in self._parts.values())
            names = {q.name for q in here}
            # Channels to partitions not restored yet (a system restore adds them one by
            # one) are the restore's to check: each end against the saved guest's.
            channels = tuple(ch.config for ch in self._channels
                             if set(ch.config.between) <= names)
        try:
            validate_addition(config, SystemSpec(here, channels=channels), gather(),
                              keys=API_KEYS, gdb_allow_remote=True)
        except ConfigError as e:
            raise StateError(f"cannot add partition {config.name}: {e}") from None

    def _add_made(
        self, config: PartitionSpec, make: Callable[[PartitionLinks], Machine]
    ) -> PartitionInfo:
        """add() for a machine made by make (a restore, a migration's target)."""
        name = config.name
        index = self._reserve(name)
        with self._lock:
            channels = ends_for(name, self._channels)
        try:
            p = self._new_partition(index, config, channels, make)
            p.restored = True
            with self._lock:
                self._parts[name] = p
            self._publish(p, "state", "-> created")
            return p.info()
        finally:
            with self._lock:
                self._reserved.discard(name)
            self._deliver()

    # --- transitions (the partition's lock held) -----------------------------------------
    def _start_channels(self) -> None:
        with self._lock:
            if not self._channels_started:
                self._channels_started = True
                for ch in self._channels:
                    ch.start()

    def _launch(self, p: _Partition) -> None:
        """Start p's (built) machine: channels first, the watchdog armed from the config
        (a restored guest's as it was saved)."""
        m = p.machine
        assert m is not None
        self._start_channels()
        if p.restored:
            # Armed as saved, its first period from now and no shorter than the
            # configured one: the guest's clocks stood still while it was saved, and a
            # restored guest starts cold, as at boot (on a shadow MMU: every page faults).
            p.restored = False
            p.watchdog.rearm(at_least_ms=p.config.watchdog_ms)
        else:
            p.watchdog.kick(p.config.watchdog_ms)
        try:
            m.start()
        except BaseException as e:
            self._end(p, EXIT_GUEST_FAULT, "error", f"failed to start: {e}")
            raise
        self._set_state(p, _S.RUNNING)

    def _stop(self, p: _Partition, why: str, code: int) -> None:
        m = p.machine
        if m is None:  # created partitions always have one; a stopped one has none
            return
        m.stop(why, code=code)
        self._handle(p, m)

    def _handle(self, p: _Partition, m: Machine) -> None:
        """p's machine has stopped: publish why and apply its policy."""
        report = m.wait()
        assert report is not None
        if report.kind == "exit":
            self._end(p, report.code or 0, "exit", report.message)
        elif report.kind == "reset":
            self._end(p, 0, "exit", report.message)
        elif report.kind == "stopped":
            status = report.code if report.code is not None else EXIT_GUEST_FAULT
            self._end(p, status, "stopped", f"stopped: {report.message}")
        else:
            self._crashed(p, report)

    def _crashed(self, p: _Partition, report: StopReport) -> None:
        policy = p.config.restart
        now = time.monotonic()
        while p.window and now - p.window[0] > RESTART_WINDOW:
            p.window.popleft()
        restart = policy is RestartPolicy.RESTART and len(p.window) < MAX_RESTARTS
        if restart:
            p.window.append(now)
            action = f"restarting ({len(p.window)}/{MAX_RESTARTS} in {RESTART_WINDOW:g} s)"
        elif policy is RestartPolicy.RESTART:
            action = f"crash loop ({MAX_RESTARTS} restarts in {RESTART_WINDOW:g} s): stays down"
        elif policy is RestartPolicy.HALT_SYSTEM:
            action = "halting the system"
        else:
            action = "stays down; the other partitions continue"
        kind = "watchdog" if p.expired else "crash"
        p.expired = False
        message = f"guest stopped: {report.message} [restart = {policy}: {action}]"
        if restart:
            self._publish(p, kind, message, registers=report.registers)
            self._restart(p, action, raise_errors=False)
            return
        self._end(p, EXIT_GUEST_FAULT, kind, message, report.registers)
        if policy is RestartPolicy.HALT_SYSTEM:
            self._stop_all(f"system halted: partition {p.name} stopped abnormally")

    def _restart(self, p: _Partition, why: str, raise_errors: bool) -> None:
        """A fresh machine for p: same config, cores and channel ends."""
        if p.machine is not None and p.machine.report is None:
            p.machine.stop("restarting")
        self._set_state(p, _S.RESTARTING)
        self._close_machine(p)
        if p.console is not None:
            p.console.break_line()
        try:
            p.machine = build(p.config, self.kvm_path, p.links)
            self._launch(p)
        except CorevisorError as e:
            if p.state is not _S.STOPPED:
                self._end(p, EXIT_GUEST_FAULT, "error", f"restart failed: {e}")
            if raise_errors:
                raise
            return
        p.restarts += 1
        self._publish(p, "restart", why)

    def _end(
        self, p: _Partition, status: int, kind: str, message: str, registers: str = ""
    ) -> None:
        """p is stopped for good (until restart): record how and release its machine."""
        p.status = status
        p.last = message
        if status and self._first_failure is None:
            self._first_failure = status
        self._close_machine(p)
        self._set_state(p, _S.STOPPED)
        self._publish(p, kind, message, status=status, registers=registers)

    def _close_machine(self, p: _Partition) -> None:
        m, p.machine = p.machine, None
        if m is not None:
            m.close()

    def _stop_all(self, why: str, code: int = EXIT_GUEST_FAULT) -> None:
        """Stop every partition that is not stopped (waiting for busy ones)."""
        for p in list(self._parts.values()):
            with p.lock:
                if p.state in (_S.CREATED, _S.RUNNING, _S.PAUSED):
                    self._stop(p, why, code)

    # --- the monitor ----------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask the monitor to stop every partition because of signal signum (status
        128 + signum). Only stores the request: safe in a signal handler."""
        self._stop_request = (exit_status(signum), describe(signum))

    def _tick(self, now: float) -> None:
        """One look at every partition (the monitor's period)."""
        request = self._stop_request  # never cleared: a signal may store one at any bytecode
        if request is not None and request is not self._stop_handled:
            self._stop_handled = request
            self._stop_all(request[1], request[0])
        for p in list(self._parts.values()):
            if not p.lock.acquire(blocking=False):
                continue  # an operation is under way: look again next period
            try:
                self._look(p, now)
            finally:
                p.lock.release()
        self._deliver()

    def _look(self, p: _Partition, now: float) -> None:
        m = p.machine
        if m is None or p.state not in (_S.RUNNING, _S.PAUSED):
            return
        if p.state is _S.RUNNING and m.report is None:
            if p.watchdog.expired(now):
                self._expire(p, m)
            else:
                m.check_halt(now)
        if m.report is not None:
            self._handle(p, m)

    def _expire(self, p: _Partition, m: Machine) -> None:
        """Stop a partition whose watchdog ran out, with every vCPU's registers."""
        with contextlib.suppress(CorevisorError):
            m.pause()
        registers = "\n".join(format_registers(v.fd, m.memory) for v in m.vcpus)
        message = f"watchdog expired (not kicked within {p.watchdog.period_ms} ms)"
        report = StopReport("fault", message, registers=registers)
        m.finish(report)
        p.expired = m.report is report  # not if the guest stopped by itself just before
        p.watchdog.kick(0)

    def _all_stopped(self) -> bool:
        return all(p.state is _S.STOPPED for p in list(self._parts.values()))

    def run(
        self,
        timeout: float | None = None,
        restore: tuple[Path, Overrides] | None = None,
        incoming: tuple[str, Overrides, Callable[[dict[str, object]], None] | None]
        | None = None,
    ) -> int:
        """Build and start every partition, monitor them until all stopped; the status.

        restore: also a partition continuing a snapshot (`run --restore`); incoming: one
        received by a live migration (`run --incoming`), waited for first.
        """
        try:
            self.open()
            if restore is not None:
                from corevisor.snapshot.system import is_system

                if is_system(restore[0]):
                    self.restore_system(restore[0], start=False)
                else:
                    self.restore(restore[0], restore[1], start=False)
            if incoming is not None:
                self.incoming(*incoming)  # started as it arrives
            for name in list(self._parts):
                if self._stop_request is not None:
                    break  # a signal came during the build: the monitor stops the rest
                if self._parts[name].state is _S.CREATED:
                    self.start(name)
            self._monitor_until_stopped(timeout)
        finally:
            self.close()
        return self.exit_status

    def _monitor_until_stopped(self, timeout: float | None) -> None:
        deadline = time.monotonic() + timeout if timeout is not None else None
        while True:
            try:
                while not self._all_stopped():
                    time.sleep(POLL_INTERVAL)
                    now = time.monotonic()
                    self._tick(now)
                    if deadline is not None and now >= deadline:
                        self._stop_all(f"timed out after {timeout} s")
                        deadline = None
                return
            except KeyboardInterrupt:  # no stop_signals handler installed: same effect
                self.request_stop(signal.SIGINT)

    def start_monitor(self) -> None:
        """Monitor from a thread of the system's own until close() (for a daemon)."""
        with self._lock:
            if self._monitor is None and not self._closed:
                self._monitor = start_thread(self._monitor_loop, "monitor")

    def _monitor_loop(self) -> None:
        while not self._monitor_stop.wait(POLL_INTERVAL):
            try:
                self._tick(time.monotonic())
            except Exception:  # noqa: BLE001 - the monitor must outlive a bug in one look
                self.report("system", "monitor error:\n" + traceback.format_exc())

    # --- release --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and release every machine, console and channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            monitor = self._monitor
        self._monitor_stop.set()
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join()
        try:
            for p in list(self._parts.values()):
                with p.lock:
                    self._close_machine(p)
                    if p.state is not _S.STOPPED:
                        self._set_state(p, _S.STOPPED)
                    if p.console is not None:
                        p.console.close()
        finally:
            for ch in self._channels:
                ch.close()
            self._channels = []
            self._deliver()

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
