"""The checks that look at the file system: a guest image, an initrd, a log directory.

They run where a path is read (toml.py, args.py), because only there is the text the
user wrote known, and messages show that text (``partitions.demo.image: guests/x.elf
does not exist``), not the resolved path. Every OSError — a missing file, a path that
is too long (ENAMETOOLONG), a permission — becomes one ConfigError naming the key; no
check here lets one escape as a traceback.

The image check is shallow on purpose (a regular file with ELF or bzImage magic):
parsing it is the loader's job. The disk-image rule lives in virtio/config.py, shared
with the device that opens the image. What does not live here: checks that need no
file system (validate.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from corevisor.errors import ConfigError, show

__all__ = ["stat_or_none", "check_guest_image", "check_initrd", "check_log_dir", "check_directory"]

_ELF_MAGIC = b"\x7fELF"


def stat_or_none(path: Path, where: str, shown: str) -> os.stat_result | None:
    """os.stat(path), None if nothing is there; any other failure is a ConfigError."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ConfigError(f"{where}: cannot use {show(shown)}: {e.strerror or e}") from None
    except ValueError:  # an embedded NUL from a caller that did not parse the path
        raise ConfigError(f"{where}: {show(shown)} is not a valid path") from None


def _regular_file(path: Path, where: str, shown: str) -> None:
    st = stat_or_none(path, where, shown)
    if st is None:
        raise ConfigError(f"{where}: {show(shown)} does not exist")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: {show(shown)} is not a regular file")


def check_guest_image(path: Path, where: str, shown: str) -> None:
    """A guest image: a regular file starting with ELF magic, or a Linux bzImage."""
    _regular_file(path, where, shown)
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {show(shown)}: {e.strerror or e}") from None
    # A Linux bzImage has no ELF magic: its setup header's "HdrS" is at 0x202.
    if head[: len(_ELF_MAGIC)] != _ELF_MAGIC and head[0x202:0x206] != b"HdrS":
        raise ConfigError(f"{where}: {show(shown)} is not an ELF image or a Linux bzImage")


def check_initrd(path: Path, where: str, shown: str) -> None:
    """An initramfs for a Linux image: a regular file (its format is the kernel's business)."""
    _regular_file(path, where, shown)


def check_directory(path: Path, where: str, shown: str) -> None:
    """A directory that must exist (--initramfs-dir)."""
    st = stat_or_none(path, where, shown)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: {show(shown)} is not a directory")


def check_log_dir(path: Path, where: str, shown: str) -> None:
    """A log directory: missing is fine (it is created), anything but a directory is not."""
    st = stat_or_none(path, where, shown)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: {show(shown)} exists and is not a directory")
