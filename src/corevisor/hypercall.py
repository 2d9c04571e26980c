"""The paravirtual hypercall device on port 0x500 (docs/paravirt-abi.md, version 1.0).

A guest writes the guest-physical address of a 64-byte call block to port 0x500; the
Hypercalls device reads the block through GuestMemory (bounds-checked: a block outside
guest RAM, misaligned or in read-only memory is ignored and counted), looks the number
up in a table of handlers, and writes ret/ret2 back before the guest's `out` retires.
Unknown numbers answer -ENOSYS; they never stop the guest.

The device is pure register logic (DESIGN.md convention 4). What a handler needs from
the outside world (the console, the channel ends, the watchdog) comes in as a
HypercallHost of plain callables and values, so this module knows nothing of systems,
threads or KVM. What does not live here: the channels themselves (channel.py) and the
watchdog's timing (system.py).
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
    "HypercallHost",
    "Hypercalls",
    "HypercallsState",
    "handler_table",
]

ABI_VERSION = 0x0001_0000  # major 1, minor 0
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

_BLOCK = struct.Struct("<6Q")  # nr, args[5]
_RESULT = struct.Struct("<qQ")  # ret, ret2 at offset 48
_RESULT_OFFSET = 48

# A handler takes the five arguments and returns (ret, ret2).
Handler = Callable[[tuple[int, ...]], tuple[int, int]]


def _ignore_watchdog(ms: int) -> None:
    """The watchdog of a machine with no system around it: nothing watches."""


@dataclass(frozen=True)
class HypercallHost:
    """Everything the handlers need from outside the device."""

    memory: GuestMemory
    console: Callable[[bytes], None]
    partition_id: int = 0
    vcpus: int = 1
    channels: Sequence[ChannelEnd] = ()
    watchdog: Callable[[int], None] = field(default=_ignore_watchdog)
    clock_ns: Callable[[], int] = field(default=time.monotonic_ns)


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
        return host.clock_ns(), 0

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

    return {
        HC_VERSION: version,
        HC_CONSOLE_WRITE: console_write,
        HC_YIELD: yield_,
        HC_CLOCK: clock,
        HC_CHANNEL_NOTIFY: channel_notify,
        HC_PARTITION_INFO: partition_info,
        HC_WATCHDOG: watchdog,
        HC_CHANNEL_INFO: channel_info,
    }


@dataclass(frozen=True)
class HypercallsState:
    """The port's counters. A call runs whole during the guest's `out`, so none is ever
    in flight in a paused machine; what the handlers serve (console, channels, the
    watchdog) is saved by its owner, and HypercallHost is rebuilt from the config."""

    calls: int
    ignored: int


class Hypercalls:
    """Port 0x500: a 4-byte write of a call block's address runs one hypercall."""

    def __init__(self, memory: GuestMemory, handlers: Mapping[int, Handler]) -> None:
        self._memory = memory
        self._handlers = handlers
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
        return HypercallsState(self.calls, self.ignored)

    def restore(self, state: HypercallsState) -> None:
        st = require_state("hypercall", state, HypercallsState)
        require_uint("hypercall", "calls", st.calls)
        require_uint("hypercall", "ignored", st.ignored)
        self.calls, self.ignored = st.calls, st.ignored
