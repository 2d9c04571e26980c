"""Which virtio devices a partition gets: parsed from its TOML table or `run` options.

The TOML keys (in a [partitions.NAME] table)::

    blk = [{path = "disk.img", readonly = false}]   # raw images, whole 512-byte sectors
    net = [{tap = "tap0"}]                          # host TAP interfaces
    rng = true                                      # an entropy device
    virtio_console = true                           # hvc0, on the partition's serial

and on the command line ``--disk PATH[,ro]`` (repeatable), ``--net TAP`` (repeatable),
``--rng``. Checks a user can fail happen here, as one ConfigError naming the key: an
image that is missing, not a regular file or not whole sectors; a bad interface name;
more devices than interrupt lines. Opening the image and the TAP is attach.py's job.
Imported by config.py, so it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from corevisor import inputs
from corevisor.errors import ConfigError

__all__ = [
    "VirtioConfig",
    "BlkConfig",
    "NetConfig",
    "VIRTIO_KEYS",
    "MAX_VIRTIO_DEVICES",
    "virtio_from_table",
    "virtio_from_args",
]

VIRTIO_KEYS = ("blk", "net", "rng", "virtio_console")
# One GSI each: 5, 6, 7, 9, 10, 11, 12, 14, 15 (attach.py); 16..23 belong to channels.
MAX_VIRTIO_DEVICES = 9
SECTOR = 512
IFNAMSIZ = 16


@dataclass(frozen=True)
class BlkConfig:
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class NetConfig:
    tap: str


@dataclass(frozen=True)
class VirtioConfig:
    """A partition's virtio devices (in the order they get MMIO windows and IRQs)."""

    blk: tuple[BlkConfig, ...] = ()
    net: tuple[NetConfig, ...] = ()
    rng: bool = False
    console: bool = False

    @property
    def count(self) -> int:
        return len(self.blk) + len(self.net) + int(self.rng) + int(self.console)


def check_image(path: Path, where: str, shown: str | None = None) -> int:
    """Return the size of a usable raw disk image, or raise a one-line ConfigError."""
    shown = str(path) if shown is None else shown
    return check_sectors(inputs.stat_file(path, f"{where}: {shown}").st_size, where, shown)


def check_sectors(size: int, where: str, shown: str) -> int:
    """A disk image holds whole sectors. Both the config check and the device when it
    opens the file use it, so a file that changed in between is judged by the same rules."""
    if size % SECTOR:
        raise ConfigError(
            f"{where}: {shown} is {size} bytes, not a multiple of {SECTOR} "
            "(a disk image holds whole sectors)"
        )
    return size


def _check_image(shown: str, where: str, base: Path | None) -> Path:
    if not shown or "\0" in shown:
        raise ConfigError(f"{where}: {shown!r} is not a valid path")
    path = Path(shown).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    check_image(path, where, shown)
    return path


def _check_tap(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or len(name.encode()) >= IFNAMSIZ:
        raise ConfigError(f"{where}: {name!r} is not a network interface name (1-15 bytes)")
    return name


def _check_count(cfg: VirtioConfig, where: str) -> VirtioConfig:
    if cfg.count > MAX_VIRTIO_DEVICES:
        raise ConfigError(
            f"{where}: {cfg.count} virtio devices, at most {MAX_VIRTIO_DEVICES} "
            "(one interrupt line each)"
        )
    return cfg


def virtio_from_table(table: dict[str, object], where: str, base: Path | None) -> VirtioConfig:
    """Parse the virtio keys of one partition table; where is "FILE: partitions.NAME"."""
    blks: list[BlkConfig] = []
    raw_blk = table.get("blk", [])
    if not isinstance(raw_blk, list):
        raise ConfigError(f'{where}.blk: expected an array of tables like {{path = "disk.img"}}')
    for i, item in enumerate(raw_blk):
        w = f"{where}.blk[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f'{w}: expected a table like {{path = "disk.img"}}')
        for key in item:
            if key not in ("path", "readonly"):
                raise ConfigError(f"{w}: unknown key {key!r} (known: path, readonly)")
        path = item.get("path")
        if not isinstance(path, str):
            raise ConfigError(f"{w}.path: expected a string path to a raw disk image")
        readonly = item.get("readonly", False)
        if not isinstance(readonly, bool):
            raise ConfigError(f"{w}.readonly: expected true or false")
        blks.append(BlkConfig(_check_image(path, f"{w}.path", base), readonly))
    nets: list[NetConfig] = []
    raw_net = table.get("net", [])
    if not isinstance(raw_net, list):
        raise ConfigError(f'{where}.net: expected an array of tables like {{tap = "tap0"}}')
    for i, item in enumerate(raw_net):
        w = f"{where}.net[{i}]"
        if not isinstance(item, dict) or set(item) != {"tap"}:
            raise ConfigError(f'{w}: expected a table with one key, like {{tap = "tap0"}}')
        nets.append(NetConfig(_check_tap(item["tap"], f"{w}.tap")))
    flags = {}
    for key in ("rng", "virtio_console"):
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key}: expected true or false")
        flags[key] = value
    cfg = VirtioConfig(tuple(blks), tuple(nets), flags["rng"], flags["virtio_console"])
    return _check_count(cfg, where)


def virtio_from_args(
    disks: list[str] | None = None, nets: list[str] | None = None, rng: bool = False
) -> VirtioConfig:
    """Build the devices of `corevisor run --disk PATH[,ro] --net TAP --rng`."""
    blks = []
    for spec in disks or []:
        path, sep, opt = spec.rpartition(",")
        if not sep or opt not in ("ro", "rw"):
            path, opt = spec, "rw"
        blks.append(BlkConfig(_check_image(path, "--disk", None), opt == "ro"))
    taps = tuple(NetConfig(_check_tap(t, "--net")) for t in nets or [])
    return _check_count(VirtioConfig(tuple(blks), taps, rng, False), "--disk/--net/--rng")
