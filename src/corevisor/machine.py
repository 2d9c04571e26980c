"""Machine: one VM with its fds, memory, vCPUs, buses and devices; start/pause/stop/run.

A Machine is assembled by builder.py and owns everything it holds: closing it releases
the vCPU threads, fds, memory and console. It turns the first StopReport of any vCPU
into the machine's outcome and stops the other vCPUs, so a guest can never leave a
half-stopped machine behind. What lives elsewhere: how it is assembled (builder.py),
what the devices do (devices/), the KVM calls (kvm/).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from corevisor.bus import Bus
from corevisor.devices.debug_exit import exit_message, exit_status
from corevisor.kvm.ioctls import Kvm, VmFd
from corevisor.memory import GuestMemory
from corevisor.vcpu import StopReport, Vcpu


@dataclass
class Machine:
    """One partition's virtual machine."""

    name: str
    kvm: Kvm
    vm: VmFd
    memory: GuestMemory
    pio: Bus
    mmio: Bus
    vcpus: list[Vcpu] = field(default_factory=list)
    devices: dict[str, Any] = field(default_factory=dict)
    closers: list[Any] = field(default_factory=list)
    report: StopReport | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- outcomes -----------------------------------------------------------------
    def finish(self, report: StopReport) -> None:
        """Record why the machine stops (first report wins) and stop every vCPU."""
        with self._lock:
            if self.report is None:
                self.report = report
        for v in self.vcpus:
            v.stop()
        self._stopped.set()

    def stop(self, why: str = "stopped by the host") -> None:
        """Stop the machine from the host side (the guest did not ask)."""
        self.finish(StopReport("stopped", why))

    def guest_exit(self, code: int) -> None:
        """The guest wrote its exit status to the debug-exit port (code: the value written;
        the report carries the process status it maps to, devices/debug_exit.py)."""
        self.finish(StopReport("exit", exit_message(code), code=exit_status(code)))

    def guest_reset(self) -> None:
        """The guest pulsed the reset line (i8042 command 0xFE)."""
        self.finish(StopReport("reset", "guest reset the machine (i8042 reset line)"))

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        for v in self.vcpus:
            v.start()

    def pause(self) -> None:
        for v in self.vcpus:
            v.pause(wait=False)
        for v in self.vcpus:
            v.pause(wait=True)

    def resume(self) -> None:
        for v in self.vcpus:
            v.resume()

    def wait(self, timeout: float | None = None) -> StopReport | None:
        """Wait until the machine stops (or timeout); wakes often so Ctrl-C is seen."""
        remaining = timeout
        while not self._stopped.wait(0.2 if remaining is None else min(0.2, remaining)):
            if remaining is not None:
                remaining -= 0.2
                if remaining <= 0:
                    return None
        for v in self.vcpus:
            v.join(5)
        return self.report

    def outcome(self, timeout: float | None = None) -> StopReport:
        """Wait for the started machine to stop and say why; stop it on timeout or Ctrl-C."""
        try:
            report = self.wait(timeout)
        except KeyboardInterrupt:
            self.finish(StopReport("stopped", "interrupted by the user", code=130))
            report = self.wait()
        if report is None:
            self.stop(f"timed out after {timeout} s")
            report = self.wait()
        assert report is not None
        return report

    def run(self, timeout: float | None = None) -> StopReport:
        """Start, wait for the guest to stop, and return why."""
        self.start()
        return self.outcome(timeout)

    def close(self) -> None:
        """Stop the vCPUs and release every fd, mapping and backend."""
        if not self._stopped.is_set():
            self.stop("machine closed")
        for v in self.vcpus:
            v.join(5)
        for closer in reversed(self.closers):
            closer()
        for v in self.vcpus:
            v.fd.close()
        self.vm.close()
        self.memory.close()
        self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
