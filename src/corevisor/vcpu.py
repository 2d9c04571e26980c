"""The vCPU thread: a KVM_RUN loop driven by commands (pause, resume, stop).

One thread per vCPU, optionally pinned to a host core. The loop's hot path is KVM_RUN,
one exit-reason comparison and a bus lookup; no logging, locks or allocation per exit.
Commands from other threads are posted with kvm_run.immediate_exit plus a signal, so a
vCPU inside KVM_RUN returns promptly and one about to enter it never blocks.
Every exit reason ends as "handled" or as a StopReport (never a traceback, never a hang).
"""

from __future__ import annotations

import enum
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.arch.x86_64.cpu import format_registers
from corevisor.bus import Bus
from corevisor.devices import Device
from corevisor.errors import CorevisorError
from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import VcpuFd
from corevisor.memory import GuestMemory

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """Install a no-op handler for the kick signal (must run in the main thread).

    With a handler in place the signal interrupts KVM_RUN with EINTR instead of
    killing the process; the handler itself does nothing.
    """
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Command(enum.Enum):
    RUN = "run"
    PAUSE = "pause"
    STOP = "stop"


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
        self.state = VcpuState.CREATED
        self.exits = 0
        # --stats (runstats.py): I/O exits are exits minus these, so the I/O path adds nothing
        self.mmio_exits = 0
        self.other_exits: dict[int, int] = {}  # exit reason -> count, off the hot path
        # Installed by a debugger (gdb/target.py): called on this thread for KVM_EXIT_DEBUG
        # and KVM_EXIT_INTERNAL_ERROR; True means "mine, handled" (the handler has posted
        # a pause, so the vCPU parks until the debugger resumes it).
        self.debug_handler: Callable[[Vcpu, int], bool] | None = None
        self._command = Command.RUN
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def native_id(self) -> int | None:
        """The host thread id (for affinity checks and host tools), once started."""
        return self._thread.native_id if self._thread is not None else None

    # --- control, from other threads --------------------------------------------------
    def start(self) -> None:
        install_kick_handler()
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    def _post(self, command: Command) -> None:
        with self._cond:
            if self.state is VcpuState.STOPPED:
                return
            self._command = command
            self._cond.notify_all()
        if command is not Command.RUN:
            self.fd.set_immediate_exit(True)
            thread = self._thread
            if thread is not None and thread.ident is not None and thread.is_alive():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def pause(self, wait: bool = True) -> None:
        """Stop running guest code; returns once the vCPU is parked (if wait)."""
        self._post(Command.PAUSE)
        if wait:
            with self._cond:
                self._cond.wait_for(
                    lambda: self.state in (VcpuState.PAUSED, VcpuState.STOPPED), timeout=10
                )

    def resume(self) -> None:
        self._post(Command.RUN)

    def stop(self) -> None:
        self._post(Command.STOP)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the thread -------------------------------------------------------------------
    def _main(self) -> None:
        if self.host_core is not None:
            os.sched_setaffinity(0, {self.host_core})
        self.state = VcpuState.RUNNING
        report: StopReport | None
        try:
            report = self._loop()
        except CorevisorError as e:
            report = StopReport("fault", str(e), registers=self._regs(), vcpu=self.index)
        except Exception as e:  # noqa: BLE001 - a device bug must not leave a hung machine
            report = StopReport(
                "fault", f"internal error in the VMM: {e!r}", registers=self._regs(),
                vcpu=self.index,
            )
        with self._cond:
            self.state = VcpuState.STOPPED
            self._cond.notify_all()
        if report is not None:
            self.on_stop(report)

    def _regs(self) -> str:
        return format_registers(self.fd, self.memory)

    def _park(self) -> bool:
        """Handle a posted command; return False if the loop must end."""
        with self._cond:
            self.fd.set_immediate_exit(False)
            while self._command is Command.PAUSE:
                self.state = VcpuState.PAUSED
                self._cond.notify_all()
                self._cond.wait()
            if self._command is Command.STOP:
                return False
            self.state = VcpuState.RUNNING
            return True

    def _loop(self) -> StopReport | None:
        run = self.fd.run_decoded
        mm = self.fd.run_mm
        ports = self.pio.port_map()  # port -> (device, base): one dict lookup per exit
        io_reason = int(b.ExitReason.IO)
        mmio_reason = int(b.ExitReason.MMIO)
        out = b.KVM_EXIT_IO_OUT
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
