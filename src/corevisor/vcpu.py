"""The vCPU thread: a KVM_RUN loop driven by acknowledged commands (hold, release, stop,
probe).

One thread per vCPU, optionally pinned to a host core, started by start() and by
nothing else. The loop's hot path is KVM_RUN, one exit-reason comparison and a bus
lookup; no logging, locks or allocation per exit.

Commands come from any thread. Each is posted under the vCPU's condition variable and
numbered; the vCPU thread handles commands only between two KVM_RUN calls (``_park``)
and acknowledges by recording the last number it has seen, so ``hold(wait=True)``
returns once the thread is parked and ``release(wait=True)`` once it has seen the
release. A vCPU inside KVM_RUN is made to return by kvm_run.immediate_exit plus the kick
signal (signals.py: blocked outside KVM_RUN, never delivered to a handler, so any thread
may post at any time).

Holds are reasons to stay parked, so independent owners compose: the machine's pause
("pause"), a debugger ("debugger"), the halt check ("halt-check"); the vCPU runs only
when it has none. Every exit reason ends as "handled" or as a StopReport (never a
traceback, never a hang). What lives elsewhere: the machine-wide lifecycle (machine.py),
the halt rule (halt.py), the signal mechanics (signals.py).
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from corevisor import sandbox
from corevisor.arch.x86_64.cpu import format_registers
from corevisor.bus import Bus
from corevisor.devices import Device
from corevisor.errors import CorevisorError, StateError
from corevisor.halt import HaltState, read_halt_state
from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import VcpuFd
from corevisor.memory import GuestMemory
from corevisor.signals import consume_kick, kick, kvm_run_blocked, start_thread

ACK_TIMEOUT = 10.0  # seconds a vCPU thread may take to acknowledge a command


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class StopReport:
    """Why a vCPU (and so its machine) stopped."""

    kind: str  # "exit" (guest asked, with code), "reset", "fault", "stopped" (host asked)
    message: str
    code: int | None = None
    registers: str = ""
    vcpu: int | None = None


class Vcpu:
    """A vCPU thread bound to one VcpuFd and the machine's buses."""

    def __init__(
        self,
        fd: VcpuFd,
        pio: Bus,
        mmio: Bus,
        on_stop: Callable[[StopReport], None],
        host_core: int | None = None,
        memory: GuestMemory | None = None,
    ) -> None:
        self.fd = fd
        self.memory = memory
        self.index = fd.index
        self.pio = pio
        self.mmio = mmio
        self.on_stop = on_stop
        self.host_core = host_core
        self.state = VcpuState.CREATED  # written by the vCPU thread, under _cond
        self.exits = 0
        self.cpu_seconds = 0.0  # CPU time of the thread, written as it ends (api/metrics.py)
        # --stats (runstats.py): I/O exits are exits minus these, so the I/O path adds nothing
        self.mmio_exits = 0
        self.other_exits: dict[int, int] = {}  # exit reason -> count, off the hot path
        # Installed by a debugger (gdb/target.py): called on this thread for KVM_EXIT_DEBUG
        # and KVM_EXIT_INTERNAL_ERROR; True means "mine, handled" (the handler has posted
        # a hold, so the vCPU parks until the debugger releases it).
        self.debug_handler: Callable[[Vcpu, int], bool] | None = None
        self._cond = threading.Condition()
        self._holds: set[str] = set()
        self._stop = False
        self._probe = False
        self._probe_result: HaltState | None = None
        self._posted = 0  # number of the last command posted
        self._seen = 0  # number of the last command the thread has handled
        self._thread: threading.Thread | None = None
        self._setup_error: CorevisorError | None = None
        self._closed = False

    @property
    def native_id(self) -> int | None:
        """The host thread id (for affinity checks and host tools), once started."""
        return self._thread.native_id if self._thread is not None else None

    @property
    def held(self) -> frozenset[str]:
        """The reasons this vCPU must stay parked."""
        with self._cond:
            return frozenset(self._holds)

    # --- control, from any thread -----------------------------------------------------
    def start(self) -> None:
        """Start the thread; a vCPU has one thread in its life (start twice is a bug)."""
        with self._cond:
            if self._thread is not None or self._closed:
                raise StateError(f"cannot start vCPU {self.index}: it was started before")
            self._thread = start_thread(
                self._main, f"vcpu{self.index}", sandbox.VCPU, setup=self._setup
            )

    def _post(self, change: Callable[[], None]) -> int:
        """Apply a command under the lock, number it, and get the thread to look at it."""
        with self._cond:
            change()
            self._posted += 1
            thread = self._thread
            if thread is not None and self.state is VcpuState.RUNNING:
                # RUNNING is left only under this lock, so the thread has not ended.
                self.fd.set_immediate_exit(True)
                kick(thread)
            self._cond.notify_all()
            return self._posted

    def _wait_seen(self, number: int, what: str, timeout: float) -> None:
        """Wait until the thread acknowledged command number (or ended, or never ran)."""
        with self._cond:
            if self._thread is None or threading.current_thread() is self._thread:
                return
            done = self._cond.wait_for(
                lambda: self._seen >= number or self.state is VcpuState.STOPPED, timeout
            )
        if not done:
            raise CorevisorError(
                f"vCPU {self.index} did not acknowledge {what} within {timeout:g} s "
                "(its thread is busy outside KVM_RUN, e.g. blocked writing output)"
            )

    def hold(self, reason: str, wait: bool = True, timeout: float = ACK_TIMEOUT) -> None:
        """Park the vCPU for reason; with wait, return once its thread is parked.

        A vCPU not started yet just records the hold: it parks before its first
        KVM_RUN. On a wait timeout the hold is withdrawn again and CorevisorError says so.
        """
        number = self._post(lambda: self._holds.add(reason))
        if wait:
            try:
                self._wait_seen(number, "a pause", timeout)
            except CorevisorError:
                self.release(reason, wait=False)
                raise

    def release(self, reason: str, wait: bool = True, timeout: float = ACK_TIMEOUT) -> None:
        """Drop a hold; the vCPU runs again once it has none (with wait: once seen)."""
        number = self._post(lambda: self._holds.discard(reason))
        if wait:
            self._wait_seen(number, "a resume", timeout)

    def stop(self, wait: bool = True, timeout: float = ACK_TIMEOUT) -> bool:
        """End the thread; with wait, return whether it ended within timeout."""
        self._post(self._set_stop)
        if wait:
            self.join(timeout)
        return not self.alive

    def _set_stop(self) -> None:
        self._stop = True

    def probe(self) -> None:
        """Ask the thread to read its own HaltState between two KVM_RUNs (no waiting)."""
        self._post(self._set_probe)

    def _set_probe(self) -> None:
        self._probe = True

    def take_probe(self) -> HaltState | None:
        """The HaltState a probe produced since the last call, if any."""
        with self._cond:
            result, self._probe_result = self._probe_result, None
            return result

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close(self) -> None:
        """Release the vCPU fd: now, or when a thread still finishing ends (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            # Until the thread says STOPPED (under this lock) it may still use the fd;
            # it reads _closed right then and closes the fd itself.
            thread_owns = (
                self._thread is not None
                and self.state is not VcpuState.STOPPED
                and threading.current_thread() is not self._thread
            )
        if thread_owns:
            self._post(self._set_stop)
            return
        self.fd.close()

    # --- the thread -------------------------------------------------------------------
    def _setup(self) -> None:
        """On the thread, before its sandbox role confines it: KVM_RUN's signal mask and
        the host core (a confined vCPU cannot move itself). An error waits for _main."""
        try:
            self.fd.set_signal_mask(kvm_run_blocked())
            self._pin()
        except CorevisorError as e:
            self._setup_error = e

    def _main(self) -> None:
        report: StopReport | None
        try:
            if self._setup_error is not None:
                raise self._setup_error
            report = self._loop()
        except CorevisorError as e:
            report = StopReport("fault", str(e), registers=self._regs(), vcpu=self.index)
        except Exception as e:  # noqa: BLE001 - a device bug must not leave a hung machine
            report = StopReport(
                "fault", f"internal error in the VMM: {e!r}", registers=self._regs(),
                vcpu=self.index,
            )
        self.cpu_seconds = time.thread_time()  # kept for metrics once the thread is gone
        with self._cond:
            self.state = VcpuState.STOPPED  # from here on the thread leaves the fd alone
            self._cond.notify_all()
            close = self._closed
        if close:
            self.fd.close()
        if report is not None:
            self.on_stop(report)

    def _pin(self) -> None:
        if self.host_core is None:
            return
        try:
            os.sched_setaffinity(0, {self.host_core})
        except OSError as e:
            raise CorevisorError(
                f"vCPU {self.index}: cannot run on host core {self.host_core}: "
                f"{e.strerror or e}"
            ) from None

    def _read_halt_state(self) -> HaltState:
        try:
            return read_halt_state(self.fd)
        except CorevisorError:  # a probe must never stop a guest: say "can run"
            return HaltState(b.KVM_MP_STATE_RUNNABLE, True, False)

    def _regs(self) -> str:
        return format_registers(self.fd, self.memory)

    def _park(self) -> bool:
        """Handle posted commands; park while held; return False if the loop must end."""
        with self._cond:
            while True:
                self._seen = self._posted
                if self._probe:
                    self._probe = False
                    self._probe_result = self._read_halt_state()
                if self._stop:
                    return False
                if not self._holds:
                    break
                if self.state is not VcpuState.PAUSED:
                    self.state = VcpuState.PAUSED
                self._cond.notify_all()
                self._cond.wait()
            self.state = VcpuState.RUNNING
            self.fd.set_immediate_exit(False)
            self._cond.notify_all()
        consume_kick()
        return True

    def _loop(self) -> StopReport | None:
        run = self.fd.run_decoded
        mm = self.fd.run_mm
        ports = self.pio.port_map()  # port -> (device, base): one dict lookup per exit
        io_reason = int(b.ExitReason.IO)
        mmio_reason = int(b.ExitReason.MMIO)
        out = b.KVM_EXIT_IO_OUT
        if not self._park():  # commands posted before the thread started (a hold, a stop)
            return None
        while True:
            reason, direction, size, port, count, off = run()
            self.exits += 1
            if reason == io_reason:
                hit = ports.get(port)
                if hit is None:
                    self.pio.unhandled += 1
                    if direction != out:
                        mm[off : off + size * count] = b"\xff" * (size * count)
                elif count == 1:
                    if direction == out:
                        hit[0].write(port - hit[1], mm[off : off + size])
                    else:
                        mm[off : off + size] = hit[0].read(port - hit[1], size)
                else:
                    self._string_io(hit[0], port - hit[1], direction, size, count, off)
                continue
            if reason == mmio_reason:
                self._mmio()
                continue
            if reason == -1:
                self.exits -= 1
                if not self._park():
                    return None
                continue
            report = self._other_exit(reason)
            if report is not None:
                return report

    def _string_io(
        self, dev: Device, offset: int, direction: int, size: int, count: int, off: int
    ) -> None:
        """rep ins/outs: count accesses of size bytes at consecutive buffer offsets."""
        mm = self.fd.run_mm
        for i in range(count):
            p = off + i * size
            if direction == b.KVM_EXIT_IO_OUT:
                dev.write(offset, mm[p : p + size])
            else:
                mm[p : p + size] = dev.read(offset, size)

    def _mmio(self) -> None:
        self.mmio_exits += 1
        addr, data, length, is_write = self.fd.mmio_exit()
        if is_write:
            self.mmio.write(addr, data[:length])
        else:
            self.fd.set_mmio_data(self.mmio.read(addr, length))

    def _other_exit(self, reason: int) -> StopReport | None:
        """Exits off the hot path: each is handled or becomes a StopReport."""
        self.other_exits[reason] = self.other_exits.get(reason, 0) + 1
        if reason in (b.ExitReason.IRQ_WINDOW_OPEN, b.ExitReason.INTR):
            return None
        handler = self.debug_handler
        if (
            handler is not None
            and reason in (b.ExitReason.DEBUG, b.ExitReason.INTERNAL_ERROR)
            and handler(self, reason)
        ):
            return None
        if reason == b.ExitReason.SYSTEM_EVENT:
            kind = self.fd.system_event_type()
            if kind == b.KVM_SYSTEM_EVENT_RESET:
                return StopReport("reset", "guest reset the machine", vcpu=self.index)
            if kind == b.KVM_SYSTEM_EVENT_SHUTDOWN:
                return StopReport("exit", "guest powered off", code=0, vcpu=self.index)
        if reason == b.ExitReason.HLT:
            return StopReport(
                "fault", "guest halted with interrupts off", registers=self._regs(),
                vcpu=self.index,
            )
        info = self.fd.exit_info(reason)
        msg = f"{info.name}: {info.detail}" if info.detail else info.name
        if reason == b.ExitReason.SHUTDOWN:
            msg = info.detail
        elif reason == b.ExitReason.INTERNAL_ERROR:
            msg = "KVM internal error: " + info.detail
        return StopReport("fault", msg, registers=self._regs(), vcpu=self.index)
