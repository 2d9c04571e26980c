"""virtio-blk against real image files, virtio-console against a real sink, end to end."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from corevisor.errors import ConfigError
from corevisor.memory import GuestMemory
from corevisor.virtio.blk import (
    ID_BYTES,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Blk,
)
from corevisor.virtio.console import Console
from corevisor.virtio.mmio import REG, STATUS_NEEDS_RESET, VirtioMmio
from tests.unit.virtio_driver import FakeDriver

HDR, DATA, STATUS = 0x80000, 0x90000, 0xA0000


def _blk(mem: GuestMemory, path: Path, readonly: bool = False) -> tuple[VirtioMmio, FakeDriver]:
    dev = VirtioMmio(Blk(path, readonly), mem, lambda msg: None)
    drv = FakeDriver(dev, mem)
    drv.start()
    return dev, drv


def _request(
    dev: VirtioMmio, drv: FakeDriver, kind: int, sector: int, data_len: int, out: bytes = b""
) -> tuple[int, int]:
    mem = drv.mem
    mem.write(HDR, struct.pack("<IIQ", kind, 0, sector))
    mem.write(STATUS, b"\xee")
    bufs = [(HDR, 16, False)]
    if out:
        mem.write(DATA, out)
        bufs.append((DATA, len(out), False))
    elif data_len:
        bufs.append((DATA, data_len, True))
    bufs.append((STATUS, 1, True))
    head = drv.queues[0].add_chain(bufs)
    dev.handle_queue(0)
    used = drv.queues[0].get_used()
    assert [h for h, _ in used] == [head]
    return mem.read_u8(STATUS), used[0][1]


def test_blk_read_write_flush_get_id(mem: GuestMemory, image: Path) -> None:
    dev, drv = _blk(mem, image)
    try:
        assert struct.unpack_from("<Q", dev.read(REG.CONFIG, 8))[0] == 8  # capacity
        status, n = _request(dev, drv, VIRTIO_BLK_T_IN, 1, 512)
        assert (status, n) == (VIRTIO_BLK_S_OK, 513)
        assert mem.read(DATA, 512) == image.read_bytes()[512:1024]
        status, n = _request(dev, drv, VIRTIO_BLK_T_OUT, 2, 0, out=b"Z" * 1024)
        assert (status, n) == (VIRTIO_BLK_S_OK, 1)
        assert image.read_bytes()[1024:2048] == b"Z" * 1024
        assert _request(dev, drv, VIRTIO_BLK_T_FLUSH, 0, 0)[0] == VIRTIO_BLK_S_OK
        status, n = _request(dev, drv, VIRTIO_BLK_T_GET_ID, 0, ID_BYTES)
        assert status == VIRTIO_BLK_S_OK and n == ID_BYTES + 1
        assert mem.read(DATA, ID_BYTES).rstrip(b"\0") == b"disk.img"
        assert _request(dev, drv, 99, 0, 0)[0] == VIRTIO_BLK_S_UNSUPP
    finally:
        dev.close()


def test_blk_bad_requests_fail_with_ioerr(mem: GuestMemory, image: Path) -> None:
    dev, drv = _blk(mem, image)
    try:
        assert _request(dev, drv, VIRTIO_BLK_T_IN, 8, 512)[0] == VIRTIO_BLK_S_IOERR  # past end
        assert _request(dev, drv, VIRTIO_BLK_T_IN, 0, 100)[0] == VIRTIO_BLK_S_IOERR  # partial
        assert _request(dev, drv, VIRTIO_BLK_T_IN, 2**60, 512)[0] == VIRTIO_BLK_S_IOERR
        assert not drv.r32(REG.STATUS) & STATUS_NEEDS_RESET
    finally:
        dev.close()


def test_blk_readonly(mem: GuestMemory, image: Path) -> None:
    before = image.read_bytes()
    dev, drv = _blk(mem, image, readonly=True)
    try:
        assert dev.offered & VIRTIO_BLK_F_RO
        status, _ = _request(dev, drv, VIRTIO_BLK_T_OUT, 0, 0, out=b"X" * 512)
        assert status == VIRTIO_BLK_S_IOERR
        assert image.read_bytes() == before
        assert _request(dev, drv, VIRTIO_BLK_T_IN, 0, 512)[0] == VIRTIO_BLK_S_OK
    finally:
        dev.close()


def test_blk_request_without_status_byte_needs_reset(mem: GuestMemory, image: Path) -> None:
    reports: list[str] = []
    dev = VirtioMmio(Blk(image), mem, reports.append)
    drv = FakeDriver(dev, mem)
    drv.start()
    try:
        mem.write(HDR, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        drv.queues[0].add_chain([(HDR, 16, False), (DATA, 512, False)])
        dev.handle_queue(0)
        assert drv.r32(REG.STATUS) & STATUS_NEEDS_RESET
        assert "status byte" in reports[0]
    finally:
        dev.close()


def test_blk_image_not_whole_sectors_refused(tmp_path: Path) -> None:
    p = tmp_path / "odd.img"
    p.write_bytes(b"x" * 1000)
    with pytest.raises(ConfigError, match="not a multiple of 512"):
        Blk(p, where="partitions.demo.blk[0]")
    with pytest.raises(ConfigError, match="missing.img does not exist"):
        Blk(tmp_path / "missing.img")


def test_console_output_and_input(mem: GuestMemory) -> None:
    out: list[bytes] = []
    con = Console(out.append)
    dev = VirtioMmio(con, mem, lambda msg: None)
    drv = FakeDriver(dev, mem)
    drv.start()
    try:
        rx, tx = drv.queues
        mem.write(DATA, b"hello, hvc0\n")
        tx.add_chain([(DATA, 7, False), (DATA + 7, 5, False)])
        dev.handle_queue(1)
        assert b"".join(out) == b"hello, hvc0\n"
        assert tx.get_used() and dev.interrupt.status
        con.enqueue_input(b"typed")
        dev.handle_fd(con.fds()[0])  # no buffers yet: input waits
        head = rx.add_chain([(HDR, 64, True)])
        dev.handle_queue(0)
        assert rx.get_used() == [(head, 5)]
        assert mem.read(HDR, 5) == b"typed"
    finally:
        dev.close()
