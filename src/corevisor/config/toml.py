"""System files: a TOML file read into a SystemSpec, then validated (validate.py).

Every check a user can fail happens before any fd is opened, and fails with one
ConfigError line that names the file and the key, e.g.::

    system.toml: partitions.demo.cpus: 300 is more than the 64 vCPUs corevisor allows

The format (the keys are the spec's fields, spec.py; config/schema.py states it as a
JSON schema)::

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
    blk = [{path = "disk.img", readonly = false}]  # virtio devices (virtio/attach.py)
    net = [{tap = "tap0"}]
    rng = true
    virtio_console = true
    transport = "mmio"                  # or "pci": virtio-pci functions with MSI-X
    # bios = "/usr/share/seabios/bios-256k.bin"   instead of image: boot the first disk
    #                                     through SeaBIOS (transport "pci"; no initrd,
    #                                     modules or cmdline)
    vfio = ["0000:00:04.0"]             # host PCI devices bound to vfio-pci, passed through
                                        # under the IOMMU (vfio/, docs/pc-platform.md)

    [[partitions.demo.devices]]         # a device model written in Python (docs/devices.md)
    class = "sensor.py:TempSensor"      # or "package.module:Class"
    base = 0x700                        # optional: its ports or MMIO address (default: its REGION)
    gsi = 5                             # optional: its interrupt line (default: its IRQ);
                                        # a PCI function (REGION = Pci) has no base or gsi
    celsius = 21                        # anything else: its constructor's keyword arguments

    [channels.NAME]                     # shared memory between two partitions (channel.py)
    between = ["a", "b"]
    size = "4K"                         # a multiple of 4K
    gpa = 0xD0000000                    # optional: default from 0xD0000000 up, in config order
    direction = "a->b"                  # optional: one-way; b maps it read-only
    doorbell = "kernel"                 # or "thread": the relayed baseline (bench/partitions.py)

    [system]
    log_dir = "logs"                    # per-partition serial logs (default: a new temp dir)
    sandbox = true                      # every VMM thread under a seccomp filter (docs/sandbox.md)

Relative paths (image, initrd, bios, blk, ``file:`` and ``unix:`` serial paths, log_dir,
a device's FILE.py) are resolved against the file's directory, so a file means the same
from any working directory. A table from a JSON document has the same shape:
partition_from_table reads either (the API's body of a new partition).

What does not live here: the checks of values against each other and the host
(validate.py), the `run` options (args.py), opening anything (console.py, builder.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from corevisor import inputs
from corevisor.config import files
from corevisor.config.host import HostFacts, gather
from corevisor.config.parse import (
    NAME_RE,
    parse_cpu_list,
    parse_gdb,
    parse_path,
    parse_pci_address,
    parse_serial,
    parse_size,
    type_name,
)
from corevisor.config.validate import Keys, validate_system
from corevisor.errors import ConfigError, quote, show
from corevisor.spec import (
    NAME_PATTERN,
    BlkSpec,
    ChannelSpec,
    DeviceSpec,
    Doorbell,
    ExitMode,
    NetSpec,
    PartitionSpec,
    PciAddress,
    RestartPolicy,
    SystemSpec,
    Transport,
    VirtioSpec,
    document_keys,
)
from corevisor.virtio.config import check_image, check_tap

__all__ = [
    "load_config",
    "read_system",
    "read_system_file",
    "system_from_document",
    "partition_from_table",
    "channel_from_table",
    "TOP_LEVEL_KEYS",
    "SYSTEM_KEYS",
    "MAX_SYSTEM_FILE",
]

TOP_LEVEL_KEYS = ("partitions", "channels", "system")
SYSTEM_KEYS = ("log_dir", "sandbox")
PARTITION_KEYS = document_keys(PartitionSpec)
CHANNEL_KEYS = document_keys(ChannelSpec)
# A system file is a few KiB; anything near this is not one.
MAX_SYSTEM_FILE = 1 << 20
_DUPLICATE_RE = re.compile(r"Cannot declare \(([^)]*)\) twice \(at line (\d+)")


# ---------------------------------------------------------------------- the file


def load_config(
    path: Path, *, gdb_allow_remote: bool = False, host: HostFacts | None = None
) -> SystemSpec:
    """Read and validate a system TOML file; raise ConfigError naming the file and key.

    gdb_allow_remote permits non-loopback gdb addresses (--gdb-allow-remote); host is
    the host to check against (default: this one, now).
    """
    path = Path(path)
    return validate_system(
        read_system(path),
        Keys(prefix=f"{show(path)}: "),
        host if host is not None else gather(),
        gdb_allow_remote=gdb_allow_remote,
    )


def read_system(path: Path) -> SystemSpec:
    """A system file read into a spec, not yet validated (`corevisor ctl add` reads the
    file on its side and sends the spec; the daemon validates)."""
    path = Path(path)
    fname = show(path)
    doc = _parse_toml(read_system_file(path), fname)
    return system_from_document(doc, fname, path.parent.resolve(), source=path)


def read_system_file(path: Path) -> bytes:
    """The bytes of a system file: a regular file of at most inputs.MAX_SYSTEM_FILE."""
    return inputs.read_file(
        path, inputs.Named(show(path)), limit=inputs.MAX_SYSTEM_FILE, why="a system file can be"
    )


def _parse_toml(raw: bytes, fname: str) -> dict[str, Any]:
    import tomllib  # only system files need the TOML parser; start-up time is benchmarked

    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{fname}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively; no system file
        # nests more than a few levels.
        raise ConfigError(f"{fname}: values nested too deeply for a system file") from None
    except tomllib.TOMLDecodeError as e:
        dup = _DUPLICATE_RE.search(str(e))
        if dup is not None:
            key = ".".join(k.strip().strip("'\"") for k in dup.group(1).split(","))
            raise ConfigError(
                f"{fname}: {show(key)}: declared twice (line {dup.group(2)}); "
                "names must be unique"
            ) from None
        raise ConfigError(f"{fname}: TOML syntax error: {show(e)}") from None


def system_from_document(
    doc: dict[str, Any], fname: str, base: Path | None, source: Path | None = None
) -> SystemSpec:
    """A parsed document (TOML or JSON) -> an unvalidated SystemSpec; names the key.

    fname prefixes messages ("system.toml: partitions.x.memory: ..."); "" for a document
    that is not a file (the API's body: "partitions.x.memory: ...").
    """
    at = f"{fname}: " if fname else ""
    _check_keys(doc, TOP_LEVEL_KEYS, fname or "request body")
    tables = doc.get("partitions")
    if tables is None:
        raise ConfigError(f"{at}no partitions (add a [partitions.NAME] table)")
    if not isinstance(tables, dict):
        raise ConfigError(f"{at}partitions: expected a table, got {type_name(tables)}")
    if not tables:
        raise ConfigError(f"{at}partitions: no partitions (add a [partitions.NAME] table)")
    partitions = []
    for name, table in tables.items():
        where = f"{at}partitions.{_shown_name(name)}"
        partitions.append(partition_from_table(name, table, where, base))
    channel_tables = doc.get("channels", {})
    if not isinstance(channel_tables, dict):
        raise ConfigError(f"{at}channels: expected a table, got {type_name(channel_tables)}")
    channels = tuple(
        channel_from_table(name, table, f"{at}channels.{_shown_name(name)}")
        for name, table in channel_tables.items()
    )
    log_dir, sandbox = _system_table(doc.get("system", {}), f"{at}system", base)
    return SystemSpec(
        tuple(partitions), source=source, channels=channels, log_dir=log_dir, sandbox=sandbox
    )


def _shown_name(name: str) -> str:
    return name if NAME_RE.fullmatch(name) else quote(name)


def _check_keys(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {quote(key)} (known: {', '.join(known)})")


def _check_name(name: object, where: str, what: str = "partition") -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ConfigError(f"{where}: bad {what} name {quote(name)} (use {NAME_PATTERN})")
    return name


# ---------------------------------------------------------------------- values


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {type_name(value)} {quote(value)}")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type_name(value)} {quote(value)}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{where}: expected true or false, got {type_name(value)} {quote(value)}"
        )
    return value


_Choice = TypeVar("_Choice", ExitMode, RestartPolicy, Doorbell, Transport)


def _choice(value: object, kind: type[_Choice], where: str) -> _Choice:
    text = _str(value, where)
    try:
        return kind(text)
    except ValueError:
        known = " | ".join(f'"{c}"' for c in kind)
        raise ConfigError(f"{where}: {quote(text)} is not one of {known}") from None


def _pin(value: object, where: str) -> tuple[int, ...]:
    if isinstance(value, str):
        return parse_cpu_list(value, where)
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: expected an array of core numbers, got {type_name(value)} {quote(value)}"
        )
    cores: list[int] = []
    for i, item in enumerate(value):
        core = _int(item, f"{where}[{i}]")
        if core < 0:
            raise ConfigError(f"{where}[{i}]: host core {core} does not exist")
        cores.append(core)
    return tuple(cores)


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected an array of FILE[,STRING] strings")
    return [_str(item, f"{where}[{i}]") for i, item in enumerate(value)]


# What each partition key becomes: reader(value, where, base) -> the field's value.
_READERS: dict[str, Callable[[object, str, Path | None], Any]] = {
    "cpus": lambda v, w, b: _int(v, w),
    "memory": lambda v, w, b: parse_size(v, w),
    "pin": lambda v, w, b: _pin(v, w),
    "cmdline": lambda v, w, b: _str(v, w),
    "serial": lambda v, w, b: parse_serial(_str(v, w), w, b),
    "dedicated": lambda v, w, b: _bool(v, w),
    "exits": lambda v, w, b: _choice(v, ExitMode, w),
    "halt_poll_ns": lambda v, w, b: _int(v, w),
    "restart": lambda v, w, b: _choice(v, RestartPolicy, w),
    "watchdog_ms": lambda v, w, b: _int(v, w),
    "gdb": lambda v, w, b: parse_gdb(_str(v, w), w),
    "devices": lambda v, w, b: _devices(v, w, b),
    "vfio": lambda v, w, b: _pci_addresses(v, w),
}


def _pci_addresses(value: object, where: str) -> tuple[PciAddress, ...]:
    if not isinstance(value, list):
        raise ConfigError(f'{where}: expected an array of PCI addresses like ["0000:00:04.0"]')
    out: list[PciAddress] = []
    for i, item in enumerate(value):
        address = parse_pci_address(_str(item, f"{where}[{i}]"), f"{where}[{i}]")
        if address in out:
            raise ConfigError(f"{where}[{i}]: {address} is given twice")
        out.append(address)
    return tuple(out)


def partition_from_table(
    name: str, table: object, where: str, base: Path | None
) -> PartitionSpec:
    """One [partitions.NAME] table (or the API's JSON object) -> an unvalidated spec."""
    _check_name(name, where)
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type_name(table)}")
    _check_keys(table, PARTITION_KEYS, where)
    if "bios" in table:
        return _bios_partition(name, table, where, base)
    if "image" not in table:
        raise ConfigError(f'{where}: missing key "image" (the guest ELF to boot, or a bios)')
    values = {
        key: reader(table[key], f"{where}.{key}", base)
        for key, reader in _READERS.items()
        if key in table
    }
    shown = _str(table["image"], f"{where}.image")
    image = parse_path(shown, f"{where}.image", base)
    kind = files.check_guest_image(image, f"{where}.image", shown)
    initrd = _str(table["initrd"], f"{where}.initrd") if "initrd" in table else None
    modules = _strings(table["modules"], f"{where}.modules") if "modules" in table else []
    keys = (f"{where}.initrd", f"{where}.modules")
    initrd_path, module_specs = files.boot_files(kind, initrd, modules, keys, base)
    return PartitionSpec(
        name=name,
        image=image,
        initrd=initrd_path,
        modules=module_specs,
        virtio=_virtio(table, where, base),
        **values,
    )


# Keys that mean nothing to a machine booting through its BIOS: there is no kernel.
_NOT_WITH_BIOS = ("image", "initrd", "modules", "cmdline")


def _bios_partition(name: str, table: dict[str, Any], where: str, base: Path | None
                    ) -> PartitionSpec:
    """A partition that boots its disk through a BIOS (the bios key instead of an image)."""
    for key in _NOT_WITH_BIOS:
        if key in table:
            raise ConfigError(f"{where}.{key}: a partition with a bios boots from its disk, "
                              f"so it has no {key}")
    shown = _str(table["bios"], f"{where}.bios")
    bios = parse_path(shown, f"{where}.bios", base)
    files.check_bios(bios, f"{where}.bios", shown)
    values = {
        key: reader(table[key], f"{where}.{key}", base)
        for key, reader in _READERS.items()
        if key in table
    }
    virtio = _virtio(table, where, base, default=Transport.PCI)
    return PartitionSpec(name=name, bios=bios, virtio=virtio, **values)


def _devices(value: object, where: str, base: Path | None) -> tuple[DeviceSpec, ...]:
    """[[partitions.NAME.devices]]: user-written device models (userdev/load.py)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: expected an array of tables ([[partitions.NAME.devices]]), "
            f"got {type_name(value)}"
        )
    from corevisor.userdev.load import device_from_table  # only partitions with devices

    return tuple(device_from_table(t, f"{where}[{i}]", base) for i, t in enumerate(value))


# ---------------------------------------------------------------------- virtio keys


def _virtio(table: dict[str, object], where: str, base: Path | None,
            default: Transport = Transport.MMIO) -> VirtioSpec:
    """The virtio keys of one partition table (blk, net, rng, virtio_console, transport)."""
    blks: list[BlkSpec] = []
    for i, item in enumerate(_array(table, "blk", where, '{path = "disk.img"}')):
        w = f"{where}.blk[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f'{w}: expected a table like {{path = "disk.img"}}')
        _check_keys(item, ("path", "readonly"), w)
        path = item.get("path")
        if not isinstance(path, str):
            raise ConfigError(f"{w}.path: expected a string path to a raw disk image")
        readonly = _bool(item.get("readonly", False), f"{w}.readonly")
        disk = parse_path(path, f"{w}.path", base)
        check_image(disk, f"{w}.path", show(path))
        blks.append(BlkSpec(disk, readonly))
    nets: list[NetSpec] = []
    for i, item in enumerate(_array(table, "net", where, '{tap = "tap0"}')):
        w = f"{where}.net[{i}]"
        if not isinstance(item, dict) or set(item) != {"tap"}:
            raise ConfigError(f'{w}: expected a table with one key, like {{tap = "tap0"}}')
        nets.append(NetSpec(check_tap(item["tap"], f"{w}.tap")))
    rng = _bool(table.get("rng", False), f"{where}.rng")
    console = _bool(table.get("virtio_console", False), f"{where}.virtio_console")
    transport = default
    if "transport" in table:
        transport = _choice(table["transport"], Transport, f"{where}.transport")
    return VirtioSpec(tuple(blks), tuple(nets), rng, console, transport)


def _array(table: dict[str, object], key: str, where: str, example: str) -> list[object]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key}: expected an array of tables like {example}")
    return value



# ---------------------------------------------------------------------- channels, [system]


def channel_from_table(name: str, table: object, where: str) -> ChannelSpec:
    """One [channels.NAME] table -> an unvalidated ChannelSpec (gpa None: to be placed)."""
    _check_name(name, where, "channel")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type_name(table)}")
    _check_keys(table, CHANNEL_KEYS, where)
    between = _between(table.get("between"), f"{where}.between")
    size = parse_size(table.get("size", 4096), f"{where}.size")
    gpa = _int(table["gpa"], f"{where}.gpa") if "gpa" in table else None
    writer = reader = None
    if "direction" in table:
        writer, reader = _direction(table["direction"], between, f"{where}.direction")
    doorbell = _choice(table.get("doorbell", "kernel"), Doorbell, f"{where}.doorbell")
    return ChannelSpec(name, between, size, gpa, writer, reader, doorbell)


def _between(value: object, where: str) -> tuple[str, str]:
    if value is None:
        raise ConfigError(f'{where}: missing (e.g. between = ["a", "b"])')
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected two partition names, got {quote(value)}")
    return value[0], value[1]


def _direction(value: object, between: tuple[str, str], where: str) -> tuple[str, str]:
    text = _str(value, where)
    writer, sep, reader = (part.strip() for part in text.partition("->"))
    if not sep or {writer, reader} != set(between):
        a, b = between
        raise ConfigError(
            f'{where}: {quote(text)} is not "{show(a)}->{show(b)}" or "{show(b)}->{show(a)}"'
        )
    return writer, reader


def _system_table(
    table: object, where: str, base: Path | None
) -> tuple[Path | None, bool]:
    """The [system] table: (log_dir, sandbox)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type_name(table)}")
    _check_keys(table, SYSTEM_KEYS, where)
    sandbox = table.get("sandbox", True)
    if not isinstance(sandbox, bool):
        raise ConfigError(f"{where}.sandbox: expected true or false, got {type_name(sandbox)}")
    if "log_dir" not in table:
        return None, sandbox
    text = _str(table["log_dir"], f"{where}.log_dir")
    path = parse_path(text, f"{where}.log_dir", base)
    files.check_log_dir(path, f"{where}.log_dir", text)
    return path, sandbox
