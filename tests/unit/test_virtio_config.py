"""Virtio keys of a partition (TOML and `run` options): parsed, or refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from corevisor.config import load_config, partition_from_args
from corevisor.errors import ConfigError
from corevisor.spec import BlkSpec, NetSpec, VirtioSpec
from tests.kvm.images import pvh_elf

HEAD = '[partitions.demo]\nimage = "hello.elf"\n'


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "hello.elf").write_bytes(pvh_elf(b"\xf4"))
    (tmp_path / "disk.img").write_bytes(bytes(1024))
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    return tmp_path


def _load(tree: Path, body: str) -> VirtioSpec:
    (tree / "s.toml").write_text(HEAD + body)
    return load_config(tree / "s.toml").partitions[0].virtio


def _error(tree: Path, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tree, body)
    msg = str(info.value)
    assert "\n" not in msg
    return msg.split(": ", 1)[1]


def test_all_keys(tree: Path) -> None:
    cfg = _load(
        tree,
        'blk = [{path = "disk.img", readonly = true}, {path = "disk.img"}]\n'
        'net = [{tap = "tap0"}]\nrng = true\nvirtio_console = true\n',
    )
    assert cfg.blk == (BlkSpec(tree / "disk.img", True), BlkSpec(tree / "disk.img", False))
    assert cfg.net == (NetSpec("tap0"),) and cfg.rng and cfg.console and cfg.count == 5


def test_defaults_are_no_devices(tree: Path) -> None:
    assert _load(tree, "") == VirtioSpec()


@pytest.mark.parametrize(
    "body,message",
    [
        (
            'blk = [{path = "odd.img"}]\n',
            "blk[0].path: odd.img is 1000 bytes, not a multiple of 512",
        ),
        ('blk = [{path = "nope.img"}]\n', "blk[0].path: nope.img does not exist"),
        ('blk = [{path = "disk.img", ro = true}]\n', 'blk[0]: unknown key "ro"'),
        ('blk = "disk.img"\n', "blk: expected an array"),
        ('net = [{tap = "a-name-far-too-long"}]\n', 'net[0].tap: "a-name-far-too-long" is not'),
        ("rng = 1\n", "rng: expected true or false"),
        (
            "blk = [" + ", ".join(['{path = "disk.img"}'] * 10) + "]\n",
            "10 virtio devices, at most 9",
        ),
    ],
)
def test_errors_name_the_key(tree: Path, body: str, message: str) -> None:
    assert _error(tree, body).startswith("partitions.demo") and message in _error(tree, body)


def test_run_options(tree: Path) -> None:
    disk = str(tree / "disk.img")
    p = partition_from_args(
        str(tree / "hello.elf"), disks=[disk + ",ro", disk], nets=["t0"], rng=True
    )
    assert p.virtio.blk == (BlkSpec(Path(disk), True), BlkSpec(Path(disk), False))
    assert p.virtio.net == (NetSpec("t0"),) and p.virtio.rng
    with pytest.raises(ConfigError, match="^--disk: .*not a multiple of 512"):
        partition_from_args(str(tree / "hello.elf"), disks=[str(tree / "odd.img")])
