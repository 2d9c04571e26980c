"""Property tests: random rings thrown at every virtio device never get an exception out.

Each example negotiates random ring features, lays out a queue of random size, fills
the descriptor table, an indirect table, the available ring and the buffers with random
descriptors, flags, addresses (inside, at the edge of and outside RAM, wrapping),
lengths and indices, then kicks every queue. The only acceptable outcomes are "served"
and "device in DEVICE_NEEDS_RESET with a reason"; anything escaping handle_queue or
handle_fd fails the test.

Examples per device: COREVISOR_FUZZ_EXAMPLES, else 10000 when CI is set, else 300 so
a local `pytest` stays quick. Per-example cost is kept small: one 64 KiB RAM reused
across examples, one transport per device reset through its registers.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corevisor.memory import GuestMemory
from corevisor.virtio.blk import Blk
from corevisor.virtio.console import Console
from corevisor.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from corevisor.virtio.mmio import REG, STATUS_DRIVER_OK, STATUS_NEEDS_RESET, VirtioMmio
from corevisor.virtio.net import Net
from corevisor.virtio.rng import Rng

EXAMPLES = int(
    os.environ.get("COREVISOR_FUZZ_EXAMPLES") or (10000 if os.environ.get("CI") else 300)
)
RAM = 0x10000
DESC, AVAIL, USED, INDIRECT, DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x8000

# Values a field picks from, weighted towards chains a device can serve (so the
# success paths get fuzzed too), with the hostile ones mixed in; a selector byte of
# 0xE0 or more reads a raw value instead.
_ADDRS = (
    *(DATA + 0x100 * i for i in range(8)),
    INDIRECT,
    RAM - 1,
    RAM - 16,
    RAM,
    0,
    2**64 - 1,
    2**63,
    2**64 - 8,
)
_LENS = (16, 1, 512, 64, 12, 0, 1024, 17, 32, 2, 24, 513, 0x1000, 2**32 - 1, 2**32 - 16)
_SIZES = (1, 2, 4, 8, 16, 8, 4, 0, 3, 16, 2, 1, 4, 8, 16, 8)
_FEATURES = (
    0,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC,
)


class _Bytes:
    """A cursor over hypothesis' bytes: reads past the end give zeros (shrinks well).

    Zero bytes, which hypothesis draws often, decode to the well-formed choice.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return int.from_bytes(chunk, "little")

    def pick(self, table: tuple[int, ...], raw_bytes: int) -> int:
        sel = self.u(1)
        return table[sel % len(table)] if sel < 0xE0 else self.u(raw_bytes)

    def desc(self, size: int) -> tuple[int, int, int, int]:
        addr, length = self.pick(_ADDRS, 8), self.pick(_LENS, 4)
        f = self.u(1)
        # WRITE in 1 of 2, NEXT in 1 of 4 (chains end), INDIRECT in 1 of 8
        flags = (~f & 1) << 1 | (1 if (f >> 1) & 3 == 3 else 0) | (4 if f >= 0xE0 else 0)
        return addr, length & 0xFFFFFFFF, flags, self.u(1) % (size + 3)


def decode(data: bytes) -> dict[str, object]:
    """Turn one hypothesis byte string into a random ring layout (the example).

    Drawing one binary and decoding it costs a fraction of composite strategies
    (measured: ~0.6 ms against ~6 ms per example), which is what lets CI run 10,000
    examples per device in seconds each.
    """
    b = _Bytes(data)
    mode = b.u(1)
    size = _SIZES[(mode >> 2) & 15]
    sel = b.u(1)
    shaped = b.u(1) & 1
    if shaped:
        # Request-shaped chains (header, data, status: what blk and net expect), then a
        # few random mutations, so deep request parsing is reached, not just the walk.
        triple = ((DATA, 16, 1), (DATA + 0x400, 512, 3), (DATA + 0x800, 1, 2))
        desc = [
            (*triple[i % 3][:2], triple[i % 3][2] if i + 1 < size else 2, (i + 1) % max(size, 1))
            for i in range(min(16, size))
        ]
        for _ in range(b.u(1) % 3):
            if desc:
                desc[b.u(1) % len(desc)] = b.desc(size)
        heads = [(3 * j) % max(size, 1) for j in range(b.u(1) % 17)]
    else:
        desc = [b.desc(size) for _ in range(min(16, size + b.u(1) % 3))]
        heads = [b.u(1) % (size + 1) for _ in range(b.u(1) % 17)]
    return {
        "features": _FEATURES[mode & 3],
        "size": size,
        "rings_at": (RAM - 8, 0x2001, 0x3002) if mode >> 6 == 3 and sel & 1 else None,
        "avail_flags": b.u(1) & 3,
        "avail_idx": b.u(2) if sel >= 0xF0 else size - sel % (size + 1),
        "used_event": b.u(2) if b.u(1) >= 0x80 else b.u(1) % 20,
        "header": (b.pick((0, 1, 4, 8, 0, 1, 99), 4), b.pick((0, 1, 7, 63, 64, 2, 2**61), 8)),
        "desc": desc,
        "indirect": [b.desc(8) for _ in range(b.u(1) % 9)],
        "heads": heads,
        "input": b.data[b.pos : b.pos + 64],
    }


_example = st.binary(max_size=400).map(decode)


class Harness:
    """One transport, reset and re-driven through its registers for every example."""

    def __init__(self, mem: GuestMemory, device: VirtioDevice) -> None:
        self.mem = mem
        self.reports: list[str] = []
        self.dev = VirtioMmio(device, mem, self.reports.append)

    def w32(self, off: int, value: int) -> None:
        self.dev.write(off, struct.pack("<I", value & 0xFFFFFFFF))

    def run(self, ex: dict[str, object]) -> None:
        mem, w = self.mem, self.w32
        mem.fill(0, RAM)
        features = VIRTIO_F_VERSION_1 | int(ex["features"])  # type: ignore[call-overload]
        features |= self.dev.offered & 0xFFFFFFF  # the device-type bits
        w(REG.STATUS, 0)
        w(REG.STATUS, 3)
        for sel in (0, 1):
            w(REG.DRIVER_FEATURES_SEL, sel)
            w(REG.DRIVER_FEATURES, features >> (32 * sel))
        w(REG.STATUS, 0xB)
        size = int(ex["size"])  # type: ignore[call-overload]
        rings = ex["rings_at"] or (DESC, AVAIL, USED)
        assert isinstance(rings, tuple)
        for i in range(len(self.dev.queues)):
            w(REG.QUEUE_SEL, i)
            w(REG.QUEUE_NUM, size)
            off = 0x400 * i  # each queue its own rings
            for reg, addr in zip(
                (REG.QUEUE_DESC_LOW, REG.QUEUE_DRIVER_LOW, REG.QUEUE_DEVICE_LOW), rings, strict=True
            ):
                w(reg, addr + off)
                w(reg + 4, (addr + off) >> 32)
            w(REG.QUEUE_READY, 1)
        for i, d in enumerate(ex["desc"]):  # type: ignore[arg-type]
            for q in range(len(self.dev.queues)):
                mem.write(DESC + 0x400 * q + 16 * i, struct.pack("<QIHH", *d))
        for i, d in enumerate(ex["indirect"]):  # type: ignore[arg-type]
            mem.write(INDIRECT + 16 * i, struct.pack("<QIHH", *d))
        heads = list(ex["heads"])  # type: ignore[call-overload]
        for q in range(len(self.dev.queues)):
            avail = AVAIL + 0x400 * q
            mem.write(avail, struct.pack("<HH", int(ex["avail_flags"]), int(ex["avail_idx"])))  # type: ignore[call-overload]
            for j, h in enumerate(heads):
                mem.write(avail + 4 + 2 * j, struct.pack("<H", h))
            mem.write(avail + 4 + 2 * 16, struct.pack("<H", int(ex["used_event"])))  # type: ignore[call-overload]
        kind, sector = ex["header"]  # type: ignore[misc]
        for a in (DATA, DATA + 0x100):
            mem.write(a, struct.pack("<IIQ", kind, 0, sector))
        w(REG.STATUS, 0xF)
        device = self.dev.device
        if isinstance(device, Console):
            device.enqueue_input(bytes(ex["input"]))  # type: ignore[call-overload]
        for i in range(len(self.dev.queues)):
            self.dev.handle_queue(i)
        for fd in device.fds():
            self.dev.handle_fd(fd)
        status = int.from_bytes(self.dev.read(REG.STATUS, 4), "little")
        if status & STATUS_NEEDS_RESET:
            assert self.dev.failure, "NEEDS_RESET without a reason"
            assert not self.dev.active
        elif status & STATUS_DRIVER_OK:
            assert self.dev.active


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, RAM)])
    yield m
    m.close()


def _fuzz(harness: Harness) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_example)
    def run(ex: dict[str, object]) -> None:
        harness.run(ex)

    run()


def _check(mem: GuestMemory, make: Callable[[], VirtioDevice]) -> None:
    h = Harness(mem, make())
    try:
        _fuzz(h)
    finally:
        h.dev.close()


def test_fuzz_rng(mem: GuestMemory) -> None:
    _check(mem, Rng)


def test_fuzz_blk(mem: GuestMemory, tmp_path: Path) -> None:
    img = tmp_path / "fuzz.img"
    img.write_bytes(bytes(64 * 512))
    _check(mem, lambda: Blk(img))


def test_fuzz_blk_readonly(mem: GuestMemory, tmp_path: Path) -> None:
    img = tmp_path / "fuzz-ro.img"
    img.write_bytes(bytes(8 * 512))
    _check(mem, lambda: Blk(img, readonly=True))


def test_fuzz_console(mem: GuestMemory) -> None:
    _check(mem, lambda: Console(lambda data: None))


def test_fuzz_net(mem: GuestMemory) -> None:
    # A datagram socket pair stands in for the TAP: one frame per read/write, like a TAP.
    ours, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    wire.setblocking(False)
    net = Net(os.dup(ours.fileno()), b"\x52\x54\x00\x00\x00\x01")
    h = Harness(mem, net)

    def refill() -> None:
        try:
            while True:
                wire.recv(70000)
        except BlockingIOError:
            pass
        for n in (14, 60, 1514):
            try:
                wire.send(bytes(12) + b"\xaa" * n)
            except BlockingIOError:
                break

    run = h.run

    def run_with_traffic(ex: dict[str, object]) -> None:
        refill()
        run(ex)

    h.run = run_with_traffic  # type: ignore[method-assign]
    try:
        _fuzz(h)
    finally:
        h.dev.close()
        ours.close()
        wire.close()
