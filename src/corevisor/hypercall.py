"""The paravirtual hypercall device on port 0x500 (docs/paravirt-abi.md, version 1.1).

A guest writes the guest-physical address of a 64-byte call block to port 0x500; the
Hypercalls device reads the block through GuestMemory (bounds-checked: a block outside
guest RAM, misaligned or in read-only memory is ignored and counted), looks the number
up in a table of handlers, and writes ret/ret2 back before the guest's `out` retires.
Unknown numbers answer -ENOSYS; they never stop the guest.

The device is pure register logic (DESIGN.md convention 4). What a handler needs from
the outside world (the console, the channel ends, the watchdog) comes in as a
HypercallHost of plain callables and values, so this module knows nothing of systems,
threads or KVM. Two host services carry state of their own and are saved with the
device: the guest's clock (GuestClock: HC_CLOCK continues across a snapshot or a
migration, as the TSC and kvmclock do) and its generation (Generation: HC_GENERATION,
which changes whenever the guest is restored from a snapshot, so a clone knows to
reseed its randomness). What does not live here: the channels themselves (channel.py)
and the watchdog's timing (system.py).
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from corevisor.arch.x86_64.layout import HYPERCALL_PORT
from corevisor.channel import ChannelEnd
from corevisor.errors import GuestMemoryError
from corevisor.memory import GuestMemory
from corevisor.snapshot import require_state, require_uint

__all__ = [
    "HYPERCALL_PORT",
    "ABI_VERSION",
    "HC_VERSION",
    "HC_CONSOLE_WRITE",
    "HC_YIELD",
    "HC_CLOCK",
    "HC_CHANNEL_NOTIFY",
    "HC_PARTITION_INFO",
    "HC_WATCHDOG",
    "HC_CHANNEL_INFO",
    "HC_GENERATION",
    "GuestClock",
    "Generation",
    "HypercallHost",
    "Hypercalls",
    "HypercallsState",
    "handler_table",
]

ABI_VERSION = 0x0001_0001  # major 1, minor 1 (1.1 added HC_GENERATION)
BLOCK_SIZE = 64
MAX_CONSOLE_WRITE = 4096

HC_VERSION = 0
HC_CONSOLE_WRITE = 1
HC_YIELD = 2
HC_CLOCK = 3
HC_CHANNEL_NOTIFY = 4
HC_PARTITION_INFO = 5
HC_WATCHDOG = 6
HC_CHANNEL_INFO = 7
HC_GENERATION = 8

_BLOCK = struct.Struct("<6Q")  # nr, args[5]
_RESULT = struct.Struct("<qQ")  # ret, ret2 at offset 48
_RESULT_OFFSET = 48

# A handler takes the five arguments and returns (ret, ret2).
Handler = Callable[[tuple[int, ...]], tuple[int, int]]


def _ignore_watchdog(ms: int) -> None:
    """The watchdog of a machine with no system around it: nothing watches."""


class GuestClock:
    """HC_CLOCK's time: the host's monotonic clock plus an offset.

    A snapshot saves the guest's time (now_ns) and a restore continues from it
    (continue_from), so the guest sees no time pass while it was saved or moved,
    exactly as its TSC and kvmclock do (snapshot/state.py); without the offset the
    clock would jump by whatever the host's monotonic clock did meanwhile (it even
    restarts at boot).
    """

    def __init__(self, source: Callable[[], int] = time.monotonic_ns) -> None:
        self._source = source
        self.offset = 0

    def now_ns(self) -> int:
        return self._source() + self.offset

    def continue_from(self, ns: int) -> None:
        """From now on the clock reads ns, and runs on at the host's rate."""
        self.offset = ns - self._source()


class Generation:
    """HC_GENERATION's answer: how many times this guest was restored from a snapshot,
    and a random 64-bit id chosen at each of those restores (so clones of one snapshot,
    which share the count, still tell each other apart). A fresh boot is 0, 0; a live
    migration moves the same guest and changes neither (docs/provisioning.md)."""

    def __init__(self, count: int = 0, ident: int = 0) -> None:
        self.count = count
        self.ident = ident

    def advance(self) -> None:
        """This guest is a new copy of a saved one: count it and pick a new id."""
        self.count += 1
        self.ident = int.from_bytes(os.urandom(8), "little")


@dataclass(frozen=True)
class HypercallHost:
    """Everything the handlers need from outside the device."""

    memory: GuestMemory
    console: Callable[[bytes], None]
    partition_id: int = 0
    vcpus: int = 1
    channels: Sequence[ChannelEnd] = ()
    watchdog: Callable[[int], None] = field(default=_ignore_watchdog)
    clock: GuestClock = field(default_factory=GuestClock)
    generation: Generation = field(default_factory=Generation)


def handler_table(host: HypercallHost) -> dict[int, Handler]:
    """The ABI's calls, bound to one partition's host services."""
    mem = host.memory

    def version(args: tuple[int, ...]) -> tuple[int, int]:
        return ABI_VERSION, 0

    def console_write(args: tuple[int, ...]) -> tuple[int, int]:
        gpa, length = args[0], args[1]
        if length > MAX_CONSOLE_WRITE:
            return -errno.EINVAL, 0
        try:
            data = mem.read(gpa, length)
        except GuestMemoryError:
            return -errno.EFAULT, 0
        host.console(data)
        return length, 0

    def yield_(args: tuple[int, ...]) -> tuple[int, int]:
        os.sched_yield()
        return 0, 0

    def clock(args: tuple[int, ...]) -> tuple[int, int]:
        return host.clock.now_ns(), 0

    def channel_notify(args: tuple[int, ...]) -> tuple[int, int]:
        if args[0] >= len(host.channels):
            return -errno.ENOENT, 0
        return (0 if host.channels[args[0]].ring() else -errno.EPERM), 0

    def partition_info(args: tuple[int, ...]) -> tuple[int, int]:
        return host.partition_id, host.vcpus

    def watchdog(args: tuple[int, ...]) -> tuple[int, int]:
        host.watchdog(args[0])
        return 0, 0

    def channel_info(args: tuple[int, ...]) -> tuple[int, int]:
        if args[0] >= len(host.channels):
            return -errno.ENOENT, 0
        end = host.channels[args[0]]
        return end.gpa, end.size | end.flags << 32 | end.gsi << 40

    def generation(args: tuple[int, ...]) -> tuple[int, int]:
        return host.generation.count, host.generation.ident

    return {
        HC_VERSION: version,
        HC_CONSOLE_WRITE: console_write,
        HC_YIELD: yield_,
        HC_CLOCK: clock,
        HC_CHANNEL_NOTIFY: channel_notify,
        HC_PARTITION_INFO: partition_info,
        HC_WATCHDOG: watchdog,
        HC_CHANNEL_INFO: channel_info,
        HC_GENERATION: generation,
    }


@dataclass(frozen=True)
class HypercallsState:
    """The port's counters, the guest's clock and its generation. A call runs whole
    during the guest's `out`, so none is ever in flight in a paused machine; what the
    other handlers serve (console, channels, the watchdog) is saved by its owner, and
    HypercallHost is rebuilt from the config. The fields with defaults came with
    snapshot format 1.1."""

    calls: int
    ignored: int
    clock_ns: int = 0  # HC_CLOCK when saved
    generation: int = 0
    generation_id: int = 0


class Hypercalls:
    """Port 0x500: a 4-byte write of a call block's address runs one hypercall."""

    def __init__(
        self,
        memory: GuestMemory,
        handlers: Mapping[int, Handler],
        clock: GuestClock | None = None,
        generation: Generation | None = None,
    ) -> None:
        """clock, generation: the ones the handlers serve (saved with the device)."""
        self._memory = memory
        self._handlers = handlers
        self.clock = clock if clock is not None else GuestClock()
        self.generation = generation if generation is not None else Generation()
        self.calls = 0
        self.ignored = 0  # writes that were not a usable call block

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 4:
            self.ignored += 1
            return
        gpa = int.from_bytes(data, "little")
        # Checked before the call runs: a call with side effects (a doorbell, a watchdog
        # kick) must not happen if its answer cannot be stored.
        if gpa % 8 or not self._memory.writable(gpa, BLOCK_SIZE):
            self.ignored += 1
            return
        nr, *args = _BLOCK.unpack(self._memory.read(gpa, _BLOCK.size))
        handler = self._handlers.get(nr)
        ret, ret2 = handler(tuple(args)) if handler is not None else (-errno.ENOSYS, 0)
        self.calls += 1
        self._memory.write(gpa + _RESULT_OFFSET, _RESULT.pack(ret, ret2 & (1 << 64) - 1))

    def save(self) -> HypercallsState:
        return HypercallsState(
            self.calls, self.ignored, self.clock.now_ns(), self.generation.count,
            self.generation.ident,
        )

    def restore(self, state: HypercallsState) -> None:
        """Counters and generation as saved; the clock continues from its saved time."""
        st = require_state("hypercall", state, HypercallsState)
        for name in ("calls", "ignored", "generation", "generation_id"):
            require_uint("hypercall", name, getattr(st, name))
        require_uint("hypercall", "clock_ns", st.clock_ns, 63)
        self.calls, self.ignored = st.calls, st.ignored
        self.clock.continue_from(st.clock_ns)
        self.generation.count, self.generation.ident = st.generation, st.generation_id
