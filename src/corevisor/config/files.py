"""The checks that look at the file system: a guest image, an initrd, a BIOS, a log directory.

They run where a path is read (toml.py, args.py), because only there is the text the
user wrote known, and messages show that text (``partitions.demo.image: guests/x.elf
does not exist``), not the resolved path. Every OSError — a missing file, a path that
is too long (ENAMETOOLONG), a permission — becomes one ConfigError naming the key; no
check here lets one escape as a traceback.

The image check asks the loader what the image is (loader.identify_image, the one home
for that question), so whatever the loader can boot is accepted (a raw a.out-kludge
multiboot image too), and the answer decides what ``initrd`` means: a Linux
initramfs, or a multiboot image's modules as QEMU's -initrd (boot_files). The
disk-image rule lives in virtio/config.py, shared with the device that opens the
image. What does not live here: checks that need no file system (validate.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from corevisor import inputs
from corevisor.errors import ConfigError, LoaderError, show
from corevisor.spec import ModuleSpec

__all__ = [
    "stat_or_none",
    "check_guest_image",
    "check_initrd",
    "check_bios",
    "DEFAULT_BIOS",
    "check_log_dir",
    "check_directory",
    "boot_files",
]

_ELF_MAGIC = b"\x7fELF"
# Debian's SeaBIOS (package seabios), the build QEMU's PCs use.
DEFAULT_BIOS = Path("/usr/share/seabios/bios-256k.bin")


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
    """A regular file (inputs.py: no open that could block, the kind named if not)."""
    inputs.stat_file(path, inputs.Named(where, show(shown)))


def check_guest_image(path: Path, where: str, shown: str) -> str:
    """A guest image the loader can boot; returns its boot protocol ("pvh",
    "multiboot", "bzimage"). It is read whole to say so, hence bounded (MAX_IMAGE)."""
    from corevisor.loader import MAX_IMAGE, identify_image  # the loaders only when needed

    _regular_file(path, where, shown)
    data = inputs.read_file(
        path, inputs.Named(where, show(shown)), limit=MAX_IMAGE, why="an image can be"
    )

    try:
        return identify_image(data, show(shown))
    except LoaderError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_initrd(path: Path, where: str, shown: str) -> None:
    """An initramfs for a Linux image: a regular file (its format is the kernel's business)."""
    _regular_file(path, where, shown)


def check_bios(path: Path, where: str, shown: str) -> None:
    """A BIOS image the machine can map below 4 GiB: a multiple of 64 KiB, up to the VT-x
    TSS KVM keeps below the ROM (layout.BIOS_MAX_SIZE)."""
    from corevisor.arch.x86_64.layout import BIOS_MAX_SIZE, BIOS_MIN_SIZE

    _regular_file(path, where, shown)
    size = os.stat(path).st_size
    if size % BIOS_MIN_SIZE or not BIOS_MIN_SIZE <= size <= BIOS_MAX_SIZE:
        hint = " (Debian's package seabios has /usr/share/seabios/bios-256k.bin)"
        raise ConfigError(
            f"{where}: {show(shown)} is {size} bytes; a BIOS image is a multiple of 64 KiB "
            f"up to {BIOS_MAX_SIZE >> 10} KiB{hint}"
        )


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


def boot_files(
    kind: str,
    initrd: str | None,
    modules: list[str],
    where: tuple[str, str],
    base: Path | None,
) -> tuple[Path | None, tuple[ModuleSpec, ...]]:
    """(initrd, modules) for an image of this kind, from the texts the user wrote.

    where names the initrd and modules keys (or options); base resolves relative paths.
    A multiboot image's initrd is its module list, as QEMU's -initrd; modules need a
    multiboot image.
    """
    from corevisor.config.parse import parse_path
    from corevisor.loader.modules import split_module, split_qemu_initrd

    items = [(*split_module(text), where[1]) for text in modules]
    if kind != "multiboot":
        if items:
            raise ConfigError(
                f"{where[1]}: modules need a multiboot image (this one boots as {kind}; "
                "give a Linux kernel an initrd)"
            )
        if initrd is None:
            return None, ()
        path = parse_path(initrd, where[0], base)
        check_initrd(path, where[0], initrd)
        return path, ()
    if initrd is not None:
        items += [(*entry, where[0]) for entry in split_qemu_initrd(initrd)]
    out = []
    for file, string, key in items:
        if "\0" in string:
            raise ConfigError(f"{key}: the string of module {show(file)} contains a NUL")
        path = parse_path(file, key, base)
        check_initrd(path, key, file)
        out.append(ModuleSpec(path, string))
    return None, tuple(out)
