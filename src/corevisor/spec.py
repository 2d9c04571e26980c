"""The typed spec of a system: frozen values, already parsed, that every way in produces.

A system file (config/toml.py), the `corevisor run` options (config/args.py) and, later,
a JSON body of the API all end here: a SystemSpec of PartitionSpecs and ChannelSpecs whose
fields hold parsed values — a SerialSpec instead of "file:PATH", a HostPort instead of
"HOST:PORT", enums instead of choice strings, sizes as ints, paths as Paths — so nothing
downstream (builder, console, gdb, channels, virtio) parses a string again.

The limits a valid spec keeps (MAX_VCPUS, MIN_MEMORY, ...) live here too, because the
checks (config/validate.py) and the JSON schema (config/schema.py) both state them.
Each field's place in the document (a TOML table or a JSON object) is told by its
``doc`` metadata where it differs from the field itself, so the schema is derived from
these classes and cannot drift from them.

What does not live here: reading a document (config/toml.py), checking values against
each other and the host (config/validate.py), the machine's address map (arch/x86_64/
layout.py, resources.py). Importing this module is cheap on purpose: `corevisor run`
pays for it at every start.
"""

from __future__ import annotations

import enum
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

__all__ = [
    "PartitionSpec",
    "ChannelSpec",
    "SystemSpec",
    "SerialSpec",
    "SerialKind",
    "HostPort",
    "ExitMode",
    "RestartPolicy",
    "Doorbell",
    "VirtioSpec",
    "Transport",
    "BlkSpec",
    "NetSpec",
    "DeviceSpec",
    "DeviceSpace",
    "doc",
    "DocField",
    "document_fields",
    "document_keys",
    "MAX_VCPUS",
    "MIN_MEMORY",
    "MAX_MEMORY",
    "MEMORY_ALIGN",
    "DEFAULT_MEMORY",
    "MAX_CMDLINE",
    "MAX_UNIX_PATH",
    "MAX_CHANNELS",
    "MAX_CHANNEL_SIZE",
    "PAGE",
    "DEFAULT_HALT_POLL_NS",
    "MAX_HALT_POLL_NS",
    "MAX_WATCHDOG_MS",
    "MAX_VIRTIO_DEVICES",
    "NAME_PATTERN",
]

MAX_VCPUS = 64
MIN_MEMORY = 2 << 20
MAX_MEMORY = 64 << 30
MEMORY_ALIGN = 4 << 10
DEFAULT_MEMORY = 64 << 20
MAX_CMDLINE = 4096
# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# Channel doorbells raise GSIs 16..23 (the IOAPIC pins above the ISA ones), one per channel.
MAX_CHANNELS = 8
MAX_CHANNEL_SIZE = 1 << 30
PAGE = 4 << 10
DEFAULT_HALT_POLL_NS = 200_000  # Linux's own default for halt_poll_ns
MAX_HALT_POLL_NS = 1_000_000_000
MAX_WATCHDOG_MS = 3_600_000
# One GSI each from the free ISA lines (resources.VIRTIO_GSIS); 16..23 belong to channels.
MAX_VIRTIO_DEVICES = 9
NAME_PATTERN = "[a-z][a-z0-9_-]{0,31}"


def doc(
    key: str | None = None,
    *,
    schema: dict[str, Any] | None = None,
    omit: bool = False,
    flatten: bool = False,
    description: str = "",
) -> dict[str, Any]:
    """Field metadata: how a spec field appears in a document (TOML table, JSON body).

    key: the document's name for it (default: the field name); schema: the JSON schema
    of its document form when that is not the field's own type (a size string, a CPU
    list); omit: not in the document (the table's own key, a run-time option); flatten:
    its fields sit directly in the parent's table.
    """
    return {
        "doc": {
            "key": key,
            "schema": schema,
            "omit": omit,
            "flatten": flatten,
            "description": description,
        }
    }


class DocField(NamedTuple):  # not a dataclass: `corevisor run` builds none it need not
    """One key of a document table and the spec field that holds it."""

    key: str
    field: Field[Any]
    schema: dict[str, Any] | None
    description: str
    path: tuple[str, ...]  # field names from the spec class down to it (flattened ones)


def document_fields(cls: type) -> tuple[DocField, ...]:
    """The keys of cls's document table, in field order, flattened fields inlined."""
    out: list[DocField] = []
    for f in fields(cls):
        meta = f.metadata.get("doc", {})
        if meta.get("omit"):
            continue
        if meta.get("flatten"):
            inner = f.default if f.default is not MISSING else None
            assert inner is not None, f"{cls.__name__}.{f.name}: flatten needs a default"
            for sub in document_fields(type(inner)):
                out.append(sub._replace(path=(f.name, *sub.path)))
            continue
        out.append(
            DocField(
                meta.get("key") or f.name,
                f,
                meta.get("schema"),
                meta.get("description", ""),
                (f.name,),
            )
        )
    return tuple(out)


def document_keys(cls: type) -> tuple[str, ...]:
    """The keys a document table for cls may have (in messages: "known: image, cpus, ...")."""
    return tuple(d.key for d in document_fields(cls))


class ExitMode(enum.StrEnum):
    """What HLT and PAUSE do in a dedicated partition (builder.attach_exit_policy)."""

    NORMAL = "normal"
    HALT_POLL = "halt-poll"
    DISABLED = "disabled"


class RestartPolicy(enum.StrEnum):
    """What the health monitor does when a partition stops abnormally (system.py)."""

    STOP = "stop"
    RESTART = "restart"
    HALT_SYSTEM = "halt-system"


class Doorbell(enum.StrEnum):
    """How a ring reaches the peer: "kernel" (ioeventfd -> irqfd, no userspace) or
    "thread" (the same eventfds relayed by a Python thread: the baseline the kernel path
    is measured against, kept usable so the comparison can be rerun on any host)."""

    KERNEL = "kernel"
    THREAD = "thread"


class SerialKind(enum.StrEnum):
    """Where a partition's serial line goes (console.py opens it)."""

    STDOUT = "stdout"
    NULL = "null"
    FILE = "file"
    UNIX = "unix"


# The document form of a serial setting, for the JSON schema.
_SERIAL_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": "^(stdout|null|(file|unix):[^\\x00]+)$",
    "description": 'stdout, null, file:PATH or unix:PATH (relative to the file\'s directory)',
    "examples": ["stdout", "file:logs/rtos.log", "unix:/tmp/rtos.sock"],
}
_HOST_PORT_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": "^(\\[[0-9A-Fa-f:.]+\\]|[^:\\[\\]]+):[0-9]{1,5}$",
    "description": "HOST:PORT ([HOST]:PORT for IPv6); HOST an IP address or localhost",
    "examples": ["127.0.0.1:1234", "[::1]:1234"],
}


@dataclass(frozen=True)
class SerialSpec:
    """A serial backend: its kind and, for file: and unix:, its (resolved) path."""

    kind: SerialKind = SerialKind.STDOUT
    path: Path | None = None

    def __post_init__(self) -> None:
        if (self.path is None) != (self.kind in (SerialKind.STDOUT, SerialKind.NULL)):
            raise ValueError(f"serial {self.kind}: a path exactly for file: and unix:")

    def __str__(self) -> str:
        """The document form ("stdout", "file:PATH"), for messages and round trips."""
        return str(self.kind) if self.path is None else f"{self.kind}:{self.path}"

    @classmethod
    def file(cls, path: Path) -> SerialSpec:
        return cls(SerialKind.FILE, Path(path))

    @classmethod
    def unix(cls, path: Path) -> SerialSpec:
        return cls(SerialKind.UNIX, Path(path))

    @classmethod
    def null(cls) -> SerialSpec:
        return cls(SerialKind.NULL)

    @staticmethod
    def document_schema() -> dict[str, Any]:
        """A serial setting is written as one string (see _SERIAL_SCHEMA)."""
        return dict(_SERIAL_SCHEMA)


@dataclass(frozen=True)
class HostPort:
    """A TCP address to listen on: an IP address (or localhost) and a port, 1..65535."""

    host: str
    port: int

    def __str__(self) -> str:
        """HOST:PORT, with brackets around an IPv6 host."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_loopback(self) -> bool:
        """Whether only this host can reach it (localhost, 127/8, ::1)."""
        if self.host == "localhost":
            return True
        import ipaddress  # only GDB addresses need it; start-up time is benchmarked

        return ipaddress.ip_address(self.host).is_loopback

    @staticmethod
    def document_schema() -> dict[str, Any]:
        """An address is written as one string (see _HOST_PORT_SCHEMA)."""
        return dict(_HOST_PORT_SCHEMA)


_SIZE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": "^\\s*[0-9]+\\s*[KMGkmg]?\\s*$"},
    ],
    "description": "bytes, or a number with a binary suffix K, M or G (64M)",
}
_CPU_LIST_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "array", "items": {"type": "integer", "minimum": 0}},
        {"type": "string", "pattern": "^\\s*[0-9]+(-[0-9]+)?(\\s*,\\s*[0-9]+(-[0-9]+)?)*\\s*$"},
    ],
    "description": 'host cores: one for all vCPUs or one per vCPU; [0, 1] or "0-1"',
}
_PATH_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": "^[^\\x00]*$"}


@dataclass(frozen=True)
class BlkSpec:
    """A virtio-blk device: a raw image of whole 512-byte sectors."""

    path: Path = field(metadata=doc(schema=_PATH_SCHEMA))
    readonly: bool = False


@dataclass(frozen=True)
class NetSpec:
    """A virtio-net device on a host TAP interface."""

    tap: str = field(metadata=doc(schema={"type": "string", "minLength": 1, "maxLength": 15}))


class Transport(enum.StrEnum):
    """How a partition's virtio devices reach the guest (virtio/attach.py): "mmio", a
    virtio-mmio window each (on Linux's command line and in the DSDT), or "pci", a
    virtio-pci function each on a PCI host bridge (with MSI-X)."""

    MMIO = "mmio"
    PCI = "pci"


@dataclass(frozen=True)
class VirtioSpec:
    """A partition's virtio devices (in the order they get windows or slots, and IRQs)."""

    blk: tuple[BlkSpec, ...] = ()
    net: tuple[NetSpec, ...] = ()
    rng: bool = False
    console: bool = field(default=False, metadata=doc(key="virtio_console"))
    transport: Transport = field(default=Transport.MMIO, metadata=doc(
        description='"mmio" or "pci" (the default with bios)'))

    @property
    def count(self) -> int:
        return len(self.blk) + len(self.net) + int(self.rng) + int(self.console)


class DeviceSpace(enum.StrEnum):
    """Where a user device's registers sit (userdev/): the port-I/O or the MMIO bus, or
    the BARs of a PCI function (placed by the PCI platform: no base, no fixed line)."""

    PORT = "port"
    MMIO = "mmio"
    PCI = "pci"


# A user device's table: its class, optional name, base and gsi, and its constructor's
# parameters as further keys (userdev/load.py reads it; docs/devices.md).
_PARAM_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": ["string", "integer", "number", "boolean"]},
        {"type": "array", "items": {"type": ["string", "integer", "number", "boolean"]}},
    ],
}
_DEVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "a device model written in Python (docs/devices.md); keys other than "
    "these are its constructor's parameters",
    "properties": {
        "class": {
            "type": "string",
            "pattern": "^[^:\\x00]+:[A-Za-z_][A-Za-z0-9_.]*$",
            "description": '"package.module:Class", or "FILE.py:Class" relative to the '
            "system file's directory",
            "examples": ["sensor.py:TempSensor", "mydevices.gpio:Gpio"],
        },
        "name": {"type": "string", "pattern": f"^{NAME_PATTERN}$",
                 "description": "default: the class's name in lower case"},
        "base": {"type": "integer", "minimum": 0,
                 "description": "first port or MMIO address (default: the class's REGION; "
                 "not for a PCI function, whose BARs are placed)"},
        "gsi": {"type": "integer", "minimum": 0,
                "description": "its interrupt line (default: the class's IRQ; not for a "
                "PCI function, whose line is its slot's INTx)"},
    },
    "required": ["class"],
    "additionalProperties": _PARAM_SCHEMA,
}


@dataclass(frozen=True)
class DeviceSpec:
    """A user-written device model (docs/devices.md): its class, where it sits, its
    interrupt line, and the keyword arguments its constructor gets.

    Read from the class when the document is read (userdev/load.py): space and size from
    its REGION, trigger from its IRQ; base and gsi are the class's unless the document
    moves them. cls is "package.module:Class", or "/absolute/FILE.py:Class". A PCI
    function (space PCI) has base and size 0 and no gsi: its BARs and its INTx line are
    the PCI platform's to place (userdev/attach.py).
    """

    cls: str = field(metadata=doc(key="class"))
    name: str
    space: DeviceSpace = field(metadata=doc(omit=True))
    base: int
    size: int = field(metadata=doc(omit=True))
    gsi: int | None = None
    level: bool = field(default=False, metadata=doc(omit=True))  # a level-triggered line
    # The constructor's keyword arguments: the table's other keys (document_schema).
    params: tuple[tuple[str, Any], ...] = field(default=(), metadata=doc(omit=True))

    @property
    def end(self) -> int:
        """One past its last port or address."""
        return self.base + self.size

    @property
    def where(self) -> str:
        """Its range as messages show it: "ports 0x700-0x703", "MMIO 0xc1000000+0x1000"."""
        if self.space is DeviceSpace.PORT:
            return f"ports {self.base:#x}-{self.end - 1:#x}"
        if self.space is DeviceSpace.PCI:
            return "a PCI function"
        return f"MMIO {self.base:#x}+{self.size:#x}"

    @staticmethod
    def document_schema() -> dict[str, Any]:
        """A device's table: four keys of its own, then its constructor's parameters."""
        return dict(_DEVICE_SCHEMA)


@dataclass(frozen=True)
class ModuleSpec:
    """A multiboot module as configured: its file and the string the guest sees with it
    (loader/modules.py loads it; the written form is "FILE[,STRING]")."""

    path: Path
    string: str


PCI_ADDRESS_PATTERN = "[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[01][0-9a-fA-F]\\.[0-7]"


@dataclass(frozen=True)
class PciAddress:
    """A host PCI function, DOMAIN:BUS:DEVICE.FUNCTION (what lspci -D and sysfs call it):
    the device a partition is given through VFIO (vfio/)."""

    domain: int
    bus: int
    device: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"


_VFIO_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "pattern": f"^{PCI_ADDRESS_PATTERN}$"},
    "description": 'host PCI devices bound to vfio-pci, passed through under the IOMMU '
                   '("0000:00:04.0" each)',
}

_MODULES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "pattern": "^[^\\x00]*$"},
    "description": 'multiboot modules, "FILE[,STRING]" each (STRING defaults to FILE)',
}


@dataclass(frozen=True)
class PartitionSpec:
    """One partition (one VM): its guest image and the resources it gets."""

    # A document has exactly one of these keys (config/schema.py states it as oneOf).
    DOCUMENT_ONE_OF: ClassVar[tuple[str, ...]] = ("image", "bios")

    name: str = field(metadata=doc(omit=True))  # the key of its [partitions.NAME] table
    # The guest image, or None for a machine that boots through its firmware (bios).
    image: Path | None = field(default=None, metadata=doc(
        schema=_PATH_SCHEMA, description="the guest ELF or bzImage (or give bios)"))
    cpus: int = field(default=1, metadata=doc(schema={"type": "integer", "minimum": 1,
                                                      "maximum": MAX_VCPUS}))
    memory: int = field(default=DEFAULT_MEMORY, metadata=doc(schema=_SIZE_SCHEMA))
    pin: tuple[int, ...] = field(default=(), metadata=doc(schema=_CPU_LIST_SCHEMA))
    cmdline: str = field(default="", metadata=doc(schema={"type": "string",
                                                          "pattern": "^[^\\x00]*$"}))
    serial: SerialSpec = SerialSpec()
    dedicated: bool = False
    exits: ExitMode = ExitMode.NORMAL
    halt_poll_ns: int = field(default=DEFAULT_HALT_POLL_NS, metadata=doc(
        schema={"type": "integer", "minimum": 0, "maximum": MAX_HALT_POLL_NS}))
    restart: RestartPolicy = RestartPolicy.STOP
    watchdog_ms: int = field(default=0, metadata=doc(
        schema={"type": "integer", "minimum": 0, "maximum": MAX_WATCHDOG_MS}))
    # For a Linux image its initramfs; for a multiboot image its modules, written as
    # QEMU's -initrd list (config/files.py boot_files turns them into modules).
    initrd: Path | None = field(default=None, metadata=doc(schema=_PATH_SCHEMA))
    modules: tuple[ModuleSpec, ...] = field(default=(), metadata=doc(schema=_MODULES_SCHEMA))
    gdb: HostPort | None = None  # a GDB stub for this partition (gdb/server.py)
    # Run at once and stop when GDB connects (else halted at start): a run-time option.
    gdb_attach: bool = field(default=False, metadata=doc(omit=True))
    virtio: VirtioSpec = field(default=VirtioSpec(), metadata=doc(flatten=True))
    # User-written device models ([[partitions.NAME.devices]]; userdev/, docs/devices.md).
    devices: tuple[DeviceSpec, ...] = ()
    # Firmware the machine starts in (firmware/bios.py: SeaBIOS), booting from its disk.
    bios: Path | None = field(default=None, metadata=doc(
        schema=_PATH_SCHEMA, description="a BIOS image (SeaBIOS's bios.bin) to boot the disk "
        "through, instead of an image"))
    # Host PCI devices given to the guest through VFIO (vfio/), DMA confined by the IOMMU.
    vfio: tuple[PciAddress, ...] = field(default=(), metadata=doc(schema=_VFIO_SCHEMA))

    def __post_init__(self) -> None:
        if (self.image is None) == (self.bios is None):
            raise ValueError("a partition boots an image or its bios: exactly one of the two")

    @property
    def pci(self) -> bool:
        """Whether the machine has a PCI host bridge (PCI devices or firmware)."""
        return self.bios is not None or self.virtio.transport is Transport.PCI or bool(self.vfio)

    def vcpu_cores(self) -> tuple[int, ...]:
        """The host core of each vCPU, in vCPU order (empty if the partition is not pinned)."""
        if not self.pin:
            return ()
        return self.pin if len(self.pin) == self.cpus else self.pin * self.cpus

    def unix_socket(self) -> Path | None:
        """The unix: socket path this partition listens on, if any (one per run)."""
        return self.serial.path if self.serial.kind is SerialKind.UNIX else None


_DIRECTION_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": f"^\\s*{NAME_PATTERN}\\s*->\\s*{NAME_PATTERN}\\s*$",
    "description": 'one-way: "writer->reader" (the reader maps it read-only)',
}


@dataclass(frozen=True)
class ChannelSpec:
    """Shared memory between two partitions, at the same guest-physical address in both.

    ``writer``/``reader`` are set for a one-way channel (the reader maps it read-only);
    both None means either side may write and ring the other. ``gpa`` None means "place
    it": validation (config/validate.py) returns a spec with every gpa set.
    """

    name: str = field(metadata=doc(omit=True))  # the key of its [channels.NAME] table
    between: tuple[str, str] = field(metadata=doc(schema={
        "type": "array", "items": {"type": "string", "pattern": f"^{NAME_PATTERN}$"},
        "minItems": 2, "maxItems": 2}))
    size: int = field(default=PAGE, metadata=doc(schema=_SIZE_SCHEMA))
    gpa: int | None = field(default=None, metadata=doc(schema={"type": "integer", "minimum": 0}))
    writer: str | None = field(default=None, metadata=doc(key="direction",
                                                          schema=_DIRECTION_SCHEMA))
    reader: str | None = field(default=None, metadata=doc(omit=True))
    doorbell: Doorbell = Doorbell.KERNEL

    @property
    def placed_gpa(self) -> int:
        """The channel's address once validation placed it."""
        if self.gpa is None:
            raise ValueError(f"channel {self.name} has not been placed (validate the system)")
        return self.gpa


@dataclass(frozen=True)
class SystemSpec:
    """A whole system: the partitions, the channels between them, where serial logs go,
    and the file it came from (None for CLI runs and the API)."""

    partitions: tuple[PartitionSpec, ...]
    source: Path | None = None
    channels: tuple[ChannelSpec, ...] = ()
    log_dir: Path | None = None
    # Every thread under its role's seccomp filter (sandbox/); `run --no-sandbox` wins.
    sandbox: bool = field(default=True, metadata=doc(
        description="confine every VMM thread to its role's seccomp allowlist"))

    def partition(self, name: str) -> PartitionSpec:
        for p in self.partitions:
            if p.name == name:
                return p
        raise KeyError(name)
