"""`corevisor serve`: a daemon holding a running System and serving its API.

Start-up, in this order so that a user error costs nothing: read the system file (if
any), listen on the socket (a live daemon there is refused, a stale socket replaced),
build every partition of the file, start them, start the health monitor, then accept
connections. Partitions may then be added, driven and removed through the API
(routes.py) while the others run; a partition that ends stays listed (stopped) until it
is removed or restarted.

The System runs with a shared console: a "stdout" partition's serial output goes,
prefixed with its name, to the daemon's stdout and to a log file in the system's
log_dir (a new temporary directory unless the file names one); every partition's goes
through a tap (console.SerialTap) to the API's serial streams as well. Events (state
changes, ends, crashes, restarts, watchdog expiries) go to stderr as with `corevisor
run`, and into an EventLog: the newest EVENT_HISTORY are kept for GET /events and every
later one is handed to its streams.

Stopping: SIGINT, SIGTERM or SIGHUP (waited for with sigwait on the main thread, so no
handler runs anywhere) close the server (streams end, the socket file is removed), then
stop and release every partition. The daemon then exits 0: being told to stop is how a
daemon's life ends. A user error before serving (bad file, socket in use) exits 2 with
one line. Threads: the main thread (waits for signals), "api-accept", one "api-conn-N"
per connection, the System's "monitor", and each partition's own (vCPUs, I/O).

What does not live here: HTTP (server.py), the endpoints (routes.py), metrics
(metrics.py), the controller itself (system.py).
"""

from __future__ import annotations

import collections
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from corevisor.api.metrics import Retired
from corevisor.api.server import ApiServer
from corevisor.errors import CorevisorError
from corevisor.signals import STOP_SIGNALS
from corevisor.spec import SystemSpec
from corevisor.system import Event, System

__all__ = ["Daemon", "EventLog", "EventWatch", "serve", "EVENT_HISTORY"]

EVENT_HISTORY = 1000  # events kept for GET /events
WATCH_QUEUE = 10000  # events a stream may fall behind before it loses the oldest
HEARTBEAT = 1.0  # seconds between a stream's checks that its client is still there




@dataclass(frozen=True)
class LoggedEvent:
    """An Event with its number in the daemon's log (SSE's id)."""

    id: int
    event: Event

    def to_json(self) -> dict[str, Any]:
        e = self.event
        out: dict[str, Any] = {
            "id": self.id,
            "time": e.time,
            "partition": e.partition,
            "kind": e.kind,
            "message": e.message,
            "state": e.state.value if e.state is not None else None,
            "status": e.status,
        }
        if e.registers:
            out["registers"] = e.registers
        return out


class EventWatch:
    """One stream's queue of events; never blocks the System delivering them."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._queue: collections.deque[LoggedEvent] = collections.deque(maxlen=WATCH_QUEUE)
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: LoggedEvent) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify()

    def take(self, timeout: float) -> list[LoggedEvent] | None:
        """Events since the last take ([] after timeout); None once the log closed."""
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout)
            items = list(self._queue)
            self._queue.clear()
            if not items and self._closed:
                return None
            return items

    def end(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        self._log.unwatch(self)
        self.end()


class EventLog:
    """Every event of the System, numbered: the newest kept, each handed to watchers.

    It also counts what metrics report from events alone (crashes, watchdog expiries).
    """

    def __init__(self, keep: int = EVENT_HISTORY) -> None:
        self._lock = threading.Lock()
        self._history: collections.deque[LoggedEvent] = collections.deque(maxlen=keep)
        self._watchers: list[EventWatch] = []
        self._next = 1
        self._closed = False
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, event: Event) -> None:
        """A System subscriber: must not block (it runs on the System's threads)."""
        with self._lock:
            item = LoggedEvent(self._next, event)
            self._next += 1
            self._history.append(item)
            self.counts[(event.partition, event.kind)] += 1
            for w in self._watchers:
                w.put(item)

    def since(self, after: int) -> list[LoggedEvent]:
        with self._lock:
            return [e for e in self._history if e.id > after]

    def watch(self, after: int | None) -> tuple[list[LoggedEvent], EventWatch]:
        """Retained events after id `after` (none if None) and a watch of later ones."""
        w = EventWatch(self)
        with self._lock:
            backlog = [e for e in self._history if e.id > after] if after is not None else []
            if self._closed:
                w.end()
            else:
                self._watchers.append(w)
        return backlog, w

    def unwatch(self, w: EventWatch) -> None:
        with self._lock:
            if w in self._watchers:
                self._watchers.remove(w)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watchers, self._watchers = self._watchers, []
        for w in watchers:
            w.end()


def sse(items: list[LoggedEvent]) -> bytes:
    """Events in the text/event-stream format (one `id`, `event`, `data` block each)."""
    out = []
    for item in items:
        data = json.dumps(item.to_json())
        out.append(f"id: {item.id}\nevent: {item.event.kind}\ndata: {data}\n\n")
    return "".join(out).encode()


def event_stream(log: EventLog, after: int | None) -> Iterator[bytes]:
    """The SSE byte stream of GET /events?follow (b"" every HEARTBEAT when idle)."""
    backlog, watch = log.watch(after)
    try:
        yield b": corevisor events\n\n" + sse(backlog)
        while True:
            items = watch.take(HEARTBEAT)
            if items is None:
                return
            yield sse(items)
    finally:
        watch.close()


class Daemon:
    """A System, its event log and the API server: `corevisor serve`'s whole state."""

    def __init__(
        self,
        socket_path: str,
        config: SystemSpec | None = None,
        *,
        kvm_path: str = "/dev/kvm",
        err: TextIO | None = None,
        base: Path | None = None,
    ) -> None:
        """Listen on socket_path at once (a user error there costs nothing else).
        base: what relative paths in API bodies are relative to (the working directory)."""
        from corevisor.api import routes

        self.config = config if config is not None else SystemSpec(partitions=())
        self.base = (base or Path.cwd()).resolve()
        self.started = time.time()
        self.events = EventLog()
        self.system = System(
            self.config, kvm_path, err=err, shared_console=True, tap_serial=True,
            collect_stats=True,
        )
        self.retired = Retired()
        self.creating = threading.Lock()  # one partition validated and built at a time
        self.system.subscribe(self.events.add)
        self.system.subscribe(self._keep_counters)
        self.server = ApiServer(socket_path, routes.Router(self))
        self._closed = False

    def _keep_counters(self, event: Event) -> None:
        """Have each new machine's counters kept when it closes (metrics.Retired); the
        KVM statistics runstats read from machines as they closed join them."""
        runs = self.system.stats
        while runs:
            self.retired.retire_run(runs.pop(0))
        if event.kind == "removed":
            self.retired.forget(event.partition)
        elif event.kind in ("state", "restart") and event.partition != "system":
            try:
                m = self.system.machine(event.partition)
            except CorevisorError:
                return
            if m is not None:
                self.retired.watch(event.partition, m)

    @property
    def socket_path(self) -> str:
        return self.server.path

    def start(self) -> None:
        """Build and start the file's partitions, start the monitor, accept clients.
        On failure everything opened so far is released."""
        try:
            self.system.open()
            for info in self.system.partitions():
                self.system.start(info.name)
            self.system.start_monitor()
            self.server.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the server (streams end), then every partition. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.close()
        self.events.close()
        self.system.close()


def serve(socket_path: str, config: SystemSpec | None, err: TextIO | None = None) -> int:
    """The daemon's life on the main thread: start, wait for a stop signal, close.

    The stop signals are blocked and waited for with sigwaitinfo, so nothing runs in a
    signal handler and the daemon sleeps without polling while idle.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        daemon = Daemon(socket_path, config, err=err)
        try:
            daemon.start()
            out = err if err is not None else sys.stderr
            out.write(f"corevisor: serving on {daemon.socket_path}\n")
            out.flush()
            info = signal.sigwaitinfo(STOP_SIGNALS)
            out.write(f"corevisor: stopping: received {signal.Signals(info.si_signo).name}\n")
            out.flush()
        finally:
            daemon.close()
    except CorevisorError:
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return 0
