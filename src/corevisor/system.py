"""System: several partitions (one Machine each) run side by side, and their health monitor.

System.run builds every partition with builder.build (channels opened first, so both
ends map the same memfd), starts them all, and then watches them from the calling
thread. When a partition stops it applies the partition's policy:

- the guest exited (port 0xF4), powered off or reset: that partition has ended, with
  the guest's status (0 for a reset or power-off);
- the guest stopped abnormally (triple fault, emulation failure, a VMM fault) or its
  watchdog expired: ``restart = "stop"`` leaves it down, ``"restart"`` rebuilds it
  (fresh memory and devices, same cores, same channels: channel memory persists), at
  most MAX_RESTARTS times in RESTART_WINDOW seconds, then treats it as "stop";
  ``"halt-system"`` stops every partition.

Other partitions are never touched (except by halt-system): each has its own VM,
threads and cores. Every event is one ``corevisor: NAME: ...`` line on stderr, followed
by the register dump of abnormal stops. The system ends when every partition has ended;
its exit status is 0 if every partition ended with 0, else the status of the first
partition (in time) that did not. A partition stopped by the host (timeout, halt-system)
counts as 1, Ctrl-C as 130.

What does not live here: building one machine (builder.py), channel resources
(channel.py), hypercalls (hypercall.py), validating the file (config.py).
"""

from __future__ import annotations

import collections
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from corevisor.arch.x86_64.cpu import format_registers
from corevisor.builder import PartitionLinks, build
from corevisor.channel import Channel, ends_for, open_channels
from corevisor.config import PartitionConfig, SystemConfig
from corevisor.console import ConsoleMux, PrefixedSerial
from corevisor.errors import CorevisorError
from corevisor.machine import Machine
from corevisor.outputs import notice
from corevisor.vcpu import StopReport

__all__ = ["System", "Watchdog", "MAX_RESTARTS", "RESTART_WINDOW", "EXIT_GUEST_FAULT"]

EXIT_GUEST_FAULT = 1
EXIT_INTERRUPTED = 130
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0  # seconds
POLL_INTERVAL = 0.02  # the monitor's period: watchdog resolution and reaction time


class Watchdog:
    """A partition's watchdog: a deadline the guest pushes forward (HC_WATCHDOG).

    kick runs on a vCPU thread and only stores a float (atomic under the GIL); the
    monitor thread compares it with the clock every POLL_INTERVAL.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.period_ms = 0
        self.deadline: float | None = None

    def kick(self, ms: int) -> None:
        """Re-arm for ms milliseconds from now; 0 disarms."""
        self.period_ms = ms
        self.deadline = self._clock() + ms / 1000 if ms else None

    def expired(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline


@dataclass
class _Partition:
    """One partition's config, its current machine, and what happened to it."""

    index: int
    config: PartitionConfig
    links: PartitionLinks
    watchdog: Watchdog
    machine: Machine | None = None
    status: int | None = None  # set when the partition has ended
    restarts: collections.deque[float] = field(default_factory=collections.deque)

    @property
    def name(self) -> str:
        return self.config.name


class System:
    """Partitions from one SystemConfig, run together under a health monitor."""

    def __init__(
        self, config: SystemConfig, kvm_path: str = "/dev/kvm", err: TextIO | None = None
    ) -> None:
        self.config = config
        self.kvm_path = kvm_path
        self._err = err if err is not None else sys.stderr
        self._err_lock = threading.Lock()
        self._channels: list[Channel] = []
        self._consoles: list[PrefixedSerial] = []
        self._parts: list[_Partition] = []
        self._first_failure: int | None = None
        self.log_dir: Path | None = None

    # --- events -----------------------------------------------------------------------
    def event(self, name: str, message: str, registers: str = "") -> None:
        """One line on stderr, plus a register dump when there is one."""
        with self._err_lock:
            notice(f"corevisor: {name}: {message}", self._err)
            if registers:
                notice(registers, self._err)

    # --- the run ----------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> int:
        """Build and start every partition, monitor them until all ended; return the status."""
        try:
            self._open()
            for p in self._parts:
                assert p.machine is not None
                p.machine.start()
            self._monitor(timeout)
        finally:
            self.close()
        return self._first_failure or 0

    def _open(self) -> None:
        self._channels = open_channels(self.config.channels)
        serials = self._open_consoles()
        for i, part in enumerate(self.config.partitions):
            watchdog = Watchdog()
            links = PartitionLinks(
                index=i,
                channels=ends_for(part.name, self._channels),
                serial=serials.get(part.name),
                watchdog=watchdog.kick,
                report=self.event,
            )
            p = _Partition(i, part, links, watchdog)
            self._parts.append(p)
            p.machine = self._build(p)

    def _open_consoles(self) -> dict[str, PrefixedSerial]:
        """Shared-terminal consoles for "stdout" partitions of a multi-partition system.

        A lone partition without a log_dir keeps the plain stdout backend (with input),
        exactly as `corevisor run IMAGE`.
        """
        parts = self.config.partitions
        if len(parts) == 1 and self.config.log_dir is None:
            return {}
        log_dir = self.config.log_dir
        if log_dir is None:
            log_dir = Path(tempfile.mkdtemp(prefix="corevisor-logs-"))
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CorevisorError(f"log_dir {log_dir}: {e.strerror or e}") from None
        self.log_dir = log_dir
        mux = ConsoleMux(report=self.event)
        width = max(len(p.name) for p in parts)
        serials = {}
        for part in parts:
            if part.serial == "stdout":
                serial = mux.backend(part.name, str(log_dir / f"{part.name}.log"), width)
                self._consoles.append(serial)
                serials[part.name] = serial
        self.event("system", f"{len(parts)} partitions; serial logs in {log_dir}")
        return serials

    def _build(self, p: _Partition) -> Machine:
        m = build(p.config, self.kvm_path, p.links)
        if p.config.watchdog_ms:
            p.watchdog.kick(p.config.watchdog_ms)
        else:
            p.watchdog.kick(0)
        return m

    def _monitor(self, timeout: float | None) -> None:
        deadline = time.monotonic() + timeout if timeout is not None else None
        try:
            while any(p.status is None for p in self._parts):
                time.sleep(POLL_INTERVAL)
                now = time.monotonic()
                for p in self._parts:
                    m = p.machine
                    if p.status is not None or m is None:
                        continue
                    if m.report is None and p.watchdog.expired(now):
                        self._expire(p, m)
                    if m.report is not None:
                        self._handle(p, m)
                if deadline is not None and now >= deadline:
                    self._stop_all(f"timed out after {timeout} s")
                    deadline = None
        except KeyboardInterrupt:
            for p in self._parts:
                if p.status is None and p.machine is not None:
                    p.machine.finish(
                        StopReport("stopped", "interrupted by the user", code=EXIT_INTERRUPTED)
                    )
            for p in self._parts:
                if p.status is None and p.machine is not None:
                    self._handle(p, p.machine)

    def _expire(self, p: _Partition, m: Machine) -> None:
        """Stop a partition whose watchdog ran out, with every vCPU's registers."""
        m.pause()
        registers = "\n".join(format_registers(v.fd, m.memory) for v in m.vcpus)
        message = f"watchdog expired (not kicked within {p.watchdog.period_ms} ms)"
        m.finish(StopReport("fault", message, registers=registers))
        p.watchdog.kick(0)

    def _handle(self, p: _Partition, m: Machine) -> None:
        """A partition's machine has stopped: log why and apply its policy."""
        report = m.wait()
        assert report is not None
        if report.kind == "exit":
            self.event(p.name, report.message)
            self._end(p, report.code or 0)
        elif report.kind == "reset":
            self.event(p.name, report.message)
            self._end(p, 0)
        elif report.kind == "stopped":
            self.event(p.name, f"stopped: {report.message}")
            self._end(p, report.code if report.code is not None else EXIT_GUEST_FAULT)
        else:
            self._crashed(p, report)

    def _crashed(self, p: _Partition, report: StopReport) -> None:
        policy = p.config.restart
        now = time.monotonic()
        while p.restarts and now - p.restarts[0] > RESTART_WINDOW:
            p.restarts.popleft()
        restart = policy == "restart" and len(p.restarts) < MAX_RESTARTS
        if restart:
            p.restarts.append(now)
            action = f"restarting ({len(p.restarts)}/{MAX_RESTARTS} in {RESTART_WINDOW:g} s)"
        elif policy == "restart":
            action = f"crash loop ({MAX_RESTARTS} restarts in {RESTART_WINDOW:g} s): stays down"
        elif policy == "halt-system":
            action = "halting the system"
        else:
            action = "stays down; the other partitions continue"
        message = f"guest stopped: {report.message} [restart = {policy}: {action}]"
        self.event(p.name, message, report.registers)
        if restart:
            self._restart(p)
            return
        self._end(p, EXIT_GUEST_FAULT)
        if policy == "halt-system":
            self._stop_all(f"system halted: partition {p.name} stopped abnormally")

    def _restart(self, p: _Partition) -> None:
        """A fresh machine for the partition: same config, cores and channel ends."""
        assert p.machine is not None
        p.machine.close()
        p.machine = None
        if isinstance(p.links.serial, PrefixedSerial):
            p.links.serial.break_line()
        try:
            p.machine = self._build(p)
        except CorevisorError as e:
            self.event(p.name, f"restart failed: {e}")
            self._end(p, EXIT_GUEST_FAULT)
            return
        p.machine.start()

    def _end(self, p: _Partition, status: int) -> None:
        p.status = status
        if status and self._first_failure is None:
            self._first_failure = status
        if p.machine is not None:
            p.machine.close()
            p.machine = None

    def _stop_all(self, why: str) -> None:
        for p in self._parts:
            if p.status is None and p.machine is not None:
                p.machine.stop(why)

    def close(self) -> None:
        """Stop and release every machine, console and channel. Idempotent."""
        for p in self._parts:
            if p.machine is not None:
                p.machine.close()
                p.machine = None
        for serial in self._consoles:
            serial.close()
        self._consoles = []
        for ch in self._channels:
            ch.close()
        self._channels = []
