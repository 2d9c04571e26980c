"""A reader of KVM's binary statistics: the file KVM_GET_STATS_FD returns for a VM or a vCPU.

The format (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"), all in host byte order:

- a ``kvm_stats_header`` at offset 0: flags (0), ``name_size``, ``num_desc`` and the
  offsets of the id string, the descriptor block and the data block (each a multiple
  of 8; the blocks need not be adjacent or in that order);
- the id string (``name_size`` bytes, NUL-terminated): "kvm-PID" for a VM,
  "kvm-PID/vcpu-N" for a vCPU;
- ``num_desc`` descriptors, each a ``kvm_stats_desc`` (flags, exponent, size, offset,
  bucket_size) followed by its name in ``name_size`` bytes;
- the data block: for each descriptor, ``size`` u64 values at data_offset + its offset.

A descriptor's flags carry the type (cumulative counter, instant value, peak value,
linear or logarithmic histogram), the unit (none, bytes, seconds, cycles, boolean) and
the base (10 or 2) that its exponent applies to: value * base**exponent is in the unit
(halt_wait_ns: seconds, base 10, exponent -9). The header, id and descriptors never
change for the life of the fd, so they are read once; the data is read with one pread
each time. Types, units and bases newer than this reader are kept by number
("type-7"), never refused: their values still read correctly.

What does not live here: when statistics are collected and how a run's numbers are
summed and reported (runstats.py), the ioctl (VmFd/VcpuFd.stats_fd in kvm/ioctls.py).
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import struct
from dataclasses import dataclass

from corevisor.errors import KvmError
from corevisor.kvm import bindings as b

TYPES = {
    b.KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    b.KVM_STATS_TYPE_INSTANT: "instant",
    b.KVM_STATS_TYPE_PEAK: "peak",
    b.KVM_STATS_TYPE_LINEAR_HIST: "linear-histogram",
    b.KVM_STATS_TYPE_LOG_HIST: "log-histogram",
}
UNITS = {
    b.KVM_STATS_UNIT_NONE: "none",
    b.KVM_STATS_UNIT_BYTES: "bytes",
    b.KVM_STATS_UNIT_SECONDS: "seconds",
    b.KVM_STATS_UNIT_CYCLES: "cycles",
    b.KVM_STATS_UNIT_BOOLEAN: "boolean",
}
BASES = {b.KVM_STATS_BASE_POW10: 10, b.KVM_STATS_BASE_POW2: 2}

_HEADER_SIZE = ctypes.sizeof(b.kvm_stats_header)
_DESC_SIZE = ctypes.sizeof(b.kvm_stats_desc)
_NAME_SIZE_MAX = 4096  # far above KVM's 48; a bigger header is not a stats file


def _bad(detail: str) -> KvmError:
    return KvmError("KVM_GET_STATS_FD", errno.EINVAL, f"malformed statistics: {detail}")


@dataclass(frozen=True)
class StatDesc:
    """One statistic's descriptor, decoded."""

    name: str
    type: str  # TYPES' values, or "type-N"
    unit: str  # UNITS' values, or "unit-N"
    base: int  # 10 or 2 (0 for a base this reader does not know)
    exponent: int
    size: int  # u64 values: 1, or the number of histogram buckets
    offset: int  # from the start of the data block
    bucket_size: int  # linear histograms: the width of a bucket, in raw units
    flags: int

    @property
    def is_histogram(self) -> bool:
        return self.type in ("linear-histogram", "log-histogram")

    @property
    def scale(self) -> float:
        """What one raw count is worth in the unit (1e-9 for a nanosecond counter)."""
        return float(self.base) ** self.exponent if self.base else 1.0

    def buckets(self) -> tuple[tuple[float, float], ...]:
        """Each histogram bucket's [low, high) in raw units; the last one is open-ended.

        Linear: bucket i covers [bucket_size * i, bucket_size * (i + 1)). Logarithmic:
        bucket 0 covers [0, 1), bucket i >= 1 covers [2**(i-1), 2**i). Both end at +inf.
        """
        if not self.is_histogram:
            return ()
        edges: list[tuple[float, float]] = []
        for i in range(self.size):
            if self.type == "linear-histogram":
                low, high = float(self.bucket_size * i), float(self.bucket_size * (i + 1))
            else:
                low, high = (0.0, 1.0) if i == 0 else (2.0 ** (i - 1), 2.0**i)
            edges.append((low, math.inf if i == self.size - 1 else high))
        return tuple(edges)


@dataclass(frozen=True)
class StatsHeader:
    """kvm_stats_header as plain values."""

    flags: int
    name_size: int
    num_desc: int
    id_offset: int
    desc_offset: int
    data_offset: int


def parse_header(data: bytes) -> StatsHeader:
    """The header at the start of a stats file; raises KvmError if it cannot be one."""
    if len(data) < _HEADER_SIZE:
        raise _bad(f"header of {len(data)} bytes, expected {_HEADER_SIZE}")
    raw = b.kvm_stats_header.from_buffer_copy(data[:_HEADER_SIZE])
    h = StatsHeader(
        raw.flags, raw.name_size, raw.num_desc, raw.id_offset, raw.desc_offset, raw.data_offset
    )
    if not 0 < h.name_size <= _NAME_SIZE_MAX:
        raise _bad(f"name_size {h.name_size}")
    for what in ("id_offset", "desc_offset", "data_offset"):
        if getattr(h, what) % 8:
            raise _bad(f"{what} {getattr(h, what)} is not a multiple of 8")
    return h


def _decode_flags(flags: int) -> tuple[str, str, int]:
    kind = flags & b.KVM_STATS_TYPE_MASK
    unit = flags & b.KVM_STATS_UNIT_MASK
    base = flags & b.KVM_STATS_BASE_MASK
    return (
        TYPES.get(kind, f"type-{kind}"),
        UNITS.get(unit, f"unit-{unit >> b.KVM_STATS_UNIT_SHIFT}"),
        BASES.get(base, 0),
    )


def parse_descriptors(data: bytes, num_desc: int, name_size: int) -> tuple[StatDesc, ...]:
    """The descriptor block: num_desc descriptors of 16 + name_size bytes each."""
    step = _DESC_SIZE + name_size
    if len(data) < step * num_desc:
        raise _bad(f"descriptor block of {len(data)} bytes, expected {step * num_desc}")
    descs: list[StatDesc] = []
    for i in range(num_desc):
        chunk = data[i * step : (i + 1) * step]
        raw = b.kvm_stats_desc.from_buffer_copy(chunk[:_DESC_SIZE])
        name = chunk[_DESC_SIZE:].split(b"\0", 1)[0].decode("ascii", "replace")
        if not name or raw.size == 0:
            raise _bad(f"descriptor {i} ({name or 'no name'}) has size {raw.size}")
        kind, unit, base = _decode_flags(raw.flags)
        descs.append(
            StatDesc(
                name,
                kind,
                unit,
                base,
                raw.exponent,
                raw.size,
                raw.offset,
                raw.bucket_size,
                raw.flags,
            )
        )
    return tuple(descs)


def data_size(descs: tuple[StatDesc, ...]) -> int:
    """Bytes of the data block the descriptors cover (one pread reads them all)."""
    return max((d.offset + 8 * d.size for d in descs), default=0)


def decode_data(data: bytes, descs: tuple[StatDesc, ...]) -> dict[str, int | tuple[int, ...]]:
    """Each statistic's value: an int, or a tuple of bucket counts for a histogram."""
    if len(data) < data_size(descs):
        raise _bad(f"data block of {len(data)} bytes, expected {data_size(descs)}")
    values: dict[str, int | tuple[int, ...]] = {}
    for d in descs:
        words = struct.unpack_from(f"={d.size}Q", data, d.offset)
        values[d.name] = words if d.is_histogram or d.size > 1 else words[0]
    return values


class StatsFile:
    """One open stats fd (it owns it): header, id and descriptors read once, data on demand."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self.header = parse_header(os.pread(fd, _HEADER_SIZE, 0))
            h = self.header
            self.id = os.pread(fd, h.name_size, h.id_offset).split(b"\0", 1)[0].decode()
            block = os.pread(fd, (_DESC_SIZE + h.name_size) * h.num_desc, h.desc_offset)
            self.descriptors = parse_descriptors(block, h.num_desc, h.name_size)
        except OSError as e:
            os.close(fd)
            raise KvmError("KVM_GET_STATS_FD", e.errno or 0, "reading the stats fd") from None
        except KvmError:
            os.close(fd)
            raise
        self._size = data_size(self.descriptors)
        self.by_name = {d.name: d for d in self.descriptors}

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Every statistic's current value, from one pread of the data block."""
        try:
            data = os.pread(self.fd, self._size, self.header.data_offset)
        except OSError as e:
            raise KvmError("KVM_GET_STATS_FD", e.errno or 0, f"reading {self.id}") from None
        return decode_data(data, self.descriptors)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StatsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
