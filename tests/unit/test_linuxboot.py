"""Tests for the Linux options of `corevisor run` (linuxboot.py) and the initrd config key.

No KVM: these check how --kernel/--initrd/--initramfs-dir become a PartitionSpec
(the CLI's parser, then linuxboot.apply, then config's checks).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from corevisor import cli, linuxboot
from corevisor.config import load_config, partition_from_args
from corevisor.errors import ConfigError, CorevisorError
from tests.unit.test_bzimage import make_bzimage


def parse(*argv: str) -> argparse.Namespace:
    args = cli._parser().parse_args(["run", *argv])
    linuxboot.apply(args)
    return args


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage())
    return path


def test_kernel_gets_linux_defaults(kernel: Path) -> None:
    args = parse("--kernel", str(kernel))
    assert args.target == str(kernel)
    assert args.cmdline == linuxboot.DEFAULT_CMDLINE
    assert args.cmdline.startswith("console=ttyS0 ")
    assert args.memory == "256M"
    part = partition_from_args(args.target, memory=args.memory, cmdline=args.cmdline)
    assert part.image == kernel  # a bzImage passes the config's image check


def test_explicit_options_win_and_plain_images_keep_old_defaults(kernel: Path) -> None:
    args = parse("--kernel", str(kernel), "--cmdline", "", "--memory", "1G")
    assert (args.cmdline, args.memory) == ("", "1G")
    args = parse("guest.elf")
    assert (args.cmdline, args.memory, args.initrd) == ("", "64M", None)


def test_kernel_and_image_are_mutually_exclusive(kernel: Path) -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        parse("guest.elf", "--kernel", str(kernel))


def test_initrd_and_initramfs_dir_are_mutually_exclusive(tmp_path: Path) -> None:
    with pytest.raises(cli.UsageError, match="not allowed with argument"):
        parse("--kernel", "k", "--initrd", "i", "--initramfs-dir", str(tmp_path))


def test_initrd_needs_an_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need --kernel or IMAGE"):
        parse("system.toml", "--initrd", "x")


def test_initramfs_dir_is_packed_into_a_memfd(kernel: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "init").write_bytes(b"#!/bin/sh\n")
    args = parse("--kernel", str(kernel), "--initramfs-dir", str(root))
    data = Path(args.initrd).read_bytes()
    assert data.startswith(b"070701") and b"init\0" in data and b"dev/console\0" in data
    part = partition_from_args(args.target, initrd=args.initrd)
    assert part.initrd == Path(args.initrd)
    os.close(int(args.initrd.rsplit("/", 1)[1]))


def test_initramfs_dir_must_be_a_directory(kernel: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        parse("--kernel", str(kernel), "--initramfs-dir", str(tmp_path / "nope"))


def test_missing_initrd_is_a_one_line_error(kernel: Path, tmp_path: Path) -> None:
    status = cli.main(["run", "--kernel", str(kernel), "--initrd", str(tmp_path / "no")])
    assert status == cli.EXIT_USER_ERROR
    with pytest.raises(CorevisorError, match=r"^--initrd: .*/no does not exist$"):
        partition_from_args(str(kernel), initrd=str(tmp_path / "no"))


def test_initrd_config_key(kernel: Path, tmp_path: Path) -> None:
    (tmp_path / "rd.cpio").write_bytes(b"070701")
    toml = tmp_path / "linux.toml"
    toml.write_text('[partitions.linux]\nimage = "bzImage"\ninitrd = "rd.cpio"\n')
    (part,) = load_config(toml).partitions
    assert part.initrd == tmp_path / "rd.cpio"
    toml.write_text('[partitions.linux]\nimage = "bzImage"\ninitrd = "nope"\n')
    with pytest.raises(ConfigError, match=r"partitions.linux.initrd: nope does not exist$"):
        load_config(toml)
