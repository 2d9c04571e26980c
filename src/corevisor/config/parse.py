"""The written forms of spec values, parsed once at the edge: sizes, CPU lists, serial
settings, HOST:PORT, paths; and their rendering back for messages (format_size, ...).

Shared by the system-file reader (toml.py) and the `run` options (args.py), so "64M",
"0-3" and "file:PATH" mean the same wherever they are written. Each parser takes
``where`` (the key or option being read) and raises one ConfigError line naming it.
What does not live here: which keys a table has (toml.py), whether a parsed value is
acceptable (validate.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from corevisor.errors import ConfigError, quote
from corevisor.spec import (
    NAME_PATTERN,
    PCI_ADDRESS_PATTERN,
    HostPort,
    PciAddress,
    SerialKind,
    SerialSpec,
)

__all__ = [
    "parse_size",
    "parse_cpu_list",
    "parse_serial",
    "parse_host_port",
    "parse_gdb",
    "parse_pci_address",
    "parse_path",
    "format_size",
    "format_cpu_list",
    "type_name",
    "SERIAL_HINT",
    "NAME_RE",
]

NAME_RE = re.compile(NAME_PATTERN)  # partition and channel names
_SIZE_RE = re.compile(r"([0-9]+)\s*([KMG]?)", re.IGNORECASE | re.ASCII)
_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE_HINT = "use a number of bytes or a suffix K, M, G: 64M"
_CPU_ITEM_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)
# Beyond this a CPU list is a typo, and expanding "0-999999999" would eat the host.
_MAX_CPU_NUMBER = 1 << 16
SERIAL_HINT = "use stdout, null, file:PATH or unix:PATH"


def type_name(value: object) -> str:
    """How a message names a document value's type ("an integer", "a table")."""
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def format_size(n: int) -> str:
    """Render a byte count the way a user would write it (64M, 4097), for messages."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f}G"
    return str(n)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Render core numbers as ranges ("0-3,6"), for messages."""
    parts: list[str] = []
    start: int | None = None
    prev: int | None = None
    for c in sorted(set(cpus)):
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = c
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts) if parts else "none"


def parse_size(value: object, where: str) -> int:
    """Parse a byte count: an integer, or a string of digits with an optional K/M/G suffix.

    Only binary suffixes are accepted, with no "B", so "64M" cannot be misread as
    64,000,000. ``where`` prefixes the error ("system.toml: partitions.x.memory").
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        shown = quote(value) if not isinstance(value, float | bool) else str(value).lower()
        raise ConfigError(f"{where}: bad size {shown} ({_SIZE_HINT})")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: bad size {value} (sizes cannot be negative)")
        return value
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"{where}: bad size {quote(value)} ({_SIZE_HINT})")
    return int(match.group(1)) * _SIZE_SUFFIX[match.group(2).upper()]


def parse_cpu_list(value: object, where: str) -> tuple[int, ...]:
    """Parse a Linux-style CPU list ("0,1", "0-3", "0,2-3") into core numbers, in order."""
    hint = "use e.g. 0,1 or 0-3 or 0,2-3"
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a CPU list string, got {type_name(value)}")
    cores: list[int] = []
    for item in value.split(","):
        match = _CPU_ITEM_RE.fullmatch(item.strip())
        if match is None:
            raise ConfigError(f"{where}: bad CPU list {quote(value)} ({hint})")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ConfigError(f"{where}: bad CPU range {quote(item.strip())} (end before start)")
        if high >= _MAX_CPU_NUMBER:
            raise ConfigError(f"{where}: core {high} is out of range")
        cores.extend(range(low, high + 1))
    return tuple(cores)


def parse_path(text: str, where: str, base: Path | None) -> Path:
    """A user's path: not empty, no NUL, ~ expanded, relative to base (a system file's
    directory) when base is given, else to the working directory."""
    if not text or "\0" in text:
        raise ConfigError(f"{where}: {quote(text)} is not a valid path")
    path = Path(os.path.expanduser(text))
    return path if base is None or path.is_absolute() else base / path


def parse_serial(text: str, where: str, base: Path | None) -> SerialSpec:
    """"stdout" | "null" | "file:PATH" | "unix:PATH" -> SerialSpec (path resolved on base)."""
    if text in ("stdout", "null"):
        return SerialSpec(SerialKind(text))
    kind, sep, path = text.partition(":")
    if not sep or kind not in ("file", "unix"):
        raise ConfigError(f"{where}: bad serial {quote(text)} ({SERIAL_HINT})")
    if not path:
        raise ConfigError(f"{where}: {quote(text)} needs a path after {kind}:")
    if "\0" in path:
        raise ConfigError(f"{where}: the path in {quote(text)} contains a NUL character")
    return SerialSpec(SerialKind(kind), parse_path(path, where, base))


def parse_host_port(text: str) -> HostPort:
    """HOST:PORT ([HOST]:PORT for IPv6) -> HostPort; host is an IP or localhost.

    Raises ValueError saying what is wrong (the caller adds the key).
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{quote(text)} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port {quote(port_text)} in {quote(text)} (use 1-65535)")
    if host != "localhost":
        import ipaddress  # only GDB addresses need it; start-up time is benchmarked

        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{quote(host)} is not an IP address or localhost") from None
    return HostPort(host, int(port_text))


def parse_gdb(text: str, where: str) -> HostPort:
    """A GDB stub address, as parse_host_port, failing as one ConfigError naming where."""
    try:
        return parse_host_port(text)
    except ValueError as e:
        hint = "" if "(use" in str(e) else " (use e.g. 127.0.0.1:1234)"
        raise ConfigError(f"{where}: {e}{hint}") from None


_PCI_ADDRESS = re.compile(PCI_ADDRESS_PATTERN)


def parse_pci_address(text: str, where: str) -> PciAddress:
    """A host PCI address, DOMAIN:BUS:DEVICE.FUNCTION in hex ("0000:00:04.0"), as sysfs
    names it; device 0-1f, function 0-7."""
    if _PCI_ADDRESS.fullmatch(text) is None:
        raise ConfigError(f"{where}: {quote(text)} is not a PCI address: give DOMAIN:BUS:"
                          "DEVICE.FUNCTION in hex, like 0000:00:04.0 (lspci -D)")
    domain, bus, rest = text.split(":")
    device, function = rest.split(".")
    return PciAddress(int(domain, 16), int(bus, 16), int(device, 16), int(function, 16))
