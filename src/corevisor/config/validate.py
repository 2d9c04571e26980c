"""Pure validation of a spec: the same checks for a system file, a `corevisor run` and one
partition added to a running system.

Nothing here reads the host or the file system: the host comes in as a HostFacts value
(config/host.py), and the names of keys in messages come in as Keys — ``system.toml:
partitions.demo.memory`` for a file, ``--memory`` for the command line, ``partitions.
demo.memory`` for the API — so one check gives each way in its own wording::

    system.toml: partitions.demo.cpus: 300 is more than the 64 vCPUs corevisor allows
    --cpus: 300 is more than the 64 vCPUs corevisor allows

validate_system checks each partition, then what needs them all: unique names, dedicated
cores, channel endpoints and addresses (placed in both partitions' resource maps,
resources.py), total memory, and that no two partitions listen on the same unix:
socket or GDB port. It returns the spec with every channel placed. validate_addition
checks one new partition (and its channels) against the partitions already running.

What does not live here: reading documents and their types (toml.py, args.py), files
(files.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

from corevisor.arch.x86_64 import layout
from corevisor.config.host import HostFacts
from corevisor.config.parse import format_cpu_list, format_size
from corevisor.errors import ConfigError, quote, show
from corevisor.resources import (
    CHANNEL_GSIS,
    VIRTIO_GSIS,
    Resources,
    Space,
    claim_device,
    machine_map,
)
from corevisor.spec import (
    MAX_CHANNEL_SIZE,
    MAX_CHANNELS,
    MAX_CMDLINE,
    MAX_HALT_POLL_NS,
    MAX_MEMORY,
    MAX_UNIX_PATH,
    MAX_VCPUS,
    MAX_VIRTIO_DEVICES,
    MAX_WATCHDOG_MS,
    MEMORY_ALIGN,
    MIN_MEMORY,
    PAGE,
    ChannelSpec,
    DeviceSpace,
    ExitMode,
    PartitionSpec,
    SystemSpec,
    Transport,
)

__all__ = ["Keys", "CLI_KEYS", "API_KEYS", "validate_partition",
           "validate_system", "validate_addition"]

# What the `run` options are called, by spec key (args.py reads them).
_OPTIONS = {
    "image": "image",
    "name": "--name",
    "cpus": "--cpus",
    "memory": "--memory",
    "pin": "--pin",
    "cmdline": "--cmdline",
    "serial": "--serial",
    "initrd": "--initrd",
    "vfio": "--vfio",
    "modules": "--module",
    "gdb": "--gdb",
    "blk": "--disk",
    "net": "--net",
    "virtio": "--disk/--net/--rng",
    "devices": "--device",
    "transport": "--transport",
    "bios": "--bios",
}


class Keys:
    """How messages name a key: ``prefix`` (the file) plus its path in the document, or
    the command-line option that set it."""

    __slots__ = ("prefix", "options")

    def __init__(self, prefix: str = "", options: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix  # "system.toml: " for a file
        self.options = options  # spec key -> CLI option

    def of(self, partition: str, key: str | None = None) -> str:
        """A partition's key (or the partition itself): "FILE: partitions.NAME.KEY"."""
        if self.options is not None:
            return self.options.get(key or "name", key or "image")
        return f"{self.prefix}partitions.{partition}" + (f".{key}" if key else "")

    def top(self, path: str) -> str:
        """A key outside the partitions ("channels.c.gpa", "partitions", "system.log_dir")."""
        return f"{self.prefix}{path}"



CLI_KEYS = Keys(options=_OPTIONS)
API_KEYS = Keys()


# ---------------------------------------------------------------------- one partition


def validate_partition(
    p: PartitionSpec, keys: Keys, host: HostFacts, *, gdb_allow_remote: bool = False
) -> None:
    """Every check of one partition on its own; raise ConfigError naming the key."""
    _check_cpus(p, keys, host)
    _check_memory(p.memory, keys.of(p.name, "memory"), host)
    _check_pin(p, keys, host)
    _check_cmdline(p.cmdline, keys.of(p.name, "cmdline"))
    _check_serial(p, keys)
    if p.dedicated and not p.pin:
        raise ConfigError(
            f"{keys.of(p.name, 'dedicated')}: a dedicated partition needs pin (its host cores)"
        )
    if p.exits is not ExitMode.NORMAL and not p.dedicated:
        # A vCPU that polls or never leaves the guest on HLT burns its core: only a
        # partition that owns its cores may do that to them.
        raise ConfigError(f'{keys.of(p.name, "exits")}: "{p.exits}" needs dedicated = true')
    _check_range(p.halt_poll_ns, 0, MAX_HALT_POLL_NS, keys.of(p.name, "halt_poll_ns"))
    _check_range(p.watchdog_ms, 0, MAX_WATCHDOG_MS, keys.of(p.name, "watchdog_ms"))
    if p.gdb is not None and not gdb_allow_remote and not p.gdb.is_loopback:
        raise ConfigError(
            f"{keys.of(p.name, 'gdb')}: {p.gdb.host} is not a loopback address and whoever "
            "reaches it controls the guest; pass --gdb-allow-remote to serve GDB on the network"
        )
    if p.bios is not None and p.virtio.transport is not Transport.PCI:
        # SeaBIOS boots from virtio-blk-pci
        raise ConfigError(f'{keys.of(p.name, "transport")}: a partition with a bios has its '
                          f'devices on PCI (transport = "pci"), not "{p.virtio.transport}"')
    if p.virtio.count > MAX_VIRTIO_DEVICES:
        raise ConfigError(
            f"{keys.of(p.name, 'virtio') if keys.options else keys.of(p.name)}: "
            f"{p.virtio.count} virtio devices, at most {MAX_VIRTIO_DEVICES} "
            "(one interrupt line each)"
        )
    _check_devices(p, keys)


def _device_key(p: PartitionSpec, keys: Keys, index: int) -> str:
    """How messages name a partition's device: its table, or --device."""
    return keys.of(p.name, "devices") if keys.options else keys.of(p.name, f"devices[{index}]")


def partition_map(p: PartitionSpec, keys: Keys = API_KEYS) -> Resources:
    """p's resource map with its user devices in it (what its channels must avoid)."""
    res = machine_map(p.name, p.memory, p.pci)
    for i, d in enumerate(p.devices):
        claim_device(res, d, _device_key(p, keys, i))
    return res


def _check_devices(p: PartitionSpec, keys: Keys) -> None:
    """User devices: unique names, ranges and lines clear of the machine's fixed devices
    and of each other, and lines left for the virtio devices."""
    names: dict[str, int] = {}
    for i, d in enumerate(p.devices):
        if d.name in names:
            first = "another --device" if keys.options else f"devices[{names[d.name]}]"
            raise ConfigError(
                f"{_device_key(p, keys, i)}: a device named {d.name} already exists "
                f"({first}): give one a name"
            )
        names[d.name] = i
        if d.space is DeviceSpace.PCI and not p.pci:
            raise ConfigError(
                f"{_device_key(p, keys, i)}: device {d.name} is a PCI function, but partition "
                f'{p.name} has no PCI bus (give it transport = "pci" or a bios)'
            )
    partition_map(p, keys)
    lines = {d.gsi for d in p.devices if d.gsi is not None}
    # (virtio-pci devices interrupt through MSI-X and PCI's own INTx lines, not these)
    mmio = p.virtio.transport is Transport.MMIO
    if lines and mmio and p.virtio.count > len(VIRTIO_GSIS) - len(lines):
        raise ConfigError(
            f"{keys.of(p.name, 'virtio') if keys.options else keys.of(p.name)}: "
            f"{p.virtio.count} virtio devices and {len(lines)} device lines, but only "
            f"{len(VIRTIO_GSIS)} free interrupt lines"
        )


def _check_cpus(p: PartitionSpec, keys: Keys, host: HostFacts) -> None:
    where = keys.of(p.name, "cpus")
    if p.cpus > MAX_VCPUS:
        raise ConfigError(f"{where}: {p.cpus} is more than the {MAX_VCPUS} vCPUs corevisor allows")
    if p.cpus < 1:
        raise ConfigError(f"{where}: {p.cpus} vCPUs (a partition needs at least 1)")
    if host.max_vcpus is not None and p.cpus > host.max_vcpus:
        raise ConfigError(
            f"{where}: {p.cpus} vCPUs, but this host's KVM allows {host.max_vcpus}"
        )


def _check_memory(size: int, where: str, host: HostFacts) -> None:
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
    if host.mem_total is not None and size > host.mem_total:
        raise ConfigError(
            f"{where}: {format_size(size)} is more than this host's RAM "
            f"({format_size(host.mem_total)})"
        )


def _check_pin(p: PartitionSpec, keys: Keys, host: HostFacts) -> None:
    where = keys.of(p.name, "pin")
    if p.pin and len(p.pin) not in (1, p.cpus):
        raise ConfigError(
            f"{where}: {len(p.pin)} cores for {p.cpus} vCPUs "
            "(give one core for all vCPUs, or exactly one per vCPU)"
        )
    existing = range(host.cores)
    for core in p.pin:
        if core not in existing:
            raise ConfigError(
                f"{where}: host core {core} does not exist "
                f"(this host has cores {format_cpu_list(existing)})"
            )
        if core not in host.affinity:
            raise ConfigError(
                f"{where}: host core {core} is not available to corevisor "
                f"(its CPU affinity allows cores {format_cpu_list(host.affinity)})"
            )


def _check_cmdline(cmdline: str, where: str) -> None:
    if "\0" in cmdline:
        raise ConfigError(f"{where}: contains a NUL character")
    try:
        length = len(cmdline.encode("utf-8"))
    except UnicodeEncodeError as e:
        # A command-line argument that was not UTF-8 (Python keeps such bytes as lone
        # surrogates): the guest's command line is text, and so is the spec.
        raise ConfigError(
            f"{where}: not valid UTF-8 (at character {e.start}: {show(cmdline[e.start])})"
        ) from None
    if length > MAX_CMDLINE:
        raise ConfigError(f"{where}: {length} bytes long (at most {MAX_CMDLINE})")


def _check_serial(p: PartitionSpec, keys: Keys) -> None:
    path = p.unix_socket()
    if path is None:
        return
    length = len(os.fsencode(path))
    if length > MAX_UNIX_PATH:
        raise ConfigError(
            f"{keys.of(p.name, 'serial')}: socket path {show(path)} is {length} bytes long "
            f"(Unix sockets allow at most {MAX_UNIX_PATH})"
        )


def _check_range(number: int, low: int, high: int, where: str) -> None:
    if not low <= number <= high:
        raise ConfigError(f"{where}: {number} is out of range ({low}..{high})")


# ---------------------------------------------------------------------- a whole system


def validate_system(
    system: SystemSpec,
    keys: Keys,
    host: HostFacts,
    *,
    gdb_allow_remote: bool = False,
    running: SystemSpec | None = None,
) -> SystemSpec:
    """Check every partition and what needs them all; return it with channels placed.

    running: partitions (and channels) that already run; they are not checked again,
    but everything in system is checked against them, and only system's memory counts
    against what the host has available now (the running partitions already took theirs).
    """
    for p in system.partitions:
        validate_partition(p, keys, host, gdb_allow_remote=gdb_allow_remote)
    before = running.partitions if running is not None else ()
    everyone = (*before, *system.partitions)
    _check_names(system.partitions, before, keys)
    _check_dedicated_cores(everyone, keys)
    _check_listeners(everyone, keys)
    channels = _place_channels(
        system.channels, everyone, running.channels if running is not None else (), keys
    )
    _check_total_memory(system.partitions, channels, keys, host)
    return replace(system, channels=channels)


def validate_addition(
    new: PartitionSpec,
    running: SystemSpec,
    host: HostFacts,
    *,
    channels: Sequence[ChannelSpec] = (),
    keys: Keys = API_KEYS,
    gdb_allow_remote: bool = False,
) -> tuple[PartitionSpec, tuple[ChannelSpec, ...]]:
    """Check one partition to add to a running system (and its channels to running
    partitions); return it with its channels placed."""
    added = validate_system(
        SystemSpec((new,), channels=tuple(channels)),
        keys,
        host,
        gdb_allow_remote=gdb_allow_remote,
        running=running,
    )
    return new, added.channels


def _check_names(
    partitions: Sequence[PartitionSpec], running: Sequence[PartitionSpec], keys: Keys
) -> None:
    seen = {p.name for p in running}
    for p in partitions:
        if p.name in seen:
            raise ConfigError(f"{keys.of(p.name)}: a partition named {p.name} already exists")
        seen.add(p.name)


def _check_dedicated_cores(partitions: Sequence[PartitionSpec], keys: Keys) -> None:
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
                    f"{keys.of(p.name, 'pin')}: host core "
                    f"{format_cpu_list(shared)} is dedicated to {p.name} "
                    f"but partition {q.name} is pinned there too"
                )


def _check_listeners(partitions: Sequence[PartitionSpec], keys: Keys) -> None:
    """No two partitions listen on one unix: socket or one GDB port (the second would
    fail only once the run had started, or replace the first's socket)."""
    sockets: dict[str, str] = {}
    ports: dict[int, str] = {}
    for p in partitions:
        path = p.unix_socket()
        if path is not None:
            text = os.path.normpath(path)
            if text in sockets:
                raise ConfigError(
                    f"{keys.of(p.name, 'serial')}: unix:{show(path)} is already the serial "
                    f"socket of partition {sockets[text]} ({keys.of(sockets[text], 'serial')})"
                )
            sockets[text] = p.name
        if p.gdb is not None:
            if p.gdb.port in ports:
                other = ports[p.gdb.port]
                raise ConfigError(
                    f"{keys.of(p.name, 'gdb')}: port {p.gdb.port} is already the GDB port of "
                    f"partition {other} ({keys.of(other, 'gdb')})"
                )
            ports[p.gdb.port] = p.name


def _check_total_memory(
    partitions: Sequence[PartitionSpec],
    channels: Sequence[ChannelSpec],
    keys: Keys,
    host: HostFacts,
) -> None:
    available = host.available
    if available is None:
        return
    fact, limit = available
    total = sum(p.memory for p in partitions) + sum(c.size for c in channels)
    if total > limit:
        raise ConfigError(
            f"{keys.top('partitions')}: total guest memory {format_size(total)} is more than "
            f"this host can give ({fact} {format_size(limit)})"
        )


# ---------------------------------------------------------------------- channels


def _place_channels(
    channels: Sequence[ChannelSpec],
    partitions: Sequence[PartitionSpec],
    running: Sequence[ChannelSpec],
    keys: Keys,
) -> tuple[ChannelSpec, ...]:
    """Check each channel, then place those without a gpa, in order, in the resource maps
    of both its partitions (RAM, fixed MMIO, the channels each already has)."""
    by_name = {p.name: p for p in partitions}
    maps = {name: partition_map(p, keys) for name, p in by_name.items()}
    count = dict.fromkeys(by_name, 0)
    for c in running:
        for end in c.between:
            count[end] += 1
            maps[end].claim(Space.GPA, c.placed_gpa, c.size, f"channel {c.name}")
    for c in channels:
        _check_channel(c, by_name, count, keys)
    for c in channels:  # fixed addresses first: they cannot move out of the way
        if c.gpa is not None:
            where = keys.top(f"channels.{c.name}.gpa")
            if c.gpa + c.size > layout.MAX_GPA:
                raise ConfigError(
                    f"{where}: {c.gpa:#x}+{format_size(c.size)} is beyond {layout.MAX_GPA:#x}"
                )
            for end in c.between:
                maps[end].claim(Space.GPA, c.gpa, c.size, f"channel {c.name}", where=where)
    placed = []
    for c in channels:
        if c.gpa is None:
            a, b = c.between
            gpa = maps[a].allocate(
                Space.GPA,
                c.size,
                f"channel {c.name}",
                within=(layout.CHANNEL_AREA_START, layout.CHANNEL_AREA_END),
                align=PAGE,
                also=(maps[b],),
            )
            if gpa is None:
                raise ConfigError(
                    f"{keys.top(f'channels.{c.name}')}: no free guest-physical space for "
                    f"{format_size(c.size)} below {layout.CHANNEL_AREA_END:#x} (give a gpa)"
                )
            c = replace(c, gpa=gpa)
        placed.append(c)
    return tuple(placed)


def _check_channel(
    c: ChannelSpec, by_name: Mapping[str, PartitionSpec], count: dict[str, int], keys: Keys
) -> None:
    where = keys.top(f"channels.{c.name}")
    for end in c.between:
        if end not in by_name:
            raise ConfigError(
                f"{where}.between: unknown partition {quote(end)} "
                f"(known: {', '.join(by_name)})"
            )
    a, b = c.between
    if a == b:
        raise ConfigError(
            f"{where}.between: a channel joins two different partitions, not {a} and {a}"
        )
    if c.size == 0 or c.size % PAGE or c.size > MAX_CHANNEL_SIZE:
        raise ConfigError(
            f"{where}.size: {format_size(c.size)} must be a non-zero multiple of 4K "
            f"up to {format_size(MAX_CHANNEL_SIZE)}"
        )
    if c.gpa is not None and (c.gpa < 0 or c.gpa % PAGE):
        raise ConfigError(f"{where}.gpa: {c.gpa:#x} is not a 4K-aligned address")
    for end in c.between:
        count[end] += 1
        if count[end] > MAX_CHANNELS:
            raise ConfigError(
                f"{where}: partition {end} has more than {MAX_CHANNELS} channels "
                f"(their doorbells use GSIs {CHANNEL_GSIS[0]}..{CHANNEL_GSIS[-1]})"
            )

