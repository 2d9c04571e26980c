"""The stats parser on what KVM's real files never contain here but the format allows.

PVM's stats fds (read in tests/kvm/test_stats.py) have no linear histogram, no base-2
unit and no type newer than this reader. These blobs are built from the layout in
Documentation/virt/kvm/api.rst (KVM_GET_STATS_FD), with the blocks out of order and
apart, as the documentation says they may be.
"""

from __future__ import annotations

import ctypes
import math

import pytest

from corevisor.errors import KvmError
from corevisor.kvm import bindings as b
from corevisor.kvm.stats import decode_data, parse_descriptors, parse_header

NAME_SIZE = 24


def _desc(name: str, flags: int, exponent: int, size: int, offset: int, bucket: int) -> bytes:
    d = b.kvm_stats_desc(flags, exponent, size, offset, bucket)
    return bytes(d) + name.encode().ljust(NAME_SIZE, b"\0")


def _blob() -> tuple[bytes, bytes, bytes]:
    """(header, descriptor block, data block) of a three-statistic file."""
    descs = (
        _desc("lin", b.KVM_STATS_TYPE_LINEAR_HIST | b.KVM_STATS_UNIT_SECONDS, -6, 4, 16, 250)
        + _desc(
            "mem",
            b.KVM_STATS_TYPE_INSTANT | b.KVM_STATS_UNIT_BYTES | b.KVM_STATS_BASE_POW2,
            10,
            1,
            0,
            0,
        )
        + _desc("future", 0x7 | (0x9 << b.KVM_STATS_UNIT_SHIFT) | (0x5 << 8), 0, 1, 8, 0)
    )
    data = (
        (3).to_bytes(8, "little")
        + (42).to_bytes(8, "little")
        + b"".join(n.to_bytes(8, "little") for n in (5, 6, 7, 8))
    )
    header = bytes(b.kvm_stats_header(0, NAME_SIZE, 3, 24, 512, 128))
    return header, descs, data


def test_descriptors_decode_every_field() -> None:
    header, descs, data = _blob()
    h = parse_header(header)
    assert (h.num_desc, h.desc_offset, h.data_offset) == (3, 512, 128)
    lin, mem, future = parse_descriptors(descs, h.num_desc, h.name_size)
    assert (lin.type, lin.unit, lin.base, lin.exponent, lin.bucket_size) == (
        "linear-histogram",
        "seconds",
        10,
        -6,
        250,
    )
    assert lin.buckets() == ((0, 250), (250, 500), (500, 750), (750, math.inf))
    assert (mem.type, mem.unit, mem.base, mem.scale) == ("instant", "bytes", 2, 1024.0)
    # a type, unit and base newer than the reader: kept by number, value still read
    assert (future.type, future.unit, future.base, future.scale) == ("type-7", "unit-9", 0, 1.0)
    values = decode_data(data, (lin, mem, future))
    assert values == {"lin": (5, 6, 7, 8), "mem": 3, "future": 42}


def test_malformed_files_are_refused_naming_the_ioctl() -> None:
    header, descs, data = _blob()
    with pytest.raises(KvmError, match="KVM_GET_STATS_FD failed.*header of 10 bytes"):
        parse_header(header[:10])
    bad = bytearray(header)
    bad[20] = 131  # data_offset 131: not a multiple of 8
    with pytest.raises(KvmError, match="data_offset 131"):
        parse_header(bytes(bad))
    with pytest.raises(KvmError, match="descriptor block of"):
        parse_descriptors(descs[:-1], 3, NAME_SIZE)
    lin, mem, future = parse_descriptors(descs, 3, NAME_SIZE)
    with pytest.raises(KvmError, match="data block of 40 bytes, expected 48"):
        decode_data(data[:40], (lin, mem, future))
    zero = _desc("z", 0, 0, 0, 0, 0)
    with pytest.raises(KvmError, match="descriptor 0 \\(z\\) has size 0"):
        parse_descriptors(zero, 1, NAME_SIZE)
    assert ctypes.sizeof(b.kvm_stats_desc) + NAME_SIZE == len(zero)
