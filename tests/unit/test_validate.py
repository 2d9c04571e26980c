"""Pure validation (config/validate.py) with host facts passed in, and the per-machine
resource map it places channels in (resources.py). The host facts here are values a
test chooses — a 4-core host, a host with 100M free — not a mock of anything."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from corevisor.config import HostFacts
from corevisor.config.validate import (
    API_KEYS,
    CLI_KEYS,
    Keys,
    validate_addition,
    validate_partition,
    validate_system,
)
from corevisor.errors import ConfigError
from corevisor.resources import VIRTIO_WINDOWS, Resources, Space, machine_map
from corevisor.spec import (
    ChannelSpec,
    ExitMode,
    HostPort,
    PartitionSpec,
    SerialSpec,
    SystemSpec,
)

HOST = HostFacts(cores=4, affinity=frozenset({0, 1, 2, 3}), mem_total=8 << 30,
                 mem_available=1 << 30, max_vcpus=8)
FILE = Keys(prefix="s.toml: ")


def part(name: str, **kw: object) -> PartitionSpec:
    args: dict[str, object] = {"image": Path("/g/hello.elf"), "memory": 16 << 20, **kw}
    return PartitionSpec(name=name, **args)  # type: ignore[arg-type]


def refused(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return str(info.value)


# ---------------------------------------------------------------------- one check, three wordings


@pytest.mark.parametrize(
    ("spec", "file_msg", "cli_msg"),
    [
        (part("a", cpus=9), "s.toml: partitions.a.cpus: 9 vCPUs, but this host's KVM allows 8",
         "--cpus: 9 vCPUs, but this host's KVM allows 8"),
        (part("a", pin=(4,)), "s.toml: partitions.a.pin: host core 4 does not exist (this host "
         "has cores 0-3)", "--pin: host core 4 does not exist (this host has cores 0-3)"),
        (part("a", memory=9 << 30), "s.toml: partitions.a.memory: 9G is more than this host's RAM "
         "(8G)", "--memory: 9G is more than this host's RAM (8G)"),
        (part("a", cmdline="x" * 4097), "s.toml: partitions.a.cmdline: 4097 bytes long (at most "
         "4096)", "--cmdline: 4097 bytes long (at most 4096)"),
        (part("a", gdb=HostPort("10.0.0.1", 1)), "s.toml: partitions.a.gdb: 10.0.0.1 is not a "
         "loopback address", "--gdb: 10.0.0.1 is not a loopback address"),
    ],
)
def test_the_same_check_names_the_key_or_the_option(
    spec: PartitionSpec, file_msg: str, cli_msg: str
) -> None:
    assert refused(validate_partition, spec, FILE, HOST).startswith(file_msg)
    assert refused(validate_partition, spec, CLI_KEYS, HOST).startswith(cli_msg)
    assert refused(validate_partition, spec, API_KEYS, HOST).startswith(
        file_msg.removeprefix("s.toml: ")
    )


def test_host_facts_decide_what_fits() -> None:
    two_cores = replace(HOST, cores=2, affinity=frozenset({1}))
    assert "is not available to corevisor (its CPU affinity allows cores 1)" in refused(
        validate_partition, part("a", pin=(0,)), FILE, two_cores
    )
    validate_partition(part("a", pin=(0,)), FILE, HOST)
    unknown = HostFacts(cores=1, affinity=frozenset({0}))  # nothing known about memory, KVM
    validate_partition(part("a", cpus=64, memory=64 << 30), FILE, unknown)


def test_exit_policy_needs_a_dedicated_partition() -> None:
    assert refused(validate_partition, part("a", exits=ExitMode.DISABLED), FILE, HOST) == (
        's.toml: partitions.a.exits: "disabled" needs dedicated = true'
    )
    validate_partition(part("a", pin=(1,), dedicated=True, exits=ExitMode.DISABLED), FILE, HOST)


# ---------------------------------------------------------------------- a partition added later


def running() -> SystemSpec:
    system = SystemSpec(
        (
            part("rtos", pin=(1,), dedicated=True, gdb=HostPort("127.0.0.1", 1234),
                 serial=SerialSpec.unix(Path("/run/rtos.sock"))),
            part("linux"),
        ),
        channels=(ChannelSpec("ab", ("rtos", "linux")),),
    )
    return validate_system(system, API_KEYS, HOST)


@pytest.mark.parametrize(
    ("new", "message"),
    [
        (part("linux"), "partitions.linux: a partition named linux already exists"),
        (part("web", pin=(1,)), "partitions.rtos.pin: host core 1 is dedicated to rtos but "
         "partition web is pinned there too"),
        (part("web", pin=(1,), dedicated=True), "partitions.rtos.pin: host core 1 is dedicated"),
        (part("web", gdb=HostPort("localhost", 1234)), "partitions.web.gdb: port 1234 is already "
         "the GDB port of partition rtos (partitions.rtos.gdb)"),
        (part("web", serial=SerialSpec.unix(Path("/run/./rtos.sock"))), "partitions.web.serial: "
         "unix:/run/rtos.sock is already the serial socket of partition rtos"),
        (part("web", memory=2 << 30), "partitions: total guest memory 2G is more than this host "
         "can give (MemAvailable 1G)"),
    ],
)
def test_a_new_partition_is_checked_against_the_running_ones(
    new: PartitionSpec, message: str
) -> None:
    assert refused(validate_addition, new, running(), HOST).startswith(message)


def test_a_new_partition_that_fits_gets_its_channels_placed() -> None:
    system = running()
    assert system.channels[0].gpa == 0xD000_0000
    new, channels = validate_addition(
        part("web", pin=(2,)),
        system,
        HOST,  # 1G available: the running partitions' memory is not counted again
        channels=(ChannelSpec("feed", ("rtos", "web")), ChannelSpec("talk", ("web", "linux"))),
    )
    assert new.name == "web"
    # ab (rtos-linux) holds 0xD0000000 in rtos and linux: feed (rtos-web) goes above it,
    # and talk (web-linux) above both ab (in linux) and feed (in web).
    assert [c.gpa for c in channels] == [0xD000_1000, 0xD000_2000]


def test_a_new_channel_cannot_take_a_running_channels_address() -> None:
    message = refused(
        validate_addition,
        part("web"),
        running(),
        HOST,
        channels=(ChannelSpec("feed", ("web", "rtos"), gpa=0xD000_0000),),
    )
    assert message == "channels.feed.gpa: 0xd0000000+4K overlaps channel ab (0xd0000000-0xd0001000)"


# ---------------------------------------------------------------------- the resource map


def test_machine_map_holds_the_fixed_parts() -> None:
    res = machine_map("a", 4 << 30)
    owners = [c.owner for c in res.claims(Space.GPA)]
    assert owners == [
        "partition a's RAM", VIRTIO_WINDOWS, "the IOAPIC/LAPIC/firmware area", "partition a's RAM"
    ]
    assert res.owner_of(Space.PIO, "com1").start == 0x3F8
    assert [c.start for c in res.claims(Space.GSI)] == [0, 4, 9]  # PIT, COM1, the ACPI SCI


@pytest.mark.parametrize(
    ("space", "start", "size", "message"),
    [
        (Space.GPA, 0xFEE0_0000, 0x1000, "x: 0xfee00000+4K overlaps the IOAPIC/LAPIC/firmware area "
         "(0xfec00000-0x100000000)"),
        (Space.GPA, 0x10_0000, 0x1000, "x: 0x100000+4K overlaps partition a's RAM (0x0-0x1000000)"),
        (Space.GPA, 0xC000_0000, 0x1000, "x: 0xc0000000+4K overlaps the virtio-mmio device windows "
         "(0xc0000000-0xc0009000)"),
        (Space.PIO, 0x3FC, 2, "x: port 0x3fc+2 overlaps com1 (0x3f8-0x3ff)"),
        (Space.GSI, 4, 1, "x: GSI 4 overlaps COM1 (4)"),
    ],
)
def test_an_overlap_names_both_claimants(space: Space, start: int, size: int, message: str) -> None:
    res = machine_map("a", 16 << 20)
    with pytest.raises(ConfigError) as info:
        res.claim(space, start, size, "x")
    assert str(info.value) == message


def test_allocation_takes_the_lowest_free_numbers() -> None:
    res = machine_map("a", 16 << 20)
    windows = [
        res.allocate(Space.GPA, 0x1000, f"dev{i}", pool=VIRTIO_WINDOWS, align=0x1000)
        for i in range(10)
    ]
    assert windows[:9] == [0xC000_0000 + i * 0x1000 for i in range(9)] and windows[9] is None
    gsis = [res.allocate_from(Space.GSI, (4, 5, 6), f"dev{i}") for i in range(3)]
    assert gsis == [5, 6, None]  # 4 is COM1's
    with pytest.raises(ConfigError, match="dev0 .* overlaps dev0|overlaps dev0"):
        res.claim(Space.GPA, 0xC000_0000, 0x1000, "late", pool=VIRTIO_WINDOWS)
    with pytest.raises(ConfigError, match="is outside the virtio-mmio device windows"):
        res.claim(Space.GPA, 0xD000_0000, 0x1000, "late", pool=VIRTIO_WINDOWS)


def test_a_shared_allocation_fits_both_maps() -> None:
    a, b = Resources("a"), Resources("b")
    a.claim(Space.GPA, 0x1000, 0x1000, "a's thing")
    b.claim(Space.GPA, 0x2000, 0x2000, "b's thing")
    assert a.allocate(Space.GPA, 0x1000, "shared", within=(0x1000, 0x10000), also=(b,)) == 0x4000
    assert b.conflict(Space.GPA, 0x4000, 1) is not None  # claimed in both


def test_the_names_other_code_imports_still_resolve() -> None:
    import corevisor
    from corevisor import config

    for name in config.__all__:
        assert getattr(config, name) is not None, name
    assert config.PartitionConfig is PartitionSpec and corevisor.SystemSpec is SystemSpec
    assert corevisor.load_config is config.load_config
