"""Every port-I/O device a partition has, on one PIO bus laid out as the builder lays it
(COM1, i8042, RTC, POST code, debug exit, the hypercall port with real channel ends,
the doorbell port, ACPI PM1 and the PM timer; fw_cfg has a target of its own), driven
by guest accesses the way the vCPU loop dispatches them.

The hypercall device reads 64-byte call blocks from guest RAM, whose first 4 KiB at
0x1000 are the fuzzer's bytes, so every call number with every argument is tried,
including blocks at the edge of RAM and misaligned ones. Nothing may raise (the Device
contract), reads return the size asked for, and a call's answer lands only in RAM.
"""

from __future__ import annotations

import functools
from typing import Any

from corevisor.arch.x86_64 import layout
from corevisor.bus import Bus
from corevisor.channel import DOORBELL_PORT, DoorbellPort, ends_for, open_channels
from corevisor.devices.debug_exit import DebugExit
from corevisor.devices.i8042 import I8042
from corevisor.devices.pm1 import PM1_SIZE, Pm1
from corevisor.devices.pm_timer import PmTimer
from corevisor.devices.postcode import PostCode
from corevisor.devices.rtc import Rtc
from corevisor.devices.uart16550 import Uart16550
from corevisor.hypercall import HYPERCALL_PORT, HypercallHost, Hypercalls, handler_table
from corevisor.spec import ChannelSpec
from fuzz.common import Cursor, guest_memory

RAM = 2 << 20
_BLOCKS = 0x1000
_GPAS = (0x1000, 0x1040, 0x1080, 0x10C0, 0x1F00, 0x1FC0, 0x1004, RAM - 64, RAM - 8, RAM,
         0xFFFFFFC0)


@functools.cache
def _bus() -> tuple[Bus, list[int]]:
    mem = guest_memory(RAM)
    channels = open_channels([
        ChannelSpec("two-way", ("a", "b"), 4096, 0xD000_0000),
        ChannelSpec("one-way", ("b", "a"), 4096, 0xD000_1000, writer="b", reader="a"),
    ])
    host = HypercallHost(memory=mem, console=lambda data: None, partition_id=1, vcpus=2,
                         channels=ends_for("a", channels), watchdog=lambda ms: None)
    devices: list[tuple[int, int, Any]] = [
        (0x3F8, 8, Uart16550(lambda data: None, lambda level: None)),
        (0x60, 5, I8042(lambda: None)),
        (0x70, 2, Rtc()),
        (0x80, 1, PostCode()),
        (0xF4, 4, DebugExit(lambda code: None)),
        (HYPERCALL_PORT, 4, Hypercalls(mem, handler_table(host))),
        (DOORBELL_PORT, 4, DoorbellPort()),
        (layout.PM1A_EVT_PORT, PM1_SIZE, Pm1(lambda: None)),
        (layout.PM_TMR_PORT, 4, PmTimer()),
    ]
    bus = Bus("pio", dense=True)
    for base, size, dev in devices:
        bus.attach(base, size, dev, type(dev).__name__)
    ports = [base + off for base, size, _ in devices for off in range(size)]
    return bus, ports


def one_input(data: bytes) -> None:
    bus, ports = _bus()
    mem = guest_memory(RAM)
    c = Cursor(data)
    mem.write(_BLOCKS, c.take(c.u(2) % 0x1001))
    table = bus.port_map()
    while c.left:
        op = c.u(1)
        port = c.pick(ports) if op & 0x40 else c.u(2)
        size = (1, 2, 4, 1)[op & 3]
        hit = table.get(port)
        if hit is None:
            continue  # the vCPU loop answers 0xFF itself
        dev, base = hit
        if op & 0x80:
            if port == HYPERCALL_PORT and op & 0x20:
                payload = c.pick(_GPAS).to_bytes(4, "little")
            else:
                payload = c.take(size).ljust(size, b"\0")
            dev.write(port - base, payload)
        else:
            got = dev.read(port - base, size)
            assert len(got) == size, (port, size, got)
