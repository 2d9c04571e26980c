"""Machine: one VM, the owner of everything it holds, and its lifecycle state machine.

**Ownership.** Every fd, mapping, backend and thread of a machine is registered with it
the moment it exists (``own``, ``at_close``; builder.py does this at each step), so
``close`` -- or a build failing half-way -- releases all of it, newest first. Threads
(vCPUs, virtio I/O workers, serial input, the GDB server) are registered during the
build with ``at_start`` and started only by ``start``: a machine that was built and
never started has no thread at all.

**Lifecycle.** The state changes only through the methods below; each is a checked
transition that any thread may call, and a refused one raises StateError
(``cannot pause machine rtos: it is stopped``)::

    start    created -> running          registered threads, then the vCPUs, start
    pause    running -> paused           returns once every vCPU thread has parked
    resume   paused  -> running          returns once every vCPU thread has seen it
    stop     created | running | paused -> stopped   the vCPU threads end; no-op when stopped
    close    any -> stopped, everything released     idempotent

``frozen`` holds the machine still for a snapshot or a migration: under the lifecycle
lock (no start, pause, resume or halt check runs meanwhile) it pauses a running machine,
parks every registered quiescer (the virtio I/O threads with their requests completed,
the channel doorbells' irqfds, serial input: nothing then changes guest RAM, a device
or the interrupt controllers), runs the caller's block, and undoes that in reverse: a
machine that was running runs again, unless the block stopped it (a migration's end).

The guest ends a machine too: the first StopReport of any vCPU (``finish``, called on
that vCPU's thread) becomes the machine's outcome and stops the other vCPUs, so a guest
can never leave a half-stopped machine behind. ``stop`` never waits for another
operation, so a stuck pause cannot keep a machine from stopping. Whoever monitors the
machine (system.py, or ``wait``) also drives ``check_halt``, which stops a guest that
halted with interrupts off (the rule is in halt.py).

What lives elsewhere: how it is assembled (builder.py), what the devices do (devices/),
the vCPU command protocol (vcpu.py), the KVM calls (kvm/).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from corevisor.arch.x86_64.cpu import format_registers
from corevisor.bus import Bus
from corevisor.devices.debug_exit import exit_message, exit_status
from corevisor.errors import CorevisorError, StateError
from corevisor.halt import HaltWatch, ioapic_can_wake, machine_stuck, read_halt_state
from corevisor.kvm.ioctls import Kvm, VcpuFd, VmFd
from corevisor.memory import GuestMemory, MemoryRegion
from corevisor.vcpu import ACK_TIMEOUT, StopReport, Vcpu

if TYPE_CHECKING:
    from corevisor.runstats import StatsCollector

__all__ = ["Machine", "MachineState", "Closeable", "Frozen"]

PAUSE = "pause"  # the vCPU hold reason of Machine.pause
HALT_CHECK = "halt-check"
HALT_CHECK_ACK = 1.0  # seconds; a vCPU slower than that to park is not halted anyway
WAIT_STEP = 0.1  # seconds between checks in wait(): Ctrl-C and halts are seen that often
JOIN_TIMEOUT = 10.0  # seconds stop() waits for each vCPU thread to end


class MachineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Frozen:
    """What Machine.frozen yields: whether the machine was running, and keep()."""

    def __init__(self, was_running: bool) -> None:
        self.was_running = was_running
        self.kept = False

    def keep(self) -> None:
        """Leave the machine frozen when the block ends (it was handed over)."""
        self.kept = True


class Closeable(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=Closeable)


class Machine:
    """One partition's virtual machine."""

    def __init__(
        self, name: str, kvm: Kvm, vm: VmFd, memory: GuestMemory, owned: ExitStack | None = None
    ) -> None:
        """owned: closers already registered for kvm, vm and memory (builder.build)."""
        self.name = name
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.pio = Bus("pio", dense=True)
        self.mmio = Bus("mmio", dense=False)
        self.vcpus: list[Vcpu] = []
        self.devices: dict[str, Any] = {}
        self.report: StopReport | None = None
        self._owned = owned if owned is not None else ExitStack()
        self._starters: list[Callable[[], None]] = []
        self._stalls: list[Callable[[], str | None]] = []
        self._abandoned: list[Vcpu] = []  # vCPU threads that did not end when told to
        self._quiescers: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self.spec: Any = None  # the PartitionSpec it was built from (builder.py sets it)
        self.restore_notes: Any = None  # what a restore did not write (snapshot/state.py)
        self.ram_slots: list[tuple[int, MemoryRegion]] = []  # KVM slot of each RAM region
        self._state = MachineState.CREATED
        self._lock = threading.Lock()  # state, report, closed: held briefly, never waiting
        self._op = threading.RLock()  # one start/pause/resume/halt check at a time
        self._stopped = threading.Event()
        self._closed = False
        self._halt = HaltWatch()
        # KVM's statistics files, when the build opened them (builder.attach_stats); a
        # daemon reads them while the machine runs (api/metrics.py).
        self.stats: StatsCollector | None = None

    @property
    def state(self) -> MachineState:
        return self._state

    # --- ownership, during the build ------------------------------------------------
    def own(self, resource: _C) -> _C:
        """Close resource with the machine (newest first); returns it."""
        self._owned.callback(resource.close)
        return resource

    def at_close(self, release: Callable[[], None]) -> None:
        """Call release when the machine closes (newest first)."""
        self._owned.callback(release)

    def at_start(self, start: Callable[[], None]) -> None:
        """Call start in start(), in registration order, before the vCPUs start."""
        self._starters.append(start)

    def at_stall(self, describe: Callable[[], str | None]) -> None:
        """describe() names what may be keeping a vCPU thread outside KVM_RUN right now (a
        user device's call in progress, userdev/attach.py); a pause that times out says it."""
        self._stalls.append(describe)

    def at_quiesce(self, park: Callable[[], None], unpark: Callable[[], None]) -> None:
        """In frozen(): park() once the vCPUs are paused (it returns when nothing it
        serves runs any more; it may raise CorevisorError), unpark() afterwards."""
        self._quiescers.append((park, unpark))

    def add_vcpu(self, fd: VcpuFd, host_core: int | None = None) -> Vcpu:
        """Own a new vCPU fd at once (before anything else can fail) and wrap it."""
        v = Vcpu(fd, self.pio, self.mmio, self.finish, host_core=host_core, memory=self.memory)
        self.own(v)
        self.vcpus.append(v)
        return v

    # --- outcomes -----------------------------------------------------------------
    def finish(self, report: StopReport) -> None:
        """Record why the machine stops (first report wins) and stop every vCPU.

        Safe on a vCPU thread (it waits for nothing) and from any other thread.
        """
        with self._lock:
            if self.report is None:
                self.report = report
            self._state = MachineState.STOPPED
        for v in self.vcpus:
            v.stop(wait=False)
        self._stopped.set()

    def guest_exit(self, code: int) -> None:
        """The guest wrote its exit status to the debug-exit port (code: the value written;
        the report carries the process status it maps to, devices/debug_exit.py)."""
        self.finish(StopReport("exit", exit_message(code), code=exit_status(code)))

    def guest_reset(self) -> None:
        """The guest pulsed the reset line (i8042 command 0xFE)."""
        self.finish(StopReport("reset", "guest reset the machine (i8042 reset line)"))

    def guest_panic(self) -> None:
        """The guest's kernel reported a panic (pvpanic): a crash, whatever it does next."""
        self.finish(StopReport("fault", "guest kernel panicked (pvpanic)"))

    # --- lifecycle ------------------------------------------------------------------
    def _refuse(self, verb: str) -> StateError:
        return StateError(f"cannot {verb} machine {self.name}: it is {self._state.value}")

    def start(self) -> None:
        """created -> running: start the registered threads, then the vCPUs."""
        with self._op:
            with self._lock:
                if self._state is not MachineState.CREATED or self._closed:
                    raise self._refuse("start")
                self._state = MachineState.RUNNING
            try:
                for start in self._starters:
                    start()
                for v in self.vcpus:
                    v.start()
            except BaseException as e:
                self.stop(f"failed to start: {e}")
                raise

    def pause(self) -> None:
        """running -> paused; returns once every vCPU thread has acknowledged."""
        with self._op:
            if self._state is not MachineState.RUNNING:
                raise self._refuse("pause")
            self._hold_all(PAUSE, ACK_TIMEOUT)
            with self._lock:
                paused = self._state is MachineState.RUNNING
                if paused:
                    self._state = MachineState.PAUSED
            if not paused:  # the guest stopped while we waited
                raise self._refuse("pause")
            self._halt.reset()

    def resume(self) -> None:
        """paused -> running; returns once every vCPU thread has seen it."""
        with self._op:
            with self._lock:
                if self._state is not MachineState.PAUSED:
                    raise self._refuse("resume")
                self._state = MachineState.RUNNING
            self._release_all(PAUSE)

    @contextmanager
    def frozen(self) -> Iterator[Frozen]:
        """Paused and quiesced for the whole block (see the module docstring). A created
        machine (never started) is frozen as it is; a stopped one is refused
        (StateError). The block may keep() it frozen for good: a migration that handed
        the guest (and, locally, its very RAM) over must not let a thread of this
        machine serve it again; the caller then stops it."""
        with self._op:
            handle = Frozen(self._state is MachineState.RUNNING)
            if handle.was_running:
                self.pause()
            elif self._state is not MachineState.PAUSED and self._state is not MachineState.CREATED:
                raise self._refuse("freeze")
            parked: list[Callable[[], None]] = []
            try:
                for park, unpark in self._quiescers:
                    park()
                    parked.append(unpark)
                yield handle
            finally:
                if not handle.kept:
                    for unpark in reversed(parked):
                        unpark()
                    if handle.was_running and self._state is MachineState.PAUSED:
                        self.resume()

    def stop(self, why: str = "stopped by the host", code: int | None = None) -> None:
        """Stop from the host side (the guest did not ask) and wait for the vCPU threads.

        Allowed in every state, and a no-op on a stopped machine (its first outcome
        stays): stop is what every error path, timeout and signal relies on.
        """
        self.finish(StopReport("stopped", why, code=code))
        self._join_vcpus()

    def _hold_all(self, reason: str, timeout: float) -> None:
        """Park every vCPU for reason (acknowledged); on failure nothing stays held."""
        for v in self.vcpus:
            v.hold(reason, wait=False)
        try:
            for v in self.vcpus:
                v.hold(reason, timeout=timeout)
        except CorevisorError as e:
            for v in self.vcpus:
                v.release(reason, wait=False)
            stalls = [s for s in (describe() for describe in self._stalls) if s]
            why = "".join(f"; {s}" for s in stalls)
            raise CorevisorError(f"machine {self.name}: {e}{why}") from None

    def _release_all(self, reason: str) -> None:
        for v in self.vcpus:
            v.release(reason, wait=False)
        for v in self.vcpus:
            v.release(reason)

    def _join_vcpus(self) -> None:
        """Wait for each vCPU thread to end; one that did not within JOIN_TIMEOUT (stuck
        outside KVM_RUN, e.g. in a user device's call) is not waited for again."""
        for v in self.vcpus:
            if v not in self._abandoned:
                v.join(JOIN_TIMEOUT)
                if v.alive:
                    self._abandoned.append(v)

    # --- waiting --------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> StopReport | None:
        """Wait until the machine stops (None on timeout), checking for halts meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopped.wait(WAIT_STEP):
            self.check_halt()
            if deadline is not None and time.monotonic() >= deadline:
                return None
        self._join_vcpus()
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

    # --- halted guests --------------------------------------------------------------
    def check_halt(self, now: float | None = None) -> bool:
        """One look of the halt watch (halt.py); True if it stopped the machine.

        Cheap when not due; never waits for another operation (it skips a look instead).
        """
        if self._state is not MachineState.RUNNING or not self._halt.due(now):
            return False
        if not self._op.acquire(blocking=False):
            return False
        try:
            if self._state is not MachineState.RUNNING:
                return False
            if any(v.held for v in self.vcpus):  # a debugger has it: not the guest's doing
                self._halt.reset()
                return False
            if not self._halt.all_stuck(self.vcpus):
                return False
            return self._confirm_halt()
        finally:
            self._op.release()

    def _confirm_halt(self) -> bool:
        """Park every vCPU and check the whole rule on that one consistent picture."""
        try:
            self._hold_all(HALT_CHECK, HALT_CHECK_ACK)
        except CorevisorError:
            return False
        stuck = False
        try:
            states = [read_halt_state(v.fd) for v in self.vcpus]
            stuck = machine_stuck(states) and not ioapic_can_wake(self.vm)
            if stuck:
                registers = "\n".join(format_registers(v.fd, self.memory) for v in self.vcpus)
                who = "guest" if len(self.vcpus) == 1 else "every vCPU of the guest"
                message = f"{who} halted with interrupts off (no interrupt can wake it)"
                self.finish(StopReport("fault", message, registers=registers))
        except CorevisorError:
            stuck = False
        finally:
            if not stuck:
                self._release_all(HALT_CHECK)
                self._halt.reset()
        return stuck

    # --- release --------------------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPUs and release every fd, mapping, backend and thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.finish(StopReport("stopped", "machine closed"))
        with self._op:  # an operation in progress (a start) completes first
            self._join_vcpus()
            self._owned.close()  # newest first: GDB, virtio, serial, vCPUs, RAM, VM, /dev/kvm

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
