"""System configuration: a TOML file (or CLI options) turned into frozen, validated dataclasses.

Every check a user can fail happens here, before any fd is opened, and fails with one
ConfigError line that names the file and the key (or the CLI option), e.g.::

    system.toml: partitions.demo.cpus: 300 is more than the 64 vCPUs corevisor allows

The format::

    [partitions.demo]
    image = "guests/build/hello.elf"   # relative to the TOML file's directory
    cpus = 2                            # 1..64
    memory = "64M"                      # or bytes; >= 2M, 4 KiB multiple, <= 64G and host RAM
    pin = [0, 1]                        # optional: one host core, or one per vCPU ("0-1" works too)
    cmdline = "exit=0"                  # optional, <= 4096 bytes, no NUL
    serial = "stdout"                   # "stdout" | "file:PATH" | "unix:PATH" | "null"

Relative ``file:`` and ``unix:`` serial paths in a file are resolved against the file's
directory, like ``image``, so a configuration means the same from any working directory;
on the command line they stay relative to the working directory.

The image check is shallow on purpose (exists, regular file, ELF magic): parsing it is
the loader's job. What does not live here: opening serial backends (console.py) and
turning a config into a machine (builder.py).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corevisor.errors import ConfigError

__all__ = [
    "PartitionConfig",
    "SystemConfig",
    "parse_size",
    "parse_cpu_list",
    "format_size",
    "format_cpu_list",
    "load_config",
    "partition_from_args",
    "MAX_VCPUS",
    "MIN_MEMORY",
    "MAX_MEMORY",
    "MAX_CMDLINE",
]

MAX_VCPUS = 64
MIN_MEMORY = 2 << 20
MAX_MEMORY = 64 << 30
MEMORY_ALIGN = 4 << 10
MAX_CMDLINE = 4096
# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# Beyond this a CPU list is a typo, and expanding "0-999999999" would eat the host.
_MAX_CPU_NUMBER = 1 << 16

_ELF_MAGIC = b"\x7fELF"
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SIZE_RE = re.compile(r"(\d+)\s*([KMG]?)", re.IGNORECASE)
_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_CPU_ITEM_RE = re.compile(r"(\d+)(?:-(\d+))?")

_PARTITION_KEYS = ("cpus", "image", "memory", "pin", "cmdline", "serial")
_TOP_LEVEL_KEYS = ("partitions",)
_SIZE_HINT = "use a number of bytes or a suffix K, M, G: 64M"
_SERIAL_HINT = "use stdout, null, file:PATH or unix:PATH"


@dataclass(frozen=True)
class PartitionConfig:
    """One partition (one VM): its guest image and the resources it gets."""

    name: str
    image: Path
    cpus: int = 1
    memory: int = 64 << 20
    pin: tuple[int, ...] = ()
    cmdline: str = ""
    serial: str = "stdout"


@dataclass(frozen=True)
class SystemConfig:
    """A whole system: the partitions, and the file they came from (None for CLI runs)."""

    partitions: tuple[PartitionConfig, ...]
    source: Path | None = None


# ---------------------------------------------------------------------- small parsers


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


def _quote(value: object) -> str:
    """Show a user value in a message: strings in double quotes, the rest as TOML would."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _type_name(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def parse_size(value: object, where: str) -> int:
    """Parse a byte count: an integer, or a string of digits with an optional K/M/G suffix.

    Only binary suffixes are accepted, with no "B", so "64M" cannot be misread as
    64,000,000. ``where`` prefixes the error ("system.toml: partitions.x.memory").
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        shown = _quote(value) if not isinstance(value, float | bool) else str(value).lower()
        raise ConfigError(f"{where}: bad size {shown} ({_SIZE_HINT})")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: bad size {value} (sizes cannot be negative)")
        return value
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"{where}: bad size {_quote(value)} ({_SIZE_HINT})")
    return int(match.group(1)) * _SIZE_SUFFIX[match.group(2).upper()]


def parse_cpu_list(value: str, where: str) -> tuple[int, ...]:
    """Parse a Linux-style CPU list ("0,1", "0-3", "0,2-3") into core numbers, in order."""
    hint = "use e.g. 0,1 or 0-3 or 0,2-3"
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a CPU list string, got {_type_name(value)}")
    cores: list[int] = []
    for item in value.split(","):
        match = _CPU_ITEM_RE.fullmatch(item.strip())
        if match is None:
            raise ConfigError(f"{where}: bad CPU list {_quote(value)} ({hint})")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ConfigError(f"{where}: bad CPU range {_quote(item.strip())} (end before start)")
        if high >= _MAX_CPU_NUMBER:
            raise ConfigError(f"{where}: core {high} is out of range")
        cores.extend(range(low, high + 1))
    return tuple(cores)


# ---------------------------------------------------------------------- host facts


def _host_memory() -> int | None:
    """MemTotal from /proc/meminfo in bytes, or None if it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---------------------------------------------------------------------- field checks


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ConfigError(
            f"{where}: bad partition name {_quote(name)} (use [a-z][a-z0-9_-]{{0,31}})"
        )
    return name


def _check_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {_type_name(value)} {_quote(value)}")
    return value


def _check_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {_type_name(value)} {_quote(value)}")
    return value


def _check_cpus(value: object, where: str) -> int:
    cpus = _check_int(value, where)
    if cpus > MAX_VCPUS:
        raise ConfigError(f"{where}: {cpus} is more than the {MAX_VCPUS} vCPUs corevisor allows")
    if cpus < 1:
        raise ConfigError(f"{where}: {cpus} vCPUs (a partition needs at least 1)")
    return cpus


def _check_memory(value: object, where: str) -> int:
    size = parse_size(value, where)
    if size < MIN_MEMORY:
        raise ConfigError(
            f"{where}: {format_size(size)} is less than the {format_size(MIN_MEMORY)} minimum"
        )
    if size > MAX_MEMORY:
        raise ConfigError(
            f"{where}: {format_size(size)} is more than the {format_size(MAX_MEMORY)} maximum"
        )
    if size % MEMORY_ALIGN:
        raise ConfigError(f"{where}: {size} bytes is not a multiple of 4K (guest pages)")
    host = _host_memory()
    if host is not None and size > host:
        raise ConfigError(
            f"{where}: {format_size(size)} is more than this host's RAM ({format_size(host)})"
        )
    return size


def _check_pin(cores: tuple[int, ...], cpus: int, where: str) -> tuple[int, ...]:
    if cores and len(cores) not in (1, cpus):
        raise ConfigError(
            f"{where}: {len(cores)} cores for {cpus} vCPUs "
            "(give one core for all vCPUs, or exactly one per vCPU)"
        )
    allowed = os.sched_getaffinity(0)
    existing = range(os.cpu_count() or 1)
    for core in cores:
        if core not in existing:
            raise ConfigError(
                f"{where}: host core {core} does not exist "
                f"(this host has cores {format_cpu_list(existing)})"
            )
        if core not in allowed:
            raise ConfigError(
                f"{where}: host core {core} is not available to corevisor "
                f"(its CPU affinity allows cores {format_cpu_list(allowed)})"
            )
    return cores


def _pin_from_toml(value: object, where: str) -> tuple[int, ...]:
    if isinstance(value, str):
        return parse_cpu_list(value, where)
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: expected an array of core numbers, got {_type_name(value)} {_quote(value)}"
        )
    cores: list[int] = []
    for i, item in enumerate(value):
        core = _check_int(item, f"{where}[{i}]")
        if core < 0:
            raise ConfigError(f"{where}[{i}]: host core {core} does not exist")
        cores.append(core)
    return tuple(cores)


def _check_cmdline(value: object, where: str) -> str:
    cmdline = _check_str(value, where)
    if "\0" in cmdline:
        raise ConfigError(f"{where}: contains a NUL character")
    length = len(cmdline.encode("utf-8", "surrogatepass"))
    if length > MAX_CMDLINE:
        raise ConfigError(f"{where}: {length} bytes long (at most {MAX_CMDLINE})")
    return cmdline


def _check_serial(value: object, where: str, base: Path | None) -> str:
    spec = _check_str(value, where)
    if spec in ("stdout", "null"):
        return spec
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("file", "unix"):
        raise ConfigError(f"{where}: bad serial {_quote(spec)} ({_SERIAL_HINT})")
    if not path:
        raise ConfigError(f"{where}: {_quote(spec)} needs a path after {kind}:")
    if "\0" in path:
        raise ConfigError(f"{where}: the path in {_quote(spec)} contains a NUL character")
    if base is not None and not os.path.isabs(path):
        path = str(base / path)
    if kind == "unix" and len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError(
            f"{where}: socket path {path} is {len(os.fsencode(path))} bytes long "
            f"(Unix sockets allow at most {MAX_UNIX_PATH})"
        )
    return f"{kind}:{path}"


def _check_image(value: object, where: str, base: Path | None) -> Path:
    shown = _check_str(value, where)
    if not shown or "\0" in shown:
        raise ConfigError(f"{where}: {_quote(shown)} is not a valid path")
    path = Path(shown).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        if not path.exists():
            raise ConfigError(f"{where}: {shown} does not exist")
        if not path.is_file():
            raise ConfigError(f"{where}: {shown} is not a regular file")
        with path.open("rb") as f:
            magic = f.read(len(_ELF_MAGIC))
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {shown}: {e.strerror or e}") from None
    if magic != _ELF_MAGIC:
        raise ConfigError(f"{where}: {shown} is not an ELF image")
    return path


# ---------------------------------------------------------------------- entry points


def load_config(path: Path) -> SystemConfig:
    """Read and validate a system TOML file; raise ConfigError naming the file and key."""
    path = Path(path)
    fname = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{fname}: cannot read: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{fname}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{fname}: TOML syntax error: {e}") from None

    for key in doc:
        if key not in _TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{fname}: unknown key {_quote(key)} (known: {', '.join(_TOP_LEVEL_KEYS)})"
            )
    tables = doc.get("partitions")
    if tables is None:
        raise ConfigError(f"{fname}: no partitions (add a [partitions.NAME] table)")
    if not isinstance(tables, dict):
        raise ConfigError(f"{fname}: partitions: expected a table, got {_type_name(tables)}")
    if not tables:
        raise ConfigError(f"{fname}: partitions: no partitions (add a [partitions.NAME] table)")

    base = path.parent.resolve()
    partitions = []
    for name, table in tables.items():
        shown = name if _NAME_RE.fullmatch(name) else _quote(name)
        where = f"{fname}: partitions.{shown}"
        _check_name(name, where)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {_type_name(table)}")
        partitions.append(_partition_from_table(name, table, where, base))
    return SystemConfig(partitions=tuple(partitions), source=path)


def _partition_from_table(
    name: str, table: dict[str, object], where: str, base: Path
) -> PartitionConfig:
    for key in table:
        if key not in _PARTITION_KEYS:
            raise ConfigError(
                f"{where}: unknown key {_quote(key)} (known: {', '.join(_PARTITION_KEYS)})"
            )
    if "image" not in table:
        raise ConfigError(f'{where}: missing key "image" (the guest ELF to boot)')
    image = _check_image(table["image"], f"{where}.image", base)
    cpus = _check_cpus(table.get("cpus", 1), f"{where}.cpus")
    memory = _check_memory(table.get("memory", 64 << 20), f"{where}.memory")
    pin: tuple[int, ...] = ()
    if "pin" in table:
        pin = _check_pin(_pin_from_toml(table["pin"], f"{where}.pin"), cpus, f"{where}.pin")
    cmdline = _check_cmdline(table.get("cmdline", ""), f"{where}.cmdline")
    serial = _check_serial(table.get("serial", "stdout"), f"{where}.serial", base)
    return PartitionConfig(
        name=name, image=image, cpus=cpus, memory=memory, pin=pin, cmdline=cmdline, serial=serial
    )


def _name_from_image(image: str) -> str:
    """A valid partition name derived from an image file name (hello.elf -> hello)."""
    stem = re.sub(r"[^a-z0-9_-]+", "-", Path(image).stem.lower()).strip("-_")
    if not stem or not stem[0].isalpha():
        stem = "vm-" + stem if stem else "vm"
    return stem[:32].rstrip("-_") or "vm"


def partition_from_args(
    image: str,
    *,
    cpus: int = 1,
    memory: str = "64M",
    pin: str | None = None,
    cmdline: str = "",
    serial: str = "stdout",
    name: str | None = None,
) -> PartitionConfig:
    """Build one partition from `corevisor run` options; errors name the option (--memory)."""
    part_name = _check_name(name, "--name") if name is not None else _name_from_image(image)
    image_path = _check_image(image, "image", None)
    vcpus = _check_cpus(cpus, "--cpus")
    size = _check_memory(memory, "--memory")
    cores = _check_pin(parse_cpu_list(pin, "--pin"), vcpus, "--pin") if pin else ()
    return PartitionConfig(
        name=part_name,
        image=image_path,
        cpus=vcpus,
        memory=size,
        pin=cores,
        cmdline=_check_cmdline(cmdline, "--cmdline"),
        serial=_check_serial(serial, "--serial", None),
    )
