"""The `corevisor run --kernel K [--initrd I | --initramfs-dir D]` options, and their defaults.

A Linux kernel is just another image to the builder (the loaders tell a bzImage from
a PVH vmlinux); what is Linux-specific on the command line lives here so cli.py only
calls add_arguments() and apply():

* --kernel K names the image (instead of the positional IMAGE, never with it) and
  switches the defaults to what a Linux guest needs: DEFAULT_CMDLINE and
  DEFAULT_MEMORY (Debian's kernel alone takes ~75 MiB while booting).
* --initrd I passes an existing initramfs; --initramfs-dir D packs directory D into a
  newc cpio (loader/initramfs.py) held in a memfd, so nothing is left on disk.

What does not live here: loading (loader/), the zero page (bootparams.py), the
config key `initrd` (config/toml.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from corevisor.config.files import check_directory
from corevisor.config.parse import parse_path, parse_size
from corevisor.errors import ConfigError, show

# console=ttyS0: the kernel's console on our COM1; earlyprintk=serial: output from the
# first instructions (and from the bzImage decompressor), before the console driver;
# reboot=k: reboot through the i8042 (corevisor reports it); panic=-1: reboot at once
# on a panic instead of spinning; pci=off: a machine without --transport pci has no PCI
# host bridge, so do not probe for one port by port (PCI_CMDLINE: one that has).
PCI_CMDLINE = "console=ttyS0 earlyprintk=serial reboot=k panic=-1"
DEFAULT_CMDLINE = PCI_CMDLINE + " pci=off"
DEFAULT_MEMORY = "256M"
PLAIN_MEMORY = "64M"


def add_arguments(run: argparse.ArgumentParser) -> None:
    """The Linux options of `corevisor run`."""
    run.add_argument(
        "--kernel",
        metavar="K",
        default=None,
        help="a Linux bzImage or vmlinux (instead of IMAGE); default cmdline "
        f'"{DEFAULT_CMDLINE}", default memory {DEFAULT_MEMORY}',
    )
    ramdisk = run.add_mutually_exclusive_group()
    ramdisk.add_argument(
        "--initrd",
        metavar="I",
        default=None,
        help='initramfs for Linux; for a multiboot image its modules, as QEMU: "F ARGS,F ARGS"',
    )
    ramdisk.add_argument(
        "--initramfs-dir",
        metavar="D",
        default=None,
        help="pack directory D into a cpio initramfs (adds /dev/console if missing)",
    )


def _pack(directory: Path, memory: str) -> str:
    """Build the initramfs of directory into a memfd; return a path that reads it.

    The fd stays open for the life of the process, which is as long as the builder
    needs it; the archive never touches the disk. It cannot be larger than the guest's
    RAM, so packing stops there rather than reading the whole tree first.
    """

    from corevisor.loader.initramfs import build_initramfs  # only with --initramfs-dir

    data = build_initramfs(directory, limit=parse_size(memory, "--memory"))
    fd = os.memfd_create("corevisor-initramfs")
    os.write(fd, data)
    return f"/proc/self/fd/{fd}"


def apply(args: argparse.Namespace) -> None:
    """Fold --kernel/--initrd/--initramfs-dir into args.target/cmdline/memory/initrd.

    Afterwards args.cmdline and args.memory are never None, so cli.py can pass them on
    whichever way the image was named.
    """
    kernel = getattr(args, "kernel", None)
    if kernel is not None:
        if args.target is not None:
            raise ConfigError(
                f"--kernel {show(kernel)} and IMAGE {show(args.target)} are mutually exclusive"
            )
        args.target = kernel
        if args.cmdline is None:
            pci = getattr(args, "transport", None) == "pci"
            args.cmdline = PCI_CMDLINE if pci else DEFAULT_CMDLINE
        if args.memory is None:
            args.memory = DEFAULT_MEMORY
    if args.cmdline is None:
        args.cmdline = ""
    if args.memory is None:
        args.memory = PLAIN_MEMORY
    directory = getattr(args, "initramfs_dir", None)
    initrd = getattr(args, "initrd", None)
    if (initrd or directory) and (args.target is None or args.target.endswith(".toml")):
        raise ConfigError(
            "--initrd and --initramfs-dir need --kernel or IMAGE (a system file has an "
            "initrd key per partition)"
        )
    if directory is not None:
        path = parse_path(directory, "--initramfs-dir", None)
        check_directory(path, "--initramfs-dir", directory)
        args.initrd = _pack(path, args.memory)
