"""The tagged binary encoding of saved state: plain values and registered dataclasses.

A snapshot is input: it may be corrupt or crafted, so reading one must never run code
(pickle would). This encoding can only produce None, bools, ints, floats, strings,
bytes, tuples and instances of the frozen state dataclasses listed in STATE_TYPES,
built by their generated __init__ with exactly their fields; every length is checked
against what is left of the input and nesting is bounded. What the values mean is
checked afterwards by each part's restore().

One value is a tag byte and its payload (docs/snapshot-format.md has the table):

    0x00 None   0x01 False   0x02 True
    0x03 int    zigzag LEB128 varint
    0x04 float  8 bytes, IEEE 754 binary64, little-endian
    0x05 str    varint length, UTF-8
    0x06 bytes  varint length, the bytes
    0x07 tuple  varint count, the values
    0x08 record varint-length type name, varint field count, then per field a
                varint-length field name and its value

A record's type name is the dataclass's wire name (its class name): renaming a state
class must keep the old name here as an alias. A record may lack fields that have
defaults (a file written before a field was added, i.e. an older minor version); an
unknown or missing required field is an error. What does not live here: the file
layout (format.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import struct
from typing import Any, NoReturn

from corevisor.errors import SnapshotError

__all__ = ["encode", "decode", "STATE_TYPES", "state_types"]

NONE, FALSE, TRUE, INT, FLOAT, STR, BYTES, TUPLE, RECORD = range(9)
MAX_DEPTH = 32
MAX_INT_BYTES = 160  # about 1100 bits: far beyond any register, short enough to be cheap
_F64 = struct.Struct("<d")

# (module, class): every dataclass a saved state may contain.
STATE_TYPES: tuple[tuple[str, str], ...] = (
    ("corevisor.snapshot.state", "MachineSnapshot"),
    ("corevisor.snapshot.state", "HostCpu"),
    ("corevisor.snapshot.state", "KvmVmState"),
    ("corevisor.snapshot.state", "KvmVcpuState"),
    ("corevisor.snapshot.state", "Registers"),
    ("corevisor.snapshot.state", "Segment"),
    ("corevisor.snapshot.state", "DescriptorTable"),
    ("corevisor.snapshot.state", "SpecialRegisters"),
    ("corevisor.snapshot.state", "ExceptionEvent"),
    ("corevisor.snapshot.state", "InterruptEvent"),
    ("corevisor.snapshot.state", "NmiEvent"),
    ("corevisor.snapshot.state", "SmiEvent"),
    ("corevisor.snapshot.state", "VcpuEvents"),
    ("corevisor.snapshot.state", "DebugRegisters"),
    ("corevisor.snapshot.state", "Xcr"),
    ("corevisor.snapshot.state", "Msr"),
    ("corevisor.snapshot.state", "PicState"),
    ("corevisor.snapshot.state", "IoapicState"),
    ("corevisor.snapshot.state", "PitChannel"),
    ("corevisor.snapshot.state", "PitState"),
    ("corevisor.snapshot.state", "ClockState"),
    ("corevisor.snapshot.format", "SnapshotMeta"),
    ("corevisor.snapshot.format", "MemoryFile"),
    ("corevisor.snapshot.format", "MemoryRun"),
    ("corevisor.kvm.ioctls", "SupportedCpuid"),
    ("corevisor.devices.uart16550", "Uart16550State"),
    ("corevisor.devices.i8042", "I8042State"),
    ("corevisor.devices.rtc", "RtcState"),
    ("corevisor.devices.postcode", "PostCodeState"),
    ("corevisor.devices.debug_exit", "DebugExitState"),
    ("corevisor.devices.pvpanic", "PvPanicState"),
    ("corevisor.devices.pm1", "Pm1State"),
    ("corevisor.devices.pm_timer", "PmTimerState"),
    ("corevisor.devices.fw_cfg", "FwCfgState"),
    ("corevisor.virtio.mmio", "VirtioMmioState"),
    ("corevisor.virtio.common", "CoreState"),
    ("corevisor.virtio.pci", "VirtioPciState"),
    ("corevisor.pci.config", "PciFunctionState"),
    ("corevisor.pci.msix", "MsixState"),
    ("corevisor.pci.host", "HostBridgeState"),
    ("corevisor.pci.host", "ConfigPortsState"),
    ("corevisor.virtio.queue", "QueueState"),
    ("corevisor.virtio.blk", "BlkState"),
    ("corevisor.virtio.net", "NetState"),
    ("corevisor.virtio.console", "ConsoleState"),
    ("corevisor.virtio.rng", "RngState"),
    ("corevisor.hypercall", "HypercallsState"),
    ("corevisor.channel", "ChannelState"),
    ("corevisor.channel", "ChannelEndState"),
    ("corevisor.channel", "ReadOnlyGuardState"),
    ("corevisor.channel", "DoorbellPortState"),
    ("corevisor.system", "WatchdogState"),
    ("corevisor.userdev.attach", "UserDeviceState"),
)

_TYPES: dict[str, type] | None = None


def state_types() -> dict[str, type]:
    """Wire name -> dataclass, imported on first use (snapshots are rare; start-up counts)."""
    global _TYPES
    if _TYPES is None:
        types: dict[str, type] = {}
        for module, name in STATE_TYPES:
            cls: type = getattr(importlib.import_module(module), name)
            assert dataclasses.is_dataclass(cls) and name not in types, name
            types[name] = cls
        _TYPES = types
    return _TYPES


# --- encoding -----------------------------------------------------------------------


def encode(value: object) -> bytes:
    """The encoding of value; TypeError for anything that is not plain state (a bug)."""
    out = bytearray()
    _encode(value, out, state_types())
    return bytes(out)


def _varint(n: int, out: bytearray) -> None:
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _name(text: str, out: bytearray) -> None:
    raw = text.encode()
    _varint(len(raw), out)
    out += raw


def _encode(value: object, out: bytearray, types: dict[str, type]) -> None:
    if value is None:
        out.append(NONE)
    elif value is False or value is True:
        out.append(TRUE if value else FALSE)
    elif type(value) is int:
        out.append(INT)
        _varint(value << 1 if value >= 0 else ((-value) << 1) - 1, out)
    elif type(value) is float:
        out.append(FLOAT)
        out += _F64.pack(value)
    elif type(value) is str:
        out.append(STR)
        _name(value, out)
    elif type(value) is bytes:
        out.append(BYTES)
        _varint(len(value), out)
        out += value
    elif type(value) is tuple:
        out.append(TUPLE)
        _varint(len(value), out)
        for item in value:
            _encode(item, out, types)
    elif types.get(type(value).__name__) is type(value):
        out.append(RECORD)
        _name(type(value).__name__, out)
        fields = dataclasses.fields(value)  # type: ignore[arg-type]
        _varint(len(fields), out)
        for f in fields:
            _name(f.name, out)
            _encode(getattr(value, f.name), out, types)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} in a snapshot: {value!r:.80}")


# --- decoding -----------------------------------------------------------------------


def decode(data: bytes, where: str = "state") -> Any:
    """The value encoded in data (all of it); SnapshotError naming where on any flaw."""
    reader = _Reader(memoryview(data), where, state_types())
    value = reader.value(0)
    if reader.pos != len(data):
        reader.fail(f"{len(data) - reader.pos} bytes after the value")
    return value


class _Reader:
    def __init__(self, data: memoryview, where: str, types: dict[str, type]) -> None:
        self.data = data
        self.pos = 0
        self.where = where
        self.types = types

    def fail(self, why: str) -> NoReturn:
        raise SnapshotError(f"{self.where}: corrupt at byte {self.pos}: {why}")

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            self.fail(f"needs {n} bytes, {len(self.data) - self.pos} left")
        piece = self.data[self.pos : self.pos + n]
        self.pos += n
        return piece

    def varint(self, limit: int = 10) -> int:
        n = shift = 0
        for _ in range(limit):
            byte = self.take(1)[0]
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n
        self.fail("a number is too long")

    def text(self) -> str:
        raw = self.take(self.varint())
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            self.fail("text is not UTF-8")

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH}")
        tag = self.take(1)[0]
        if tag == NONE:
            return None
        if tag in (FALSE, TRUE):
            return tag == TRUE
        if tag == INT:
            z = self.varint(MAX_INT_BYTES)
            return z >> 1 if not z & 1 else -((z + 1) >> 1)
        if tag == FLOAT:
            number: float = _F64.unpack(self.take(8))[0]
            if math.isnan(number):
                self.fail("a float is NaN")
            return number
        if tag == STR:
            return self.text()
        if tag == BYTES:
            return bytes(self.take(self.varint()))
        if tag == TUPLE:
            count = self.varint()
            if count > len(self.data) - self.pos:
                self.fail(f"a tuple of {count} values cannot fit")
            return tuple(self.value(depth + 1) for _ in range(count))
        if tag == RECORD:
            return self.record(depth)
        self.fail(f"unknown tag {tag:#x}")

    def record(self, depth: int) -> Any:
        name = self.text()
        cls = self.types.get(name)
        if cls is None:
            self.fail(f"unknown record type {name!r}")
        count = self.varint()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if count > len(fields):
            self.fail(f"{name} has {len(fields)} fields, not {count}")
        values: dict[str, Any] = {}
        for _ in range(count):
            field = self.text()
            if field not in fields or field in values:
                self.fail(f"{name} has no field {field!r} (or has it twice)")
            values[field] = self.value(depth + 1)
        missing = [
            f.name
            for f in fields.values()
            if f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            self.fail(f"{name} lacks {', '.join(missing)}")
        return cls(**values)
