"""The hypercall device, channel ends and the console multiplexer, without KVM."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest

from corevisor.channel import Channel, DoorbellPort, ReadOnlyGuard, ends_for
from corevisor.console import ConsoleMux
from corevisor.hypercall import Generation, GuestClock, HypercallHost, Hypercalls, handler_table
from corevisor.memory import GuestMemory, MemoryRegion
from corevisor.spec import ChannelSpec
from corevisor.system import Watchdog

BLOCK = 0x1000


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.anonymous([(0, 1 << 20)])


def call(
    dev: Hypercalls, mem: GuestMemory, nr: int, *args: int, at: int = BLOCK
) -> tuple[int, int]:
    mem.write(at, struct.pack("<6Q", nr, *args, *([0] * (5 - len(args)))) + bytes(16))
    dev.write(0, at.to_bytes(4, "little"))
    ret, ret2 = struct.unpack("<qQ", mem.read(at + 48, 16))
    return ret, ret2


def device(mem: GuestMemory, **kw: object) -> tuple[Hypercalls, list[bytes]]:
    out: list[bytes] = []
    host = HypercallHost(memory=mem, console=out.append, **kw)  # type: ignore[arg-type]
    return Hypercalls(mem, handler_table(host)), out


def test_version_clock_info_and_unknown(mem: GuestMemory) -> None:
    dev, _ = device(mem, partition_id=3, vcpus=2, clock=GuestClock(lambda: 123))
    assert call(dev, mem, 0) == (0x10001, 0)  # ABI 1.1
    assert call(dev, mem, 3) == (123, 0)
    assert call(dev, mem, 5) == (3, 2)
    assert call(dev, mem, 2) == (0, 0)
    assert call(dev, mem, 1234) == (-38, 0)
    assert dev.calls == 5


def test_generation_counts_restores_with_a_new_id_each(mem: GuestMemory) -> None:
    generation = Generation()
    dev, _ = device(mem, generation=generation)
    assert call(dev, mem, 8) == (0, 0)  # a fresh boot
    generation.advance()
    first = call(dev, mem, 8)
    generation.advance()
    second = call(dev, mem, 8)
    assert (first[0], second[0]) == (1, 2)
    assert first[1] != second[1]


def test_console_write(mem: GuestMemory) -> None:
    dev, out = device(mem)
    mem.write(0x2000, b"hi there")
    assert call(dev, mem, 1, 0x2000, 8) == (8, 0)
    assert out == [b"hi there"]
    assert call(dev, mem, 1, 0x2000, 4097) == (-22, 0)
    assert call(dev, mem, 1, (1 << 20) - 4, 8) == (-14, 0)


def test_bad_blocks_are_ignored_and_counted(mem: GuestMemory) -> None:
    dev, _ = device(mem)
    dev.write(0, (1 << 20).to_bytes(4, "little"))  # outside RAM
    dev.write(0, (BLOCK + 4).to_bytes(4, "little"))  # misaligned
    dev.write(0, ((1 << 20) - 32).to_bytes(4, "little"))  # straddles the end of RAM
    dev.write(0, b"\x00\x10")  # not a 4-byte write
    assert (dev.ignored, dev.calls) == (4, 0)


def test_watchdog_kick(mem: GuestMemory) -> None:
    now = [10.0]
    wd = Watchdog(clock=lambda: now[0])
    dev, _ = device(mem, watchdog=wd.kick)
    assert call(dev, mem, 6, 250) == (0, 0)
    assert not wd.expired(10.2) and wd.expired(10.25)
    call(dev, mem, 6, 0)
    assert not wd.expired(1e9)


def test_channel_ends_info_notify_and_readonly(mem: GuestMemory) -> None:
    one_way = Channel(ChannelSpec("feed", ("a", "b"), 8192, 0xD000_0000, "a", "b"))
    two_way = Channel(ChannelSpec("talk", ("b", "a"), 4096, 0xD000_2000))
    try:
        a = ends_for("a", [one_way, two_way])
        b = ends_for("b", [one_way, two_way])
        assert [(e.name, e.index, e.gsi, e.flags) for e in a] == [
            ("feed", 0, 16, 2),
            ("talk", 1, 17, 2),
        ]
        assert [(e.name, e.readonly, e.flags) for e in b] == [("feed", True, 1), ("talk", False, 2)]
        dev, _ = device(mem, channels=b)
        assert call(dev, mem, 7, 0) == (0xD000_0000, 8192 | 1 << 32 | 16 << 40)
        assert call(dev, mem, 7, 2) == (-2, 0)
        assert call(dev, mem, 4, 0) == (-1, 0)  # the reader may not ring
        assert call(dev, mem, 4, 1) == (0, 0)
        assert os.eventfd_read(two_way.bells["a"]) == 1  # a's doorbell rang
        assert call(dev, mem, 4, 9) == (-2, 0)
        # the reader's GuestMemory refuses VMM-side writes too
        mem.add_region(MemoryRegion(0xD000_0000, 8192, os.dup(one_way.fd), readonly=True))
        assert mem.read(0xD000_0000, 4) == bytes(4)
        assert not mem.writable(0xD000_0000, 4)
        dev.write(0, (0xD000_0000).to_bytes(4, "little"))  # a block in read-only memory
        assert dev.ignored == 1
        assert mem.read(0xD000_0000, 64) == bytes(64)
    finally:
        one_way.close()
        two_way.close()


def test_read_only_guard_reports_once() -> None:
    seen: list[str] = []
    guard = ReadOnlyGuard("feed", seen.append)
    guard.write(8, b"\x01\x02\x03\x04")
    guard.write(0, b"\x05")
    assert guard.refused == 2
    assert seen == [
        "refused a write to read-only channel feed at offset 0x8 (4 bytes); "
        "further refusals are only counted"
    ]
    bell = DoorbellPort()
    bell.write(0, b"\x07\x00\x00\x00")
    assert bell.unmatched == 1


def test_console_mux_prefixes_whole_lines_and_tees(tmp_path: Path) -> None:
    out = io.BytesIO()
    mux = ConsoleMux(out, colour=False)
    a = mux.backend("a", str(tmp_path / "a.log"), width=4)
    b = mux.backend("long", None, width=4)
    for byte in b"hel":
        a.write(bytes([byte]))
    b.write(b"one\r\ntwo\n")
    a.write(b"lo\n")
    a.write(b"tail")
    a.close()
    b.close()
    assert out.getvalue() == b"long | one\nlong | two\na    | hello\na    | tail\n"
    assert (tmp_path / "a.log").read_bytes() == b"hello\ntail"


def test_console_mux_colours_names_on_a_tty() -> None:
    out = io.BytesIO()
    mux = ConsoleMux(out, colour=True)
    a = mux.backend("a", None)
    a.write(b"x\n")
    assert out.getvalue() == b"\x1b[36ma |\x1b[0m x\n"
