"""Live migration: pre-copy over a stream socket, and a local mode that passes the RAM's
memfds instead of copying them.

**Pre-copy** (tcp:HOST:PORT, or a unix: socket when RAM cannot be passed): the source
turns on KVM's dirty log for every RAM slot (KVM_MEM_LOG_DIRTY_PAGES, with
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 where the host has it, so a round's pages are write-
protected again just before they are read) and records the pages the VMM's own devices
write (GuestMemory.track_writes). Round 0 sends every page that holds data; each later
round sends what was written meanwhile. After each round the downtime a stop would cost
is estimated (the pages still dirty at the measured link rate, plus the state); once it
is within the limit (default 300 ms) the source freezes the machine (machine.py: paused,
I/O quiesced), sends the last dirty pages and the machine's state, and the target
restores it. A guest that dirties memory faster than the link carries it is throttled
(its vCPUs held for a growing share of each 100 ms, up to 99 %) and, if it still does
not converge by the timeout, the migration stops with a message saying both rates, and
the source runs on as before.

**Local** (unix:PATH, RAM in memfds): no page is copied. The source freezes the machine,
passes the RAM's fds with SCM_RIGHTS and sends the state; the target maps the same
memory. Downtime is the state's transfer and restore.

**The end, and faults.** The target answers READY once its machine is restored (never
started); the source then sends GO and the target starts the guest and answers
STARTED; only then does the source stop its machine (status 0, "migrated to ADDR").
Any failure before that -- the target refusing (another CPU, a spec this host cannot
run), dying, or the connection closing at any point -- aborts: the source's machine runs
on as before (its dirty log off), the target discards what it built. If the link
breaks in the instant between GO and STARTED the source cannot know whether the target
started; it resumes (docs/provisioning.md).

Messages are (u8 kind, u64 length, payload); docs/provisioning.md has the table.
Threads: the migration runs in its caller's thread; a throttled guest has one more,
"migrate-throttle". What does not live here: the state (state.py), freezing a machine
(machine.py), partitions in a system (system.py), the command line (provisioning.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corevisor.errors import CorevisorError, MigrationError
from corevisor.kvm import bindings as b
from corevisor.machine import Machine
from corevisor.memory import PAGE_SIZE, GuestMemory, MemoryRegion, _is_memfd
from corevisor.signals import start_thread
from corevisor.snapshot import codec
from corevisor.snapshot import state as st
from corevisor.snapshot.partition import movable, ram_runs, snapshot_spec

__all__ = [
    "Address",
    "Progress",
    "MigrationResult",
    "send",
    "listen",
    "receive",
    "PROTOCOL",
    "DEFAULT_MAX_DOWNTIME",
    "DEFAULT_TIMEOUT",
]

PROTOCOL = 1
DEFAULT_MAX_DOWNTIME = 0.3  # seconds, as QEMU and Cloud Hypervisor
DEFAULT_TIMEOUT = 300.0  # seconds a migration may take before it gives up
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0  # seconds without a message before either side gives up
MAX_MESSAGE = 1 << 30  # bigger than any PAGES message a source sends
MAX_CONTROL = 16 << 20  # HELLO, STATE, PROGRESS, ERROR: small
PAGES_PER_MESSAGE = 512  # 2 MiB of pages per PAGES message at most
THROTTLE_PERIOD = 0.1  # seconds: a throttled vCPU is held this share of each period
THROTTLE_STEPS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)
STATE_ALLOWANCE = 0.01  # seconds the final state and restore are expected to add

HELLO, ACCEPT, ERROR, PAGES, MEMFDS, PROGRESS, STATE, READY, GO, STARTED, ABORT = range(1, 12)
_NAMES = {HELLO: "HELLO", ACCEPT: "ACCEPT", ERROR: "ERROR", PAGES: "PAGES", MEMFDS: "MEMFDS",
          PROGRESS: "PROGRESS", STATE: "STATE", READY: "READY", GO: "GO", STARTED: "STARTED",
          ABORT: "ABORT"}
_HEADER = struct.Struct("<BQ")
_GPA = struct.Struct("<Q")
_ZERO = bytes(PAGES_PER_MESSAGE * PAGE_SIZE)


# --- addresses ------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where a migration goes: tcp:HOST:PORT or unix:PATH."""

    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        kind, sep, rest = text.partition(":")
        if sep and kind == "unix" and rest and "\0" not in rest:
            if len(os.fsencode(rest)) > 107:
                raise MigrationError(f"{text}: the socket path is longer than 107 bytes")
            return cls("unix", path=rest)
        if sep and kind == "tcp":
            host, sep, port = rest.rpartition(":")
            host = host.strip("[]")
            if sep and host and port.isdigit() and 0 < int(port) < 65536:
                return cls("tcp", host=host, port=int(port))
        raise MigrationError(f"{text!r} is not a migration address (tcp:HOST:PORT or unix:PATH)")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
        try:
            if self.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(self.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((self.host, self.port), timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise MigrationError(f"cannot connect to {self}: {e.strerror or e}") from None
        sock.settimeout(IDLE_TIMEOUT)
        return sock


def listen(address: Address) -> socket.socket:
    """A socket listening on address for one migration (a unix: path must not exist)."""
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address.host, address.port))
            except BaseException:
                sock.close()
                raise
        sock.listen(1)
    except OSError as e:
        raise MigrationError(f"cannot listen on {address}: {e.strerror or e}") from None
    return sock


# --- messages ---------------------------------------------------------------------------


class _Link:
    """One migration's connection: framed messages, fds alongside MEMFDS."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.sent = 0  # bytes of payload sent

    def send(self, kind: int, payload: bytes | memoryview = b"", fds: Sequence[int] = ()) -> None:
        head = _HEADER.pack(kind, len(payload))
        try:
            if fds:
                socket.send_fds(self.sock, [head], list(fds))
            else:
                self.sock.sendall(head)
            if payload:
                self.sock.sendall(payload)
        except OSError as e:
            raise MigrationError(f"the connection to {self.peer} failed: {_why(e)}") from None
        self.sent += len(payload)

    def send_json(self, kind: int, value: object) -> None:
        self.send(kind, json.dumps(value).encode())

    def header(self) -> tuple[int, int, list[int]]:
        """(kind, payload length, fds passed with it)."""
        want = _HEADER.size
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, want, 16)
            while data and len(data) < want:
                more = self.sock.recv(want - len(data))
                if not more:
                    break
                data += more
        except OSError as e:
            raise MigrationError(f"the connection to {self.peer} failed: {_why(e)}") from None
        if len(data) < want:
            for fd in fds:
                os.close(fd)
            raise MigrationError(f"{self.peer} closed the connection")
        kind, length = _HEADER.unpack(data)
        if kind not in _NAMES or length > MAX_MESSAGE:
            for fd in fds:
                os.close(fd)
            raise MigrationError(
                f"{self.peer} sent a corrupt message (kind {kind}, {length} bytes)"
            )
        return kind, length, fds

    def read_into(self, view: memoryview) -> None:
        """Fill view from the stream (the payload of a PAGES message)."""
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if not n:
                    raise MigrationError(f"{self.peer} closed the connection")
                got += n
        except OSError as e:
            raise MigrationError(f"the connection to {self.peer} failed: {_why(e)}") from None

    def read(self, length: int) -> bytes:
        if length > MAX_CONTROL:
            raise MigrationError(f"{self.peer} sent a {length}-byte control message")
        buf = bytearray(length)
        self.read_into(memoryview(buf))
        return bytes(buf)

    def expect(self, *kinds: int) -> tuple[int, bytes]:
        """The next message, which must be one of kinds (an ERROR raises its text)."""
        kind, length, fds = self.header()
        for fd in fds:
            os.close(fd)
        payload = self.read(length)
        if kind == ERROR and ERROR not in kinds:
            raise MigrationError(f"{self.peer}: {payload.decode('utf-8', 'replace')}")
        if kind not in kinds:
            wanted = " or ".join(_NAMES[k] for k in kinds)
            raise MigrationError(f"{self.peer} sent {_NAMES[kind]}, expected {wanted}")
        return kind, payload

    def peer_gone(self) -> bool:
        """Whether the peer closed its end already (checked before GO: a target that died
        after READY must not be taken to have started)."""
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _why(e: OSError) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return f"no answer for {IDLE_TIMEOUT:g} s"
    return e.strerror or str(e)


# --- progress ---------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a migration is (the API's answer, the CLI's bar); updated in place."""

    address: str
    phase: str = "connecting"  # connecting | copying | stopping | done | failed
    local: bool = False
    round: int = 0
    ram_bytes: int = 0
    sent_bytes: int = 0
    remaining_bytes: int = 0  # dirty, still to send
    rate: float = 0.0  # bytes/s the link carried in the last round
    dirty_rate: float = 0.0  # bytes/s the guest dirtied in the last round
    throttle: float = 0.0  # share of vCPU time held
    expected_downtime_ms: float = 0.0
    downtime_ms: float | None = None
    elapsed: float = 0.0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class MigrationResult:
    address: str
    local: bool
    rounds: int
    sent_bytes: int
    downtime_ms: float  # the guest's pause: freeze to the target's STARTED
    total_s: float
    throttle: float


# --- the source ---------------------------------------------------------------------------


def send(
    m: Machine,
    address: Address,
    *,
    max_downtime: float = DEFAULT_MAX_DOWNTIME,
    timeout: float = DEFAULT_TIMEOUT,
    bandwidth: float | None = None,
    throttle: bool = True,
    progress: Progress | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stopping: Callable[[], None] | None = None,
) -> MigrationResult:
    """Move m's guest to the target listening on address. On success m is frozen for
    good and the caller stops it; on failure (MigrationError) m runs on as before.

    bandwidth: bytes/s to send at most (a slower link); stopping: called once the
    target runs the guest, before this returns (the system marks it migrated).
    """
    started = time.monotonic()
    prog = progress if progress is not None else Progress(str(address))
    report = on_progress if on_progress is not None else (lambda p: None)
    try:
        _movable(m)
        link = _Link(address.connect(), str(address))
    except CorevisorError as e:
        prog.phase, prog.error = "failed", str(e)
        raise MigrationError(str(e)) from None
    try:
        local = address.kind == "unix" and all(_is_memfd(r.fd) for _, r in m.ram_slots)
        prog.local = local
        prog.ram_bytes = sum(size for _, size in ram_runs(m))
        link.send_json(HELLO, {
            "protocol": PROTOCOL, "local": local, "spec": snapshot_spec(m),
            "ram": ram_runs(m), "host": codec.encode(st.host_cpu(m.kvm)).hex(),
        })
        link.expect(ACCEPT)
        run = _Run(m, link, prog, report, started, max_downtime, timeout, bandwidth)
        if local:
            result = run.local(stopping)
        else:
            result = run.precopy(throttle, stopping)
        prog.phase = "done"
        prog.downtime_ms = result.downtime_ms
        report(prog)
        return result
    except MigrationError as e:
        prog.phase, prog.error = "failed", str(e)
        with contextlib.suppress(MigrationError):
            link.send(ABORT, str(e).encode())
        report(prog)
        raise
    finally:
        link.close()


def _movable(m: Machine) -> None:
    """What a migration refuses, before anything is paused or sent."""
    movable(m)
    if m.spec is not None and m.spec.bios is not None:
        # Its low RAM is several KVM slots (the shadow RAM under the PAM registers), and
        # dirty logging follows whole RAM regions.
        raise MigrationError(f"{m.name} boots through a BIOS: such a machine cannot be "
                             "migrated yet (snapshot and restore it instead)")
    shared = sorted(name.removeprefix("channel-end-") for name in m.devices
                    if name.startswith("channel-end-"))
    if shared:
        raise MigrationError(
            f"{m.name} has channel {', '.join(shared)}, whose memory it shares with another "
            "partition of this system: it cannot move alone (snapshot the system instead)"
        )


class _Run:
    """One migration's source side, round by round."""

    def __init__(
        self, m: Machine, link: _Link, prog: Progress, report: Callable[[Progress], None],
        started: float, max_downtime: float, timeout: float, bandwidth: float | None,
    ) -> None:
        self.m = m
        self.link = link
        self.prog = prog
        self.report = report
        self.started = started
        self.max_downtime = max_downtime
        self.timeout = timeout
        self.bandwidth = bandwidth

    def _tick(self, phase: str) -> None:
        p = self.prog
        p.phase = phase
        p.sent_bytes = self.link.sent
        p.elapsed = time.monotonic() - self.started
        self.report(p)
        with contextlib.suppress(MigrationError):
            self.link.send_json(PROGRESS, p.as_dict())

    def precopy(self, allow_throttle: bool, stopping: Callable[[], None] | None) -> MigrationResult:
        m = self.m
        with DirtyLog(m) as log, Throttle(m) as throttle:
            learn_msrs(m)
            rate = self._send_all()
            slow_rounds = 0
            while True:
                self.prog.round += 1
                t0 = time.monotonic()
                dirty = log.collect()
                left = len(dirty) * PAGE_SIZE
                self.prog.remaining_bytes = left
                self.prog.expected_downtime_ms = (left / rate + STATE_ALLOWANCE) * 1000
                self.prog.throttle = throttle.share
                self._tick("copying")
                # Round 0's rate alone is not trusted with a large remainder: it sent
                # long runs of pages the guest was not writing.
                trusted = self.prog.round >= 2 or left <= 256 * PAGE_SIZE
                if trusted and left / rate + STATE_ALLOWANCE <= self.max_downtime:
                    log.put_back(dirty)  # the final round sends them, frozen
                    break
                if time.monotonic() - self.started > self.timeout:
                    raise MigrationError(self._not_converging(rate))
                if m.report is not None:
                    raise MigrationError(f"{m.name} stopped during the migration")
                sent_at = time.monotonic()
                self._send_pages(dirty)
                took = max(time.monotonic() - sent_at, 1e-6)
                if left >= 64 * PAGE_SIZE:  # enough to measure: the slower rate wins
                    rate = min(rate, max(left / took, 1.0)) if self.prog.round > 1 else \
                        max(left / took, 1.0)
                self.prog.rate = rate
                self.prog.dirty_rate = left / max(time.monotonic() - t0, 1e-6)
                # Not converging: two rounds in a row whose dirt took longer to send
                # than the limit. Throttle harder, one step per further such round.
                slow_rounds = slow_rounds + 1 if left >= rate * self.max_downtime else 0
                if allow_throttle and slow_rounds >= 2:
                    throttle.harder()
            throttle.stop()
            return self._finish(log, stopping)

    def _not_converging(self, rate: float) -> str:
        mb = 1 << 20
        return (
            f"{self.m.name} did not converge in {self.timeout:g} s: the guest dirties "
            f"{self.prog.dirty_rate / mb:.1f} MiB/s, the link carried {rate / mb:.1f} MiB/s "
            f"(throttled to {100 - self.prog.throttle * 100:.0f} % of its CPU time); the "
            "source keeps running"
        )

    def _send_all(self) -> float:
        """Round 0: every page that may hold data; returns the rate it went at."""
        t0 = time.monotonic()
        total = 0
        for _, region in self.m.ram_slots:
            for gpa, size in self.m.memory.data_extents(region.gpa, region.size):
                for at in range(gpa, gpa + size, PAGES_PER_MESSAGE * PAGE_SIZE):
                    n = min(PAGES_PER_MESSAGE * PAGE_SIZE, gpa + size - at)
                    view = self.m.memory.span(at, n)
                    try:
                        if view != _ZERO[:n]:
                            self._pages(at, view)
                            total += n
                    finally:
                        view.release()
            self._tick("copying")
        took = max(time.monotonic() - t0, 1e-6)
        rate = max(total / took, 1 << 20) if total >= 1 << 20 else 1 << 30
        self.prog.rate = rate
        return rate

    def _pages(self, gpa: int, view: memoryview) -> None:
        """One PAGES message, paced to the bandwidth limit if there is one."""
        t0 = time.monotonic()
        self.link.send(PAGES, _GPA.pack(gpa) + bytes(view))
        if self.bandwidth:
            wait = (len(view) + _GPA.size) / self.bandwidth - (time.monotonic() - t0)
            if wait > 0:
                time.sleep(wait)

    def _send_pages(self, pages: Sequence[int]) -> None:
        for first, count in _runs(pages):
            for at in range(first, first + count, PAGES_PER_MESSAGE):
                n = min(PAGES_PER_MESSAGE, first + count - at)
                view = self.m.memory.span(at * PAGE_SIZE, n * PAGE_SIZE)
                try:
                    self._pages(at * PAGE_SIZE, view)
                finally:
                    view.release()

    def _finish(self, log: DirtyLog, stopping: Callable[[], None] | None) -> MigrationResult:
        """Freeze, the last pages, the state, and the hand-over."""
        with self.m.frozen() as frozen:
            paused = time.monotonic()
            self._tick("stopping")
            self._send_pages(log.collect())
            self._hand_over(frozen, stopping)
        return self._result(paused)

    def local(self, stopping: Callable[[], None] | None) -> MigrationResult:
        """Pass the RAM's memfds (the target maps and builds on them while the guest
        still runs here: it runs nothing until GO), then freeze and hand the state over:
        nothing is copied."""
        regions = [r for _, r in self.m.ram_slots]
        layout = [[r.gpa, r.size, r.offset] for r in regions]
        self.link.send(MEMFDS, json.dumps(layout).encode(), [r.fd for r in regions])
        learn_msrs(self.m)
        self.link.expect(ACCEPT)  # the target's machine is built: only the state is left
        with self.m.frozen() as frozen:
            paused = time.monotonic()
            self._tick("stopping")
            self._hand_over(frozen, stopping)
        return self._result(paused)

    def _hand_over(self, frozen: Any, stopping: Callable[[], None] | None) -> None:
        """State, READY, GO, STARTED; the machine stays frozen once the target runs."""
        state = st.capture_machine(self.m)
        self.link.send(STATE, codec.encode(state))
        self.link.expect(READY)
        if self.link.peer_gone():
            raise MigrationError(f"{self.link.peer} closed the connection after restoring")
        self.link.send(GO)
        self.link.expect(STARTED)
        frozen.keep()  # the guest runs there now: nothing of this machine may touch it
        if stopping is not None:
            stopping()

    def _result(self, paused: float) -> MigrationResult:
        now = time.monotonic()
        return MigrationResult(
            address=self.prog.address, local=self.prog.local, rounds=self.prog.round,
            sent_bytes=self.link.sent, downtime_ms=(now - paused) * 1000,
            total_s=now - self.started, throttle=self.prog.throttle,
        )


def learn_msrs(m: Machine) -> None:
    """Have each vCPU's MSR list learnt before the final pause (state.learn_msrs: a few
    hundred ioctls the first time), holding one vCPU at a time for it."""
    for v in m.vcpus:
        v.hold("migrate-probe")
        try:
            st.learn_msrs(m.kvm, v.fd)
        finally:
            v.release("migrate-probe")


def _runs(pages: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of consecutive page numbers (pages sorted)."""
    first = prev = -2
    for p in pages:
        if p != prev + 1:
            if first >= 0:
                yield first, prev - first + 1
            first = p
        prev = p
    if first >= 0:
        yield first, prev - first + 1


class DirtyLog:
    """The pages written since the last collect(): KVM's dirty log of every RAM slot
    (vCPU writes) together with GuestMemory's record of the VMM's own writes."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.manual = False
        self._bitmaps = [
            (slot, region, (ctypes.c_uint64 * ((region.size // PAGE_SIZE + 63) // 64))())
            for slot, region in m.ram_slots
        ]
        self._extra: set[int] = set()

    def __enter__(self) -> DirtyLog:
        vm = self.m.vm
        want = b.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if vm.check_extension(b.Cap.MANUAL_DIRTY_LOG_PROTECT2) & want:
            vm.enable_cap(b.Cap.MANUAL_DIRTY_LOG_PROTECT2, want)
            self.manual = True
        self.m.memory.track_writes(True)
        self._set_flags(b.KVM_MEM_LOG_DIRTY_PAGES)
        return self

    def __exit__(self, *exc: object) -> None:
        self.m.memory.track_writes(False)
        with contextlib.suppress(CorevisorError):
            self._set_flags(0)

    def _set_flags(self, flags: int) -> None:
        for slot, region, _ in self._bitmaps:
            self.m.vm.set_user_memory_region(
                slot, region.gpa, region.size, region.host_address, flags
            )

    def collect(self) -> list[int]:
        """The sorted page numbers (gpa // PAGE_SIZE) written since the last call."""
        pages = set(self._extra)
        self._extra.clear()
        for slot, region, bitmap in self._bitmaps:
            npages = region.size // PAGE_SIZE
            self.m.vm.get_dirty_log(slot, bitmap)
            if self.manual:
                self.m.vm.clear_dirty_log(slot, 0, npages, bitmap)
            base = region.gpa // PAGE_SIZE
            words = bitmap
            for w, word in enumerate(words):
                if not word:
                    continue
                at = base + w * 64
                if word == 0xFFFF_FFFF_FFFF_FFFF:
                    pages.update(range(at, at + 64))
                    continue
                while word:
                    low = word & -word
                    pages.add(at + low.bit_length() - 1)
                    word ^= low
            ctypes.memset(bitmap, 0, ctypes.sizeof(bitmap))
        ram = [(r.gpa // PAGE_SIZE, r.end // PAGE_SIZE) for _, r, _ in self._bitmaps]
        for page in self.m.memory.take_written():
            if any(lo <= page < hi for lo, hi in ram):
                pages.add(page)
        return sorted(pages)

    def put_back(self, pages: Sequence[int]) -> None:
        """Pages collected but not sent: the next collect() returns them again."""
        self._extra.update(pages)


class Throttle:
    """Holds every vCPU for a share of each THROTTLE_PERIOD (a guest dirtying memory
    faster than the link must slow down for a migration to end)."""

    REASON = "migrate-throttle"

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.share = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Throttle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def harder(self) -> None:
        """The next step of THROTTLE_STEPS (started on the first call)."""
        steps = [s for s in THROTTLE_STEPS if s > self.share]
        if steps:
            self.share = steps[0]
        if self._thread is None:
            self._thread = start_thread(self._run, "migrate-throttle")

    def _run(self) -> None:
        while not self._stop.is_set():
            held = self.share * THROTTLE_PERIOD
            for v in self.m.vcpus:
                v.hold(self.REASON, wait=False)
            self._stop.wait(held)
            for v in self.m.vcpus:
                v.release(self.REASON, wait=False)
            self._stop.wait(THROTTLE_PERIOD - held)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for v in self.m.vcpus:
            v.release(self.REASON, wait=False)


# --- the target ---------------------------------------------------------------------------


@dataclass
class Incoming:
    """What a target learns from the source's HELLO."""

    spec: dict[str, Any]
    ram: list[tuple[int, int]]
    local: bool
    host: st.HostCpu
    progress: dict[str, Any] = field(default_factory=dict)
    state: Any = None  # the MachineSnapshot, once STATE came


def receive(
    listener: socket.socket,
    where: str,
    accept: Callable[[Incoming], Any],
    build: Callable[[Any, GuestMemory], Any],
    restore: Callable[[Any, st.MachineSnapshot], None],
    start: Callable[[Any], None],
    discard: Callable[[Any], None],
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Any:
    """Take one migration from listener. accept(incoming) checks it (raising refuses it
    with its message) and returns the spec; build(spec, memory) makes the machine around
    the RAM (unstarted, owning memory), while the pages still arrive; restore(built,
    state) gives it the state; start(built) runs it; discard(built) undoes build when
    the source gives up or the link fails. Returns what build made, running. cancelled
    is asked while no source has connected yet (a signal ends the wait)."""
    conn = _accept(listener, cancelled)
    conn.settimeout(IDLE_TIMEOUT)
    link = _Link(conn, f"the source ({where})")
    built: Any = None
    try:
        _, payload = link.expect(HELLO)
        incoming = _hello(payload, link.peer)
        try:
            spec = accept(incoming)
            memory = None
            if not incoming.local:
                memory = GuestMemory.anonymous(incoming.ram, name=f"{where}-ram")
                built = build(spec, memory)
        except CorevisorError as e:
            link.send(ERROR, str(e).encode())
            raise
        link.send(ACCEPT)
        while (got := _take(link, memory, incoming, on_progress)) is not None:
            try:
                built = build(spec, got)
            except CorevisorError as e:
                link.send(ERROR, str(e).encode())
                raise
            memory = got
            link.send(ACCEPT)  # built on the passed memory: the source may stop the guest
        try:
            restore(built, incoming.state)
        except CorevisorError as e:
            link.send(ERROR, str(e).encode())
            raise
        link.send(READY)
        link.expect(GO)
        start(built)
        link.send(STARTED)
        return built
    except BaseException:
        if built is not None:
            discard(built)
        raise
    finally:
        link.close()


def _accept(listener: socket.socket, cancelled: Callable[[], bool]) -> socket.socket:
    listener.settimeout(0.2)
    while True:
        if cancelled():
            raise MigrationError("stopped while waiting for a migration")
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.setblocking(True)
        return conn


def _hello(payload: bytes, peer: str) -> Incoming:
    try:
        hello = json.loads(payload)
        if hello.get("protocol") != PROTOCOL:
            raise MigrationError(
                f"{peer} speaks migration protocol {hello.get('protocol')!r}; this corevisor "
                f"speaks {PROTOCOL}"
            )
        ram = [(int(g), int(n)) for g, n in hello["ram"]]
        host = codec.decode(bytes.fromhex(hello["host"]), f"{peer} HELLO")
        if not isinstance(host, st.HostCpu) or not isinstance(hello["spec"], dict):
            raise ValueError("host or spec")
        return Incoming(hello["spec"], ram, bool(hello["local"]), host)
    except (ValueError, KeyError, TypeError) as e:
        raise MigrationError(f"{peer} sent a corrupt HELLO ({e})") from None


def _take(
    link: _Link, memory: GuestMemory | None, incoming: Incoming,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> GuestMemory | None:
    """PAGES into memory and PROGRESS, until STATE (kept in incoming.state: None is
    returned) or MEMFDS (the mapped memory is returned, to build on); ABORT ends it."""
    while True:
        kind, length, fds = link.header()
        if kind == PAGES:
            if memory is None or length < _GPA.size or (length - _GPA.size) % PAGE_SIZE:
                raise MigrationError(f"{link.peer} sent pages out of turn")
            (gpa,) = _GPA.unpack(link.read(_GPA.size))
            try:
                view = memory.span(gpa, length - _GPA.size, writable=True)
            except CorevisorError as e:
                raise MigrationError(f"{link.peer} sent pages outside RAM: {e}") from None
            try:
                link.read_into(view)
            finally:
                view.release()
        elif kind == MEMFDS:
            if memory is not None:
                raise MigrationError(f"{link.peer} passed memory twice")
            return _mapped(link, incoming, link.read(length), fds)
        elif kind == PROGRESS:
            incoming.progress = json.loads(link.read(length))
            if on_progress is not None:
                on_progress(incoming.progress)
        elif kind == STATE:
            if memory is None:
                raise MigrationError(f"{link.peer} sent the state before the memory")
            state = codec.decode(link.read(length), f"{link.peer} STATE")
            if not isinstance(state, st.MachineSnapshot):
                raise MigrationError(f"{link.peer} sent a STATE that is not a machine's")
            incoming.state = state
            return None
        elif kind == ABORT:
            why = link.read(length).decode("utf-8", "replace")
            raise MigrationError(f"the source gave up: {why}")
        else:
            raise MigrationError(f"{link.peer} sent {_NAMES[kind]} during the copy")


def _mapped(link: _Link, incoming: Incoming, payload: bytes, fds: list[int]) -> GuestMemory:
    """The source's RAM, mapped from the memfds it passed (local mode)."""
    try:
        layout = [(int(g), int(n), int(o)) for g, n, o in json.loads(payload)]
        if not incoming.local or len(layout) != len(fds) or \
                [(g, n) for g, n, _ in layout] != incoming.ram:
            raise ValueError("the regions do not match the RAM announced")
    except (ValueError, TypeError) as e:
        for fd in fds:
            os.close(fd)
        raise MigrationError(f"{link.peer} passed unusable memory ({e})") from None
    regions: list[MemoryRegion] = []
    try:
        for (gpa, size, offset), fd in zip(layout, fds, strict=True):
            regions.append(MemoryRegion(gpa, size, fd=fd, offset=offset))
        return GuestMemory(regions)
    except (CorevisorError, OSError) as e:
        for r in regions:
            r.mm.close()
        for fd in fds:
            os.close(fd)
        raise MigrationError(f"{link.peer} passed unusable memory ({e})") from None


def remove_socket(address: Address) -> None:
    """The listening unix socket's file, once done."""
    if address.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            Path(address.path).unlink()


def with_host(incoming: Incoming, kvm_path: str = "/dev/kvm") -> None:
    """Refuse a guest from another kind of CPU before any page is sent."""
    from corevisor.kvm.ioctls import Kvm

    kvm = Kvm(kvm_path)
    try:
        st.check_host_cpu(incoming.host, st.host_cpu(kvm))
    finally:
        kvm.close()

