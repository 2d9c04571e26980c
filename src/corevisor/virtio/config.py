"""The rules for virtio backends a user names: a raw disk image, a TAP interface name.

The keys (``blk``, ``net``, ``rng``, ``virtio_console`` in a partition table; ``--disk
PATH[,ro]``, ``--net TAP``, ``--rng`` on the command line) are read by config/toml.py
and config/args.py into spec.VirtioSpec; the checks here are shared by those readers and
by the devices when they open the backend (virtio/blk.py), so a file that changed in
between is judged by the same rules. Opening the image and the TAP is attach.py's job.
Imported by the config readers, so it imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

from corevisor import inputs
from corevisor.errors import ConfigError, quote, show

__all__ = ["check_image", "check_sectors", "check_tap", "SECTOR", "IFNAMSIZ"]

SECTOR = 512
IFNAMSIZ = 16


def check_image(path: Path, where: str, shown: str | None = None) -> int:
    """Return the size of a usable raw disk image, or raise a one-line ConfigError.

    The type check is inputs.py's (no open, no blocking on a FIFO); the device checks
    the descriptor it opens again, by the same rules (check_sectors)."""
    shown = show(path) if shown is None else shown
    return check_sectors(inputs.stat_file(path, inputs.Named(where, shown)).st_size, where, shown)


def check_sectors(size: int, where: str, shown: str) -> int:
    """A disk image holds whole sectors."""
    if size % SECTOR:
        raise ConfigError(
            f"{where}: {shown} is {size} bytes, not a multiple of {SECTOR} "
            "(a disk image holds whole sectors)"
        )
    return size


def check_tap(name: object, where: str) -> str:
    """A host network interface name: 1..15 bytes of UTF-8, no slash."""
    if not isinstance(name, str) or not name or "/" in name or len(_utf8(name)) >= IFNAMSIZ:
        raise ConfigError(f"{where}: {quote(name)} is not a network interface name (1-15 bytes)")
    return name


def _utf8(text: str) -> bytes:
    """text as UTF-8; bytes that were not UTF-8 on the command line make it too long."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return bytes(IFNAMSIZ)
