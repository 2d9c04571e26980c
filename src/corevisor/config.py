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
    initrd = "initramfs.cpio"           # optional: for a Linux image (bzImage or vmlinux)
    serial = "stdout"                   # "stdout" | "file:PATH" | "unix:PATH" | "null"
    dedicated = false                   # true: owns its pinned cores (no other partition on them)
    exits = "normal"                    # dedicated only: "halt-poll" | "disabled" (HLT/PAUSE)
    halt_poll_ns = 200000               # with exits = "halt-poll": how long KVM polls a halted vCPU
    restart = "stop"                    # on a crash: "stop" | "restart" | "halt-system"
    watchdog_ms = 0                     # > 0: armed at boot; the guest kicks it (HC_WATCHDOG)
    gdb = "127.0.0.1:1234"              # optional: serve GDB there, halted until it continues;
                                        # not loopback only with --gdb-allow-remote
    blk = [{path = "disk.img", readonly = false}]  # virtio devices (virtio/config.py)
    net = [{tap = "tap0"}]
    rng = true
    virtio_console = true

    [channels.NAME]                     # shared memory between two partitions (channel.py)
    between = ["a", "b"]
    size = "4K"                         # a multiple of 4K
    gpa = 0xD0000000                    # optional: default from 0xD0000000 up, in config order
    direction = "a->b"                  # optional: one-way; b maps it read-only

    [system]
    log_dir = "logs"                    # per-partition serial logs (default: a new temp dir)

The checks that need the whole file (dedicated cores shared, total memory, channel
endpoints and addresses, at most 8 channels per partition) run after every partition
parsed, and still name the file and the key.

Relative ``file:`` and ``unix:`` serial paths in a file are resolved against the file's
directory, like ``image``, so a configuration means the same from any working directory;
on the command line they stay relative to the working directory.

The image check is shallow on purpose (exists, regular file, ELF or bzImage magic):
parsing it is the loader's job. What does not live here: opening serial backends (console.py) and
turning a config into a machine (builder.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corevisor import inputs
from corevisor.arch.x86_64 import layout
from corevisor.errors import ConfigError
from corevisor.virtio.config import VIRTIO_KEYS, VirtioConfig, virtio_from_args, virtio_from_table

__all__ = [
    "PartitionConfig",
    "ChannelConfig",
    "SystemConfig",
    "parse_size",
    "parse_host_port",
    "parse_cpu_list",
    "format_size",
    "format_cpu_list",
    "load_config",
    "partition_from_args",
    "MAX_VCPUS",
    "MIN_MEMORY",
    "MAX_MEMORY",
    "MAX_CMDLINE",
    "MAX_CHANNELS",
    "EXIT_MODES",
    "RESTART_POLICIES",
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

# Channel doorbells raise GSIs 16..23 (the IOAPIC pins above the ISA ones), one per channel.
MAX_CHANNELS = 8
MAX_CHANNEL_SIZE = 1 << 30
PAGE = 4 << 10
EXIT_MODES = ("normal", "halt-poll", "disabled")
RESTART_POLICIES = ("stop", "restart", "halt-system")
DEFAULT_HALT_POLL_NS = 200_000  # Linux's own default for halt_poll_ns
MAX_HALT_POLL_NS = 1_000_000_000
MAX_WATCHDOG_MS = 3_600_000

_PARTITION_KEYS = (
    "cpus",
    "image",
    "memory",
    "pin",
    "cmdline",
    "serial",
    "dedicated",
    "exits",
    "halt_poll_ns",
    "restart",
    "watchdog_ms",
    "initrd",
    "gdb",
    *VIRTIO_KEYS,  # blk, net, rng, virtio_console: virtio/config.py
)
_CHANNEL_KEYS = ("between", "size", "gpa", "direction", "doorbell")
# How a ring reaches the peer: "kernel" (ioeventfd -> irqfd, no userspace) or "thread"
# (the same eventfds relayed by a Python thread: the baseline the kernel path is measured
# against, kept usable so the comparison can be rerun on any host).
DOORBELL_PATHS = ("kernel", "thread")
_SYSTEM_KEYS = ("log_dir",)
_TOP_LEVEL_KEYS = ("partitions", "channels", "system")
_DUPLICATE_RE = re.compile(r"Cannot declare \(([^)]*)\) twice \(at line (\d+)")
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
    dedicated: bool = False
    exits: str = "normal"
    halt_poll_ns: int = DEFAULT_HALT_POLL_NS
    restart: str = "stop"
    watchdog_ms: int = 0
    initrd: Path | None = None  # an initramfs for a Linux image (loader/initrd.py)
    gdb: str | None = None  # HOST:PORT of a GDB stub for this partition (gdb/server.py)
    gdb_attach: bool = False  # run at once, stop when GDB connects (else halted at start)
    virtio: VirtioConfig = VirtioConfig()  # paravirtual devices (virtio/config.py)

    def vcpu_cores(self) -> tuple[int, ...]:
        """The host core of each vCPU, in vCPU order (empty if the partition is not pinned)."""
        if not self.pin:
            return ()
        return self.pin if len(self.pin) == self.cpus else self.pin * self.cpus


@dataclass(frozen=True)
class ChannelConfig:
    """Shared memory between two partitions, at the same guest-physical address in both.

    ``writer``/``reader`` are set for a one-way channel (the reader maps it read-only);
    both None means either side may write and ring the other.
    """

    name: str
    between: tuple[str, str]
    size: int
    gpa: int
    writer: str | None = None
    reader: str | None = None
    doorbell: str = "kernel"


@dataclass(frozen=True)
class SystemConfig:
    """A whole system: the partitions, the channels between them, where serial logs go,
    and the file it came from (None for CLI runs)."""

    partitions: tuple[PartitionConfig, ...]
    source: Path | None = None
    channels: tuple[ChannelConfig, ...] = ()
    log_dir: Path | None = None


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


def _meminfo(field: str) -> int | None:
    """One /proc/meminfo field in bytes, or None if it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _host_memory() -> int | None:
    """MemTotal in bytes: no single partition can be bigger than the host."""
    return _meminfo("MemTotal")


def _host_available_memory() -> tuple[str, int] | None:
    """What the host can give a whole system: MemAvailable, else MemTotal (old kernels)."""
    for field in ("MemAvailable", "MemTotal"):
        value = _meminfo(field)
        if value is not None:
            return field, value
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


def parse_host_port(text: str) -> tuple[str, int]:
    """HOST:PORT ([HOST]:PORT for IPv6) -> (host, port); host is an IP or localhost.

    Raises ValueError saying what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{_quote(text)} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port {_quote(port_text)} in {_quote(text)} (use 1-65535)")
    if host != "localhost":
        import ipaddress  # only GDB addresses need it; start-up time is benchmarked

        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{_quote(host)} is not an IP address or localhost") from None
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(host).is_loopback


def _check_gdb(value: object, where: str, allow_remote: bool) -> str:
    """A GDB stub address: loopback unless the user explicitly allowed the network."""
    text = _check_str(value, where)
    try:
        host, _ = parse_host_port(text)
    except ValueError as e:
        hint = "" if "(use" in str(e) else " (use e.g. 127.0.0.1:1234)"
        raise ConfigError(f"{where}: {e}{hint}") from None
    if not allow_remote and host != "localhost" and not _is_loopback(host):
        raise ConfigError(
            f"{where}: {host} is not a loopback address and whoever reaches it controls the "
            "guest; pass --gdb-allow-remote to serve GDB on the network"
        )
    return text


def _config_path(value: object, where: str, base: Path | None) -> tuple[Path, str]:
    """A path from the config (relative to the config file's directory) and its text."""
    shown = _check_str(value, where)
    if not shown or "\0" in shown:
        raise ConfigError(f"{where}: {_quote(shown)} is not a valid path")
    path = Path(shown).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return path, shown


def _check_image(value: object, where: str, base: Path | None) -> Path:
    path, shown = _config_path(value, where, base)
    head = inputs.read_head(path, f"{where}: {shown}", 0x206)
    # A Linux bzImage has no ELF magic: its setup header's "HdrS" is at 0x202.
    if head[: len(_ELF_MAGIC)] != _ELF_MAGIC and head[0x202:0x206] != b"HdrS":
        raise ConfigError(f"{where}: {shown} is not an ELF image or a Linux bzImage")
    return path


def _check_initrd(value: object, where: str, base: Path | None) -> Path:
    path, shown = _config_path(value, where, base)
    inputs.stat_file(path, f"{where}: {shown}")
    return path


# ---------------------------------------------------------------------- entry points


def load_config(path: Path, *, gdb_allow_remote: bool = False) -> SystemConfig:
    """Read and validate a system TOML file; raise ConfigError naming the file and key.

    gdb_allow_remote permits non-loopback gdb addresses (--gdb-allow-remote).
    """
    import tomllib  # only system files need the TOML parser; start-up time is benchmarked

    path = Path(path)
    fname = str(path)
    raw = inputs.read_file(path, fname, limit=inputs.MAX_SYSTEM_FILE, why="a system file can be")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{fname}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        dup = _DUPLICATE_RE.search(str(e))
        if dup is not None:
            key = ".".join(k.strip().strip("'\"") for k in dup.group(1).split(","))
            raise ConfigError(
                f"{fname}: {key}: declared twice (line {dup.group(2)}); names must be unique"
            ) from None
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
        partitions.append(
            _partition_from_table(name, table, where, base, gdb_allow_remote=gdb_allow_remote)
        )
    _check_dedicated_cores(partitions, fname)
    channels = _channels_from_doc(doc.get("channels", {}), partitions, fname)
    _check_total_memory(partitions, channels, fname)
    log_dir = _system_from_doc(doc.get("system", {}), fname, base)
    return SystemConfig(
        partitions=tuple(partitions), source=path, channels=channels, log_dir=log_dir
    )


def _partition_from_table(
    name: str,
    table: dict[str, object],
    where: str,
    base: Path,
    *,
    gdb_allow_remote: bool = False,
) -> PartitionConfig:
    for key in table:
        if key not in _PARTITION_KEYS:
            raise ConfigError(
                f"{where}: unknown key {_quote(key)} (known: {', '.join(_PARTITION_KEYS)})"
            )
    if "image" not in table:
        raise ConfigError(f'{where}: missing key "image" (the guest ELF to boot)')
    image = _check_image(table["image"], f"{where}.image", base)
    initrd = None
    if "initrd" in table:
        initrd = _check_initrd(table["initrd"], f"{where}.initrd", base)
    cpus = _check_cpus(table.get("cpus", 1), f"{where}.cpus")
    memory = _check_memory(table.get("memory", 64 << 20), f"{where}.memory")
    pin: tuple[int, ...] = ()
    if "pin" in table:
        pin = _check_pin(_pin_from_toml(table["pin"], f"{where}.pin"), cpus, f"{where}.pin")
    cmdline = _check_cmdline(table.get("cmdline", ""), f"{where}.cmdline")
    serial = _check_serial(table.get("serial", "stdout"), f"{where}.serial", base)
    dedicated = _check_bool(table.get("dedicated", False), f"{where}.dedicated")
    if dedicated and not pin:
        raise ConfigError(f"{where}.dedicated: a dedicated partition needs pin (its host cores)")
    exits = _check_choice(table.get("exits", "normal"), EXIT_MODES, f"{where}.exits")
    if exits != "normal" and not dedicated:
        # A vCPU that polls or never leaves the guest on HLT burns its core: only a
        # partition that owns its cores may do that to them.
        raise ConfigError(f'{where}.exits: "{exits}" needs dedicated = true')
    halt_poll_ns = _check_range(
        table.get("halt_poll_ns", DEFAULT_HALT_POLL_NS),
        0,
        MAX_HALT_POLL_NS,
        f"{where}.halt_poll_ns",
    )
    restart = _check_choice(table.get("restart", "stop"), RESTART_POLICIES, f"{where}.restart")
    watchdog_ms = _check_range(
        table.get("watchdog_ms", 0), 0, MAX_WATCHDOG_MS, f"{where}.watchdog_ms"
    )
    return PartitionConfig(
        name=name,
        image=image,
        cpus=cpus,
        memory=memory,
        pin=pin,
        cmdline=cmdline,
        serial=serial,
        dedicated=dedicated,
        exits=exits,
        halt_poll_ns=halt_poll_ns,
        restart=restart,
        watchdog_ms=watchdog_ms,
        initrd=initrd,
        gdb=_check_gdb(table["gdb"], f"{where}.gdb", gdb_allow_remote) if "gdb" in table else None,
        virtio=virtio_from_table(table, where, base),
    )


def _check_bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{where}: expected true or false, got {_type_name(value)} {_quote(value)}"
        )
    return value


def _check_choice(value: object, choices: tuple[str, ...], where: str) -> str:
    text = _check_str(value, where)
    if text not in choices:
        known = " | ".join(f'"{c}"' for c in choices)
        raise ConfigError(f"{where}: {_quote(text)} is not one of {known}")
    return text


def _check_range(value: object, low: int, high: int, where: str) -> int:
    number = _check_int(value, where)
    if not low <= number <= high:
        raise ConfigError(f"{where}: {number} is out of range ({low}..{high})")
    return number


# ---------------------------------------------------------------------- whole-system checks


def _check_dedicated_cores(partitions: list[PartitionConfig], fname: str) -> None:
    """A dedicated partition's cores belong to it alone (other partitions' vCPUs included)."""
    for p in partitions:
        if not p.dedicated:
            continue
        for q in partitions:
            if q is p:
                continue
            shared = set(p.vcpu_cores()) & set(q.vcpu_cores())
            if shared:
                raise ConfigError(
                    f"{fname}: partitions.{p.name}.pin: host core "
                    f"{format_cpu_list(shared)} is dedicated to {p.name} "
                    f"but partition {q.name} is pinned there too"
                )


def _check_total_memory(
    partitions: list[PartitionConfig], channels: tuple[ChannelConfig, ...], fname: str
) -> None:
    host = _host_available_memory()
    if host is None:
        return
    field, available = host
    total = sum(p.memory for p in partitions) + sum(c.size for c in channels)
    if total > available:
        raise ConfigError(
            f"{fname}: partitions: total guest memory {format_size(total)} is more than "
            f"this host can give ({field} {format_size(available)})"
        )


def _system_from_doc(table: object, fname: str, base: Path) -> Path | None:
    where = f"{fname}: system"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {_type_name(table)}")
    for key in table:
        if key not in _SYSTEM_KEYS:
            raise ConfigError(
                f"{where}: unknown key {_quote(key)} (known: {', '.join(_SYSTEM_KEYS)})"
            )
    if "log_dir" not in table:
        return None
    shown = _check_str(table["log_dir"], f"{where}.log_dir")
    if not shown or "\0" in shown:
        raise ConfigError(f"{where}.log_dir: {_quote(shown)} is not a valid path")
    path = Path(shown).expanduser()
    path = path if path.is_absolute() else base / path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}.log_dir: {shown} exists and is not a directory")
    return path


def _channels_from_doc(
    tables: object, partitions: list[PartitionConfig], fname: str
) -> tuple[ChannelConfig, ...]:
    """Parse [channels.*], then place every channel without a gpa, in config order."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{fname}: channels: expected a table, got {_type_name(tables)}")
    by_name = {p.name: p for p in partitions}
    parsed: list[tuple[str, tuple[str, str], int, int | None, tuple[str, str] | None, str]] = []
    count: dict[str, int] = dict.fromkeys(by_name, 0)
    for name, table in tables.items():
        shown = name if _NAME_RE.fullmatch(name) else _quote(name)
        where = f"{fname}: channels.{shown}"
        if _NAME_RE.fullmatch(name) is None:
            raise ConfigError(
                f"{where}: bad channel name {_quote(name)} (use [a-z][a-z0-9_-]{{0,31}})"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {_type_name(table)}")
        for key in table:
            if key not in _CHANNEL_KEYS:
                raise ConfigError(
                    f"{where}: unknown key {_quote(key)} (known: {', '.join(_CHANNEL_KEYS)})"
                )
        between = _check_between(table.get("between"), by_name, f"{where}.between")
        size = parse_size(table.get("size", PAGE), f"{where}.size")
        if size == 0 or size % PAGE or size > MAX_CHANNEL_SIZE:
            raise ConfigError(
                f"{where}.size: {format_size(size)} must be a non-zero multiple of 4K "
                f"up to {format_size(MAX_CHANNEL_SIZE)}"
            )
        gpa: int | None = None
        if "gpa" in table:
            gpa = _check_int(table["gpa"], f"{where}.gpa")
            if gpa < 0 or gpa % PAGE:
                raise ConfigError(f"{where}.gpa: {gpa:#x} is not a 4K-aligned address")
        direction = None
        if "direction" in table:
            direction = _check_direction(table["direction"], between, f"{where}.direction")
        doorbell = table.get("doorbell", "kernel")
        if doorbell not in DOORBELL_PATHS:
            raise ConfigError(
                f"{where}.doorbell: {_quote(doorbell)} is not one of {', '.join(DOORBELL_PATHS)}"
            )
        for end in between:
            count[end] += 1
            if count[end] > MAX_CHANNELS:
                raise ConfigError(
                    f"{where}: partition {end} has more than {MAX_CHANNELS} channels "
                    f"(their doorbells use GSIs 16..{15 + MAX_CHANNELS})"
                )
        parsed.append((name, between, size, gpa, direction, doorbell))

    taken: list[tuple[int, int, str]] = []  # (start, end, what) already claimed
    for name, between, size, gpa, _, _ in parsed:
        if gpa is not None:
            _check_channel_place(
                gpa, size, between, by_name, taken, f"{fname}: channels.{name}.gpa"
            )
            taken.append((gpa, gpa + size, f"channel {name}"))
    channels = []
    for name, between, size, gpa, direction, doorbell in parsed:
        if gpa is None:
            gpa = _place_channel(size, between, by_name, taken)
            if gpa is None:
                raise ConfigError(
                    f"{fname}: channels.{name}: no free guest-physical space for "
                    f"{format_size(size)} below {layout.CHANNEL_AREA_END:#x} (give a gpa)"
                )
            taken.append((gpa, gpa + size, f"channel {name}"))
        writer, reader = direction if direction is not None else (None, None)
        channels.append(ChannelConfig(name, between, size, gpa, writer, reader, doorbell))
    return tuple(channels)


def _check_between(
    value: object, by_name: dict[str, PartitionConfig], where: str
) -> tuple[str, str]:
    if value is None:
        raise ConfigError(f'{where}: missing (e.g. between = ["a", "b"])')
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected two partition names, got {_quote(value)}")
    a, b = value
    for end in (a, b):
        if end not in by_name:
            raise ConfigError(
                f"{where}: unknown partition {_quote(end)} (known: {', '.join(by_name)})"
            )
    if a == b:
        raise ConfigError(f"{where}: a channel joins two different partitions, not {a} and {a}")
    return a, b


def _check_direction(value: object, between: tuple[str, str], where: str) -> tuple[str, str]:
    text = _check_str(value, where)
    writer, sep, reader = (part.strip() for part in text.partition("->"))
    if not sep or {writer, reader} != set(between):
        a, b = between
        raise ConfigError(f'{where}: {_quote(text)} is not "{a}->{b}" or "{b}->{a}"')
    return writer, reader


def _reserved(
    between: tuple[str, str], by_name: dict[str, PartitionConfig]
) -> list[tuple[int, int, str]]:
    """Guest-physical ranges a channel must stay out of: both sides' RAM, fixed MMIO."""
    out = [(start, end, what) for start, end, what in layout.FIXED_MMIO]
    for end_name in between:
        for gpa, size in layout.ram_layout(by_name[end_name].memory):
            out.append((gpa, gpa + size, f"partition {end_name}'s RAM"))
    return out


def _check_channel_place(
    gpa: int,
    size: int,
    between: tuple[str, str],
    by_name: dict[str, PartitionConfig],
    taken: list[tuple[int, int, str]],
    where: str,
) -> None:
    if gpa + size > layout.MAX_GPA:
        raise ConfigError(f"{where}: {gpa:#x}+{format_size(size)} is beyond {layout.MAX_GPA:#x}")
    for start, end, what in _reserved(between, by_name) + taken:
        if gpa < end and start < gpa + size:
            raise ConfigError(
                f"{where}: {gpa:#x}+{format_size(size)} overlaps {what} ({start:#x}-{end:#x})"
            )


def _place_channel(
    size: int,
    between: tuple[str, str],
    by_name: dict[str, PartitionConfig],
    taken: list[tuple[int, int, str]],
) -> int | None:
    """The lowest page from CHANNEL_AREA_START up where size bytes fit, or None."""
    blocked = sorted(_reserved(between, by_name) + taken)
    gpa = layout.CHANNEL_AREA_START
    moved = True
    while moved:
        moved = False
        for start, end, _ in blocked:
            if gpa < end and start < gpa + size:
                gpa = (end + PAGE - 1) // PAGE * PAGE
                moved = True
    return gpa if gpa + size <= layout.CHANNEL_AREA_END else None


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
    initrd: str | None = None,
    gdb: str | None = None,
    gdb_attach: bool = False,
    gdb_allow_remote: bool = False,
    disks: list[str] | None = None,
    nets: list[str] | None = None,
    rng: bool = False,
) -> PartitionConfig:
    """Build one partition from `corevisor run` options; errors name the option (--memory)."""
    part_name = _check_name(name, "--name") if name is not None else _name_from_image(image)
    image_path = _check_image(image, "image", None)
    vcpus = _check_cpus(cpus, "--cpus")
    size = _check_memory(memory, "--memory")
    cores = _check_pin(parse_cpu_list(pin, "--pin"), vcpus, "--pin") if pin is not None else ()
    return PartitionConfig(
        name=part_name,
        image=image_path,
        cpus=vcpus,
        memory=size,
        pin=cores,
        cmdline=_check_cmdline(cmdline, "--cmdline"),
        serial=_check_serial(serial, "--serial", None),
        initrd=_check_initrd(initrd, "--initrd", None) if initrd is not None else None,
        gdb=_check_gdb(gdb, "--gdb", gdb_allow_remote) if gdb is not None else None,
        gdb_attach=gdb_attach,
        virtio=virtio_from_args(disks, nets, rng),
    )
