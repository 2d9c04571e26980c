"""System files: partition policies, channels, and the checks that need the whole file."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from corevisor.config import gather, load_config
from corevisor.errors import ConfigError
from corevisor.spec import ChannelSpec
from tests.unit.test_config import error, tree, write  # noqa: F401 - fixture

CORES = sorted(os.sched_getaffinity(0))
C0 = CORES[0]


def two(extra_a: str = "", extra_b: str = "", tail: str = "") -> str:
    return (
        f'[partitions.a]\nimage = "guests/hello.elf"\nmemory = "16M"\n{extra_a}\n'
        f'[partitions.b]\nimage = "guests/hello.elf"\nmemory = "16M"\n{extra_b}\n{tail}'
    )


def test_policies_and_defaults(tree: Path) -> None:  # noqa: F811
    cfg = load_config(
        write(
            tree,
            two(
                f'pin = [{C0}]\ndedicated = true\nexits = "halt-poll"\nhalt_poll_ns = 50000\n'
                'restart = "restart"\nwatchdog_ms = 500',
                'restart = "halt-system"',
                '[system]\nlog_dir = "logs"\n',
            ),
        )
    )
    a, b = cfg.partitions
    assert (a.dedicated, a.exits, a.halt_poll_ns, a.restart, a.watchdog_ms) == (
        True,
        "halt-poll",
        50000,
        "restart",
        500,
    )
    assert (b.dedicated, b.exits, b.restart, b.watchdog_ms) == (False, "normal", "halt-system", 0)
    assert cfg.log_dir == tree.resolve() / "logs"
    assert cfg.channels == ()


def test_channels_placed_from_the_channel_area(tree: Path) -> None:  # noqa: F811
    cfg = load_config(
        write(
            tree,
            two(
                tail='[channels.ab]\nbetween = ["a", "b"]\n'
                '[channels.big]\nbetween = ["b", "a"]\nsize = "64K"\ndirection = "b->a"\n'
                '[channels.fixed]\nbetween = ["a", "b"]\ngpa = 0xD0000000\n'
            ),
        )
    )
    ab, big, fixed = cfg.channels
    assert fixed == ChannelSpec("fixed", ("a", "b"), 4096, 0xD000_0000)
    assert ab == ChannelSpec("ab", ("a", "b"), 4096, 0xD000_1000)
    assert big == ChannelSpec("big", ("b", "a"), 64 << 10, 0xD000_2000, "b", "a")


def test_single_partition_format_still_valid(tree: Path) -> None:  # noqa: F811
    cfg = load_config(write(tree, '[partitions.demo]\nimage = "guests/hello.elf"\n'))
    assert cfg.channels == () and cfg.log_dir is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("dedicated = 1", "partitions.a.dedicated: expected true or false, got an integer 1"),
        ("dedicated = true", "partitions.a.dedicated: a dedicated partition needs pin"),
        ('exits = "fast"', 'partitions.a.exits: "fast" is not one of "normal" | "halt-poll"'),
        ('exits = "disabled"', 'partitions.a.exits: "disabled" needs dedicated = true'),
        ('restart = "always"', 'partitions.a.restart: "always" is not one of "stop"'),
        ("watchdog_ms = -1", "partitions.a.watchdog_ms: -1 is out of range (0..3600000)"),
        ("halt_poll_ns = 2000000000", "partitions.a.halt_poll_ns: 2000000000 is out of range"),
    ],
)
def test_bad_partition_policy(tree: Path, extra: str, expected: str) -> None:  # noqa: F811
    assert error(tree, two(extra)).startswith(expected)


def test_dedicated_cores_overlap(tree: Path) -> None:  # noqa: F811
    msg = error(tree, two(f"pin = [{C0}]\ndedicated = true", f"pin = [{C0}]"))
    assert msg == (
        f"partitions.a.pin: host core {C0} is dedicated to a but partition b is pinned there too"
    )


def test_shared_cores_without_dedication_are_fine(tree: Path) -> None:  # noqa: F811
    load_config(write(tree, two(f"pin = [{C0}]", f"pin = [{C0}]")))


def test_core_the_host_does_not_have(tree: Path) -> None:  # noqa: F811
    n = os.cpu_count() or 1
    msg = error(tree, two(f"pin = [{n}]\ndedicated = true"))
    assert msg.startswith(f"partitions.a.pin: host core {n} does not exist")


def test_total_memory_over_what_the_host_can_give(tree: Path) -> None:  # noqa: F811
    small = replace(gather(), mem_total=1 << 30, mem_available=24 << 20)
    path = write(tree, two())
    with pytest.raises(ConfigError) as info:
        load_config(path, host=small)
    assert str(info.value) == (
        f"{path}: partitions: total guest memory 32M is more than this host can give "
        "(MemAvailable 24M)"
    )
    old_kernel = replace(small, mem_available=None, mem_total=20 << 20)
    with pytest.raises(ConfigError, match=r"partitions: .* \(MemTotal 20M\)$"):
        load_config(path, host=old_kernel)


def test_duplicate_partition_name_is_clear(tree: Path) -> None:  # noqa: F811
    text = '[partitions.a]\nimage = "guests/hello.elf"\n[partitions.a]\nimage = "x"\n'
    assert error(tree, text) == "partitions.a: declared twice (line 3); names must be unique"


def test_duplicate_channel_name_is_clear(tree: Path) -> None:  # noqa: F811
    text = two(tail='[channels.c]\nbetween = ["a", "b"]\n[channels.c]\nbetween = ["a", "b"]\n')
    assert error(tree, text).startswith("channels.c: declared twice (line ")


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ('between = ["a", "z"]', 'channels.c.between: unknown partition "z" (known: a, b)'),
        ('between = ["a", "a"]', "channels.c.between: a channel joins two different partitions"),
        ('between = "a"', 'channels.c.between: expected two partition names, got "a"'),
        ("size = 4096", 'channels.c.between: missing (e.g. between = ["a", "b"])'),
        ('between = ["a", "b"]\nsize = "5000"', "channels.c.size: 5000 must be a non-zero"),
        (
            'between = ["a", "b"]\ngpa = 0xD0000010',
            "channels.c.gpa: 0xd0000010 is not a 4K-aligned address",
        ),
        (
            'between = ["a", "b"]\ngpa = 0x100000',
            "channels.c.gpa: 0x100000+4K overlaps partition a's RAM (0x0-0x1000000)",
        ),
        (
            'between = ["a", "b"]\ngpa = 0xFEE00000',
            "channels.c.gpa: 0xfee00000+4K overlaps the IOAPIC/LAPIC/firmware area",
        ),
        (
            'between = ["a", "b"]\ngpa = 0xC0002000',
            "channels.c.gpa: 0xc0002000+4K overlaps the virtio-mmio device windows",
        ),
        ('between = ["a", "b"]\ndirection = "a->c"', 'channels.c.direction: "a->c" is not "a->b"'),
        ('between = ["a", "b"]\ncolour = 1', 'channels.c: unknown key "colour"'),
        (
            'between = ["a", "b"]\ndoorbell = "python"',
            'channels.c.doorbell: "python" is not one of "kernel" | "thread"',
        ),
    ],
)
def test_bad_channel(tree: Path, channel: str, expected: str) -> None:  # noqa: F811
    msg = error(tree, two(tail=f"[channels.c]\n{channel}\n"))
    assert msg.startswith(expected), msg


def test_channel_gpa_overlaps_another_channel(tree: Path) -> None:  # noqa: F811
    text = two(
        tail='[channels.c]\nbetween = ["a", "b"]\ngpa = 0xE0000000\nsize = "8K"\n'
        '[channels.d]\nbetween = ["b", "a"]\ngpa = 0xE0001000\n'
    )
    assert error(tree, text) == (
        "channels.d.gpa: 0xe0001000+4K overlaps channel c (0xe0000000-0xe0002000)"
    )


def test_more_than_eight_channels_per_partition(tree: Path) -> None:  # noqa: F811
    tail = "".join(f'[channels.c{i}]\nbetween = ["a", "b"]\n' for i in range(9))
    assert error(tree, two(tail=tail)) == (
        "channels.c8: partition a has more than 8 channels (their doorbells use GSIs 16..23)"
    )


def test_log_dir_is_a_file(tree: Path) -> None:  # noqa: F811
    (tree / "afile").write_text("")
    msg = error(tree, two(tail='[system]\nlog_dir = "afile"\n'))
    assert msg == "system.log_dir: afile exists and is not a directory"
