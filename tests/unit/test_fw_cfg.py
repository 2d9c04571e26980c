"""fw_cfg's register interface (devices/fw_cfg.py) and the items a machine offers
(firmware/fw_cfg.py), checked against QEMU's docs/specs/fw_cfg.rst: selector, data,
file directory, DMA, and a hostile guest's DMA requests."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corevisor.devices import fw_cfg as k
from corevisor.devices.fw_cfg import FwCfg, FwCfgState
from corevisor.errors import DeviceError
from corevisor.firmware.fw_cfg import FileSlice, boot_items, machine_files, machine_items
from corevisor.loader import Initrd, LoadedImage
from corevisor.memory import GuestMemory

MiB = 1 << 20
DESC = 0x1000  # a FWCfgDmaAccess in guest RAM
BUF = 0x2000


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 16 * MiB)])
    yield m
    m.close()


@pytest.fixture
def dev(mem: GuestMemory) -> FwCfg:
    return FwCfg(mem, machine_items(2, mem), machine_files(mem))


def select(dev: FwCfg, key: int) -> None:
    dev.write(0, key.to_bytes(2, "little"))  # outw(0x510, key)


def read_io(dev: FwCfg, key: int, n: int) -> bytes:
    select(dev, key)
    return b"".join(dev.read(1, 1) for _ in range(n))  # inb(0x511) n times


def dma(dev: FwCfg, mem: GuestMemory, control: int, length: int, address: int) -> int:
    """Write a descriptor at DESC, start it the two-write way, return its control word."""
    mem.write(DESC, struct.pack(">IIQ", control, length, address))
    dev.write(4, (0).to_bytes(4, "big"))  # high half (big-endian register)
    dev.write(8, DESC.to_bytes(4, "big"))  # low half: runs it
    return struct.unpack(">I", mem.read(DESC, 4))[0]


def test_signature_id_and_dma_signature(dev: FwCfg) -> None:
    assert read_io(dev, k.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", read_io(dev, k.FW_CFG_ID, 4))[0] == 3  # traditional + DMA
    assert dev.read(4, 4) + dev.read(8, 4) == b"QEMU CFG"
    assert dev.read(4, 1) == b"Q" and dev.read(11, 1) == b"G"


def test_machine_items(dev: FwCfg, mem: GuestMemory) -> None:
    assert struct.unpack("<H", read_io(dev, k.FW_CFG_NB_CPUS, 2))[0] == 2
    assert struct.unpack("<H", read_io(dev, k.FW_CFG_MAX_CPUS, 2))[0] == 2
    assert struct.unpack("<Q", read_io(dev, k.FW_CFG_RAM_SIZE, 8))[0] == 16 * MiB
    assert read_io(dev, k.FW_CFG_UUID, 16) == bytes(16)
    assert read_io(dev, k.FW_CFG_BOOT_DEVICE, 2) == b"c\0"
    assert struct.unpack("<I", read_io(dev, k.FW_CFG_IRQ0_OVERRIDE, 4))[0] == 0
    table = read_io(dev, k.FW_CFG_E820_TABLE, 4 + 3 * 20)
    assert struct.unpack_from("<I", table)[0] == 3
    assert struct.unpack_from("<QQI", table, 4) == (0, 0x9FC00, 1)


def test_file_directory_is_big_endian_and_sorted(dev: FwCfg) -> None:
    count = struct.unpack(">I", read_io(dev, k.FW_CFG_FILE_DIR, 4))[0]
    assert count == 2
    raw = read_io(dev, k.FW_CFG_FILE_DIR, 4 + 64 * count)[4:]
    entries = [struct.unpack_from(">IHH56s", raw, 64 * i) for i in range(count)]
    names = [e[3].rstrip(b"\0").decode() for e in entries]
    assert names == ["bootorder", "etc/e820"]
    assert [(e[0], e[1]) for e in entries] == [(0, 0x20), (60, 0x21)]
    e820 = read_io(dev, 0x21, 60)
    assert [struct.unpack_from("<QQI", e820, 20 * i) for i in range(3)] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 15 * MiB, 1)
    ]


def test_data_past_the_end_and_unknown_keys_read_zero(dev: FwCfg) -> None:
    assert read_io(dev, k.FW_CFG_NB_CPUS, 4) == b"\x02\0\0\0"
    assert read_io(dev, 0x1234, 3) == b"\0\0\0"
    select(dev, k.FW_CFG_SIGNATURE)
    assert dev.read(0, 1) == b"Q"  # a byte read at 0x510 is the data register too
    assert dev.read(0, 2) == b"\xff\xff" and dev.read(2, 1) == b"\xff"
    dev.write(1, b"\x55")  # data writes are ignored
    assert dev.read(1, 1) == b"E"


def test_add_file_keeps_names_sorted_and_refuses_bad_names(mem: GuestMemory) -> None:
    dev = FwCfg(mem)
    assert dev.add_file("etc/zz", b"z") == 0x20
    assert dev.add_file("etc/aa", b"aa") == 0x20  # sorts first; etc/zz moves to 0x21
    assert read_io(dev, 0x21, 1) == b"z"
    for bad in ("", "x" * 56, "a\0b"):
        with pytest.raises(ValueError):
            dev.add_file(bad, b"")
    with pytest.raises(ValueError):
        dev.add_file("etc/aa", b"")


def test_dma_read_select_skip_and_past_the_end(dev: FwCfg, mem: GuestMemory) -> None:
    ctl = k.FW_CFG_SIGNATURE << 16 | k.DMA_CTL_SELECT | k.DMA_CTL_READ
    assert dma(dev, mem, ctl, 4, BUF) == 0
    assert mem.read(BUF, 4) == b"QEMU"
    # skip within the selected item, then read on from there
    select(dev, k.FW_CFG_SIGNATURE)
    assert dma(dev, mem, k.DMA_CTL_SKIP, 2, 0) == 0
    assert dma(dev, mem, k.DMA_CTL_READ, 6, BUF) == 0
    assert mem.read(BUF, 6) == b"MU\0\0\0\0"  # past the end: zeros
    assert dev.read(4, 4) == b"QEMU"  # the address register reads the signature again


def test_one_8_byte_write_also_runs_the_dma(dev: FwCfg, mem: GuestMemory) -> None:
    mem.write(DESC, struct.pack(">IIQ", 5 << 16 | k.DMA_CTL_SELECT | k.DMA_CTL_READ, 2, BUF))
    dev.write(4, DESC.to_bytes(8, "big"))
    assert mem.read(BUF, 2) == b"\x02\0"
    assert struct.unpack(">I", mem.read(DESC, 4))[0] == 0


def test_dma_outside_ram_sets_the_error_bit_and_writes_nothing(
    dev: FwCfg, mem: GuestMemory
) -> None:
    ctl = k.FW_CFG_SIGNATURE << 16 | k.DMA_CTL_SELECT | k.DMA_CTL_READ
    assert dma(dev, mem, ctl, 4, 16 * MiB - 2) == k.DMA_CTL_ERROR  # straddles the end
    assert mem.read(16 * MiB - 2, 2) == b"\0\0"
    assert dma(dev, mem, ctl, 4, 1 << 63) == k.DMA_CTL_ERROR
    assert dma(dev, mem, k.DMA_CTL_WRITE, 4, BUF) == k.DMA_CTL_ERROR  # items are read-only
    # a descriptor outside RAM: nothing to report to, nothing raised
    dev.write(4, (0xFF).to_bytes(4, "big"))
    dev.write(8, (0).to_bytes(4, "big"))


def test_dma_of_a_huge_length_is_bounded_by_ram(dev: FwCfg, mem: GuestMemory) -> None:
    ctl = k.FW_CFG_SIGNATURE << 16 | k.DMA_CTL_SELECT | k.DMA_CTL_READ
    mem.write(8 * MiB, b"\x77" * 16)
    assert dma(dev, mem, ctl, 0xFFFF_FFFF, 8 * MiB) == k.DMA_CTL_ERROR
    assert mem.read(8 * MiB, 8) == b"QEMU\0\0\0\0"  # what fitted was written, in 1 MiB steps


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["r", "w", "dma"]),
            st.integers(0, 13),
            st.binary(min_size=0, max_size=9),
            st.tuples(st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF),
                      st.integers(0, (1 << 64) - 1)),
        ),
        max_size=30,
    )
)
def test_hostile_guest_never_crashes_the_device(
    ops: list[tuple[str, int, bytes, tuple[int, int, int]]],
) -> None:
    mem = GuestMemory.anonymous([(0, 2 * MiB)])
    try:
        dev = FwCfg(mem, machine_items(1, mem), machine_files(mem))
        for op, offset, data, (control, length, address) in ops:
            if op == "r":
                assert len(dev.read(offset, len(data))) == len(data)
            elif op == "w":
                dev.write(offset, data)
            else:
                mem.write(DESC, struct.pack(">IIQ", control, length % (64 << 10), address))
                dev.write(4, bytes(4))  # a high half left by an earlier write would aim
                dev.write(8, DESC.to_bytes(4, "big"))  # the descriptor outside RAM
                assert struct.unpack(">I", mem.read(DESC, 4))[0] in (0, k.DMA_CTL_ERROR)
        state = dev.save()
        again = FwCfg(mem, machine_items(1, mem), machine_files(mem))
        again.restore(state)
        assert again.save() == state
    finally:
        mem.close()


def test_save_restore_keeps_position_and_refuses_bad_state(dev: FwCfg, mem: GuestMemory) -> None:
    select(dev, k.FW_CFG_SIGNATURE)
    dev.read(1, 1)
    dev.write(4, (1).to_bytes(4, "big"))
    state = dev.save()
    assert state == FwCfgState(selector=0, offset=1, dma_address=1 << 32)
    other = FwCfg(mem)
    other.restore(state)
    assert other.read(1, 1) == b"E"
    for bad in (FwCfgState(selector=1 << 16), FwCfgState(offset=-1), FwCfgState(dma_address=1.5)):  # type: ignore[arg-type]
        with pytest.raises(DeviceError):
            other.restore(bad)
    with pytest.raises(DeviceError):
        other.restore(object())  # type: ignore[arg-type]


def test_boot_items_for_a_pvh_image_and_its_initrd(tmp_path: Path, mem: GuestMemory) -> None:
    image = tmp_path / "k.elf"
    image.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    rd = tmp_path / "rd"
    rd.write_bytes(b"initrd-bytes")
    loaded = LoadedImage(image, "pvh", 0x100040, 0x100000, 0x180000)
    items, opened = boot_items(loaded, b"console=ttyS0", (Initrd(0xF00000, 12), rd))
    try:
        dev = FwCfg(mem, items)
        assert struct.unpack("<I", read_io(dev, k.FW_CFG_KERNEL_ENTRY, 4))[0] == 0x100040
        assert struct.unpack("<I", read_io(dev, k.FW_CFG_KERNEL_SIZE, 4))[0] == 0x80000
        assert read_io(dev, k.FW_CFG_CMDLINE_DATA, 14) == b"console=ttyS0\0"
        assert struct.unpack("<I", read_io(dev, k.FW_CFG_SETUP_SIZE, 4))[0] == 8192
        assert read_io(dev, k.FW_CFG_SETUP_DATA, 6) == b"\x7fELF\0\1"
        assert struct.unpack("<I", read_io(dev, k.FW_CFG_INITRD_ADDR, 4))[0] == 0xF00000
        ctl = k.FW_CFG_INITRD_DATA << 16 | k.DMA_CTL_SELECT | k.DMA_CTL_READ
        assert dma(dev, mem, ctl, 12, BUF) == 0 and mem.read(BUF, 12) == b"initrd-bytes"
    finally:
        for f in opened:
            f.close()


def test_file_slice_reads_on_demand_and_pads_a_shrunk_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    s = FileSlice(path, 2, 5)
    try:
        assert len(s) == 5 and s[0:5] == b"23456" and s[3:99] == b"56"
        path.write_bytes(b"01")  # truncated behind the device's back
        assert s[0:3] == b"\0\0\0"
    finally:
        s.close()
