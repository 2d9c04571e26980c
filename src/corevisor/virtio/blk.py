"""virtio-blk (virtio 1.x, 5.2) over a raw image file: read, write, flush, get-id.

A request is a device-readable header (type, reserved, sector), then data (device-
readable for writes, device-writable for reads) and one device-writable status byte,
which is the last byte of the chain. A chain that cannot hold that shape (no header, no
writable status byte) is a broken driver: QueueError, the device needs a reset. A
request that is well-formed but cannot be done (beyond the end of the disk, not whole
sectors, a write to a read-only disk, a host I/O error) completes with VIRTIO_BLK_S_IOERR
and the device carries on, as a real disk would.

Data moves in pieces of at most CHUNK bytes between the file and guest RAM (always
through GuestMemory), so a huge request costs no more VMM memory than a small one.
Flush is os.fsync of the image. The image's size must be a whole number of 512-byte
sectors; anything else is refused when the device is built, with a ConfigError. The
image is locked while the device holds it (shared if read-only, exclusive if writable:
inputs.lock_file), so a second corevisor, or QEMU, cannot write it at the same time.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from corevisor import inputs
from corevisor.errors import DeviceError, show
from corevisor.snapshot import require_bool, require_bytes, require_state, require_uint
from corevisor.virtio.config import SECTOR, check_image, check_sectors
from corevisor.virtio.device import VirtioDevice
from corevisor.virtio.queue import ChainReader, ChainWriter, DescriptorChain, QueueError

__all__ = [
    "Blk",
    "BlkState",
    "VIRTIO_ID_BLOCK",
    "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_RO",
    "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_FLUSH",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_UNSUPP",
    "SECTOR",
    "ID_BYTES",
    "check_image",
]

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES
QUEUE_SIZE = 256
CHUNK = 1 << 20
_HEADER = struct.Struct("<IIQ")


@dataclass(frozen=True)
class BlkState:
    """What the guest has seen of the disk, and the request counters.

    A request is served whole on the I/O thread, so none is ever half-done in a saved
    state: the disk's contents live in its image file. size and readonly are what the
    guest read from the config space; a restore onto a disk of another size is refused
    (the guest's file systems would no longer fit). serial is what GET_ID answered.
    """

    size: int
    readonly: bool
    serial: bytes
    requests: int
    errors: int


class Blk(VirtioDevice):
    """A disk backed by a raw image file (optionally read-only)."""

    device_type = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    name = "virtio-blk"

    def __init__(self, path: Path, readonly: bool = False, where: str = "blk") -> None:
        super().__init__()
        self.path = Path(path)
        self.readonly = readonly
        # Opened, checked and locked on one descriptor: shared for a read-only disk,
        # exclusive for a writable one (inputs.lock_file), so two runs never both write.
        label = inputs.Named(where, show(self.path))
        f = inputs.open_file(self.path, label, writable=not readonly)
        self.fd = f.fd
        try:
            self.size = check_sectors(f.size, where, str(self.path))
            inputs.lock_file(f, exclusive=not readonly)
        except BaseException:
            os.close(f.fd)
            raise
        self.name = f"virtio-blk({self.path.name})"
        self.serial = self.path.name.encode()[:ID_BYTES]
        self.errors = 0

    def features(self) -> int:
        f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        return f | (VIRTIO_BLK_F_RO if self.readonly else 0)

    def config(self) -> bytes:
        # capacity, size_max, seg_max, geometry (c/h/s), blk_size. seg_max keeps a chain
        # (header + data + status) within the queue size, as 2.7.4.2 requires.
        return struct.pack("<QIIHBBI", self.size // SECTOR, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR)

    def process_queue(self, index: int) -> None:
        self.serve(0, self._request)

    def _request(self, chain: DescriptorChain) -> int:
        """Serve one request; return the bytes written into the chain (status included)."""
        kind, _, sector = _HEADER.unpack(chain.reader().read(_HEADER.size))
        if not chain.writable:
            raise QueueError(f"blk request {chain.head} has no device-writable status byte")
        *front, (last_gpa, last_len) = chain.writable
        status_gpa = last_gpa + last_len - 1
        data = ChainWriter(chain.memory, front + ([(last_gpa, last_len - 1)] * (last_len > 1)))
        reader = chain.reader()
        reader.read(_HEADER.size)
        try:
            if kind == VIRTIO_BLK_T_IN:
                status = self._read(sector, data)
            elif kind == VIRTIO_BLK_T_OUT:
                status = self._write(sector, reader.remaining, reader)
            elif kind == VIRTIO_BLK_T_FLUSH:
                status = VIRTIO_BLK_S_OK if self.readonly else self._flush()
            elif kind == VIRTIO_BLK_T_GET_ID:
                data.write(self.serial.ljust(ID_BYTES, b"\0")[: data.remaining])
                status = VIRTIO_BLK_S_OK
            else:
                status = VIRTIO_BLK_S_UNSUPP
        except OSError:
            status = VIRTIO_BLK_S_IOERR
        if status != VIRTIO_BLK_S_OK:
            self.errors += 1
        chain.memory.write(status_gpa, bytes([status]))
        return data.written + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.size

    def _read(self, sector: int, data: ChainWriter) -> int:
        length = data.remaining
        if not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR
        pos = sector * SECTOR
        for gpa, n in data.segments(length):
            for off in range(0, n, CHUNK):
                piece = os.pread(self.fd, min(CHUNK, n - off), pos)
                if len(piece) != min(CHUNK, n - off):
                    raise OSError("short read: the image shrank under the device")
                assert self.ctx is not None
                self.ctx.memory.write(gpa + off, piece)
                pos += len(piece)
        return VIRTIO_BLK_S_OK

    def _write(self, sector: int, length: int, reader: ChainReader) -> int:
        assert self.ctx is not None
        if self.readonly or not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR
        pos = sector * SECTOR
        for gpa, n in reader.segments(length):
            for off in range(0, n, CHUNK):
                piece = self.ctx.memory.read(gpa + off, min(CHUNK, n - off))
                written = os.pwrite(self.fd, piece, pos)
                if written != len(piece):
                    raise OSError("short write to the image")
                pos += written
        self.bytes_from_guest += length
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        os.fsync(self.fd)
        return VIRTIO_BLK_S_OK

    def sync(self) -> None:
        """Every completed write on disk: a snapshot's RAM holds them as done."""
        if not self.readonly:
            os.fsync(self.fd)

    # --- save / restore ---------------------------------------------------------------
    def save(self) -> BlkState:
        return BlkState(self.size, self.readonly, self.serial, self.requests, self.errors)

    def check_state(self, state: object) -> None:
        st = require_state(self.name, state, BlkState)
        require_uint(self.name, "size", st.size)
        require_bool(self.name, "readonly", st.readonly)
        require_bytes(self.name, "serial", st.serial, ID_BYTES)
        require_uint(self.name, "requests", st.requests)
        require_uint(self.name, "errors", st.errors)
        if (st.size, st.readonly) != (self.size, self.readonly):
            raise DeviceError(
                f"{self.name}: the guest saw a {st.size}-byte "
                f"{'read-only ' if st.readonly else ''}disk; {self.path} is {self.size} "
                f"bytes{' and read-only' if self.readonly else ''}"
            )

    def load_state(self, state: object) -> None:
        assert isinstance(state, BlkState)
        self.serial = state.serial
        self.requests = state.requests
        self.errors = state.errors

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
