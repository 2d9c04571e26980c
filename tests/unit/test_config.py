"""Configuration loading: valid files, and one test per error a user can make."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corevisor.config import (
    format_cpu_list,
    load_config,
    parse_cpu_list,
    parse_size,
    partition_from_args,
)
from corevisor.errors import ConfigError
from corevisor.spec import PartitionSpec, SerialKind, SerialSpec, SystemSpec
from tests.kvm.images import pvh_elf

ALLOWED = sorted(os.sched_getaffinity(0))
NCPUS = os.cpu_count() or 1


def host_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory with a (magic-only) ELF guest and a non-ELF file next to the TOML."""
    (tmp_path / "guests").mkdir()
    (tmp_path / "guests" / "hello.elf").write_bytes(pvh_elf(b"\xf4"))
    (tmp_path / "guests" / "notes.txt").write_text("not a guest\n")
    return tmp_path


def write(tree: Path, text: str) -> Path:
    path = tree / "system.toml"
    path.write_text(text)
    return path


def error(tree: Path, text: str) -> str:
    path = write(tree, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


DEMO = '[partitions.demo]\nimage = "guests/hello.elf"\n'


# ------------------------------------------------------------------ valid files


def test_minimal_file_gets_defaults(tree: Path) -> None:
    cfg = load_config(write(tree, DEMO))
    assert cfg == SystemSpec(
        partitions=(
            PartitionSpec(name="demo", image=(tree / "guests" / "hello.elf").resolve()),
        ),
        source=tree / "system.toml",
    )
    part = cfg.partitions[0]
    assert (part.cpus, part.memory, part.pin, part.cmdline, part.serial) == (
        1,
        64 << 20,
        (),
        "",
        SerialSpec(SerialKind.STDOUT),
    )


def test_full_file(tree: Path) -> None:
    core = ALLOWED[0]
    cfg = load_config(
        write(
            tree,
            f"""
[partitions.rtos]
image = "guests/hello.elf"
cpus = 2
memory = "32M"
pin = [{core}]
cmdline = "exit=0"
serial = "file:logs/rtos.log"

[partitions.linux-2]
image = "{tree / "guests" / "hello.elf"}"
memory = 8388608
pin = "{core}"
serial = "unix:/tmp/x.sock"
""",
        )
    )
    rtos, linux = cfg.partitions
    assert rtos.name == "rtos"
    assert (rtos.cpus, rtos.memory, rtos.pin, rtos.cmdline) == (2, 32 << 20, (core,), "exit=0")
    assert rtos.serial == SerialSpec.file(tree.resolve() / "logs" / "rtos.log")
    assert linux.name == "linux-2"
    assert (linux.memory, linux.pin, linux.serial) == (
        8 << 20,
        (core,),
        SerialSpec.unix(Path("/tmp/x.sock")),
    )


def test_one_core_per_vcpu(tree: Path) -> None:
    pin = [ALLOWED[0]] * 3
    cfg = load_config(write(tree, DEMO + f"cpus = 3\npin = {pin}\n"))
    assert cfg.partitions[0].pin == tuple(pin)


def test_config_is_frozen(tree: Path) -> None:
    cfg = load_config(write(tree, DEMO))
    with pytest.raises(AttributeError):
        cfg.partitions[0].cpus = 4  # type: ignore[misc]


# ------------------------------------------------------------------ file-level errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_toml_syntax_error_has_line(tree: Path) -> None:
    msg = error(tree, DEMO + "cpus = = 2\n")
    assert msg.startswith("TOML syntax error:")
    assert "line 3" in msg


def test_no_partitions(tree: Path) -> None:
    assert "no partitions" in error(tree, "")
    assert "no partitions" in error(tree, "[partitions]\n")


def test_unknown_top_level_key(tree: Path) -> None:
    assert error(tree, 'debug = true\n' + DEMO) == (
        'unknown key "debug" (known: partitions, channels, system)'
    )


def test_partitions_not_a_table(tree: Path) -> None:
    assert error(tree, "partitions = 3\n") == "partitions: expected a table, got an integer"


def test_bad_partition_name(tree: Path) -> None:
    msg = error(tree, '[partitions.Demo]\nimage = "guests/hello.elf"\n')
    assert msg == 'partitions."Demo": bad partition name "Demo" (use [a-z][a-z0-9_-]{0,31})'
    assert "bad partition name" in error(tree, f'[partitions.{"a" * 33}]\nimage = "x"\n')


def test_partition_not_a_table(tree: Path) -> None:
    assert error(tree, "[partitions]\ndemo = 1\n") == (
        "partitions.demo: expected a table, got an integer"
    )


def test_unknown_partition_key(tree: Path) -> None:
    assert error(tree, DEMO + "cpu = 2\n") == (
        'partitions.demo: unknown key "cpu" (known: image, cpus, memory, pin, cmdline, serial, '
        "dedicated, exits, halt_poll_ns, restart, watchdog_ms, initrd, modules, gdb, blk, net, "
        "rng, virtio_console, transport, devices, bios, vfio)"
    )


def test_missing_image(tree: Path) -> None:
    assert error(tree, "[partitions.demo]\ncpus = 1\n").startswith(
        'partitions.demo: missing key "image"'
    )


# ------------------------------------------------------------------ image


def test_image_does_not_exist(tree: Path) -> None:
    msg = error(tree, '[partitions.demo]\nimage = "guests/x.elf"\n')
    assert msg == "partitions.demo.image: guests/x.elf does not exist"


def test_image_not_elf(tree: Path) -> None:
    msg = error(tree, '[partitions.demo]\nimage = "guests/notes.txt"\n')
    # the loader's own answer (loader.identify_image), with the key in front
    assert msg == "partitions.demo.image: guests/notes.txt: not an ELF image (bad magic)"


def test_image_is_a_directory(tree: Path) -> None:
    msg = error(tree, '[partitions.demo]\nimage = "guests"\n')
    assert msg == "partitions.demo.image: guests is a directory, not a regular file"


def test_image_wrong_type(tree: Path) -> None:
    msg = error(tree, "[partitions.demo]\nimage = 5\n")
    assert msg == "partitions.demo.image: expected a string, got an integer 5"


def test_image_is_relative_to_the_toml_not_cwd(
    tree: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    cfg = load_config(write(tree, DEMO))
    assert cfg.partitions[0].image == (tree / "guests" / "hello.elf").resolve()


# ------------------------------------------------------------------ cpus


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("300", "partitions.demo.cpus: 300 is more than the 64 vCPUs corevisor allows"),
        ("0", "partitions.demo.cpus: 0 vCPUs (a partition needs at least 1)"),
        ('"2"', 'partitions.demo.cpus: expected an integer, got a string "2"'),
        ("true", "partitions.demo.cpus: expected an integer, got a boolean true"),
        ("1.5", "partitions.demo.cpus: expected an integer, got a float 1.5"),
    ],
)
def test_bad_cpus(tree: Path, value: str, expected: str) -> None:
    assert error(tree, DEMO + f"cpus = {value}\n") == expected


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            '"64Q"',
            'bad size "64Q" (use a number of bytes or a suffix K, M, G: 64M)',
        ),
        ('"1M"', "1M is less than the 2M minimum"),
        ('"65G"', "65G is more than the 64G maximum"),
        ("4198401", "4198401 bytes is not a multiple of 4K (guest pages)"),
        ("-4096", "bad size -4096 (sizes cannot be negative)"),
        ("1.5", "bad size 1.5 (use a number of bytes or a suffix K, M, G: 64M)"),
        ('"64MB"', 'bad size "64MB" (use a number of bytes or a suffix K, M, G: 64M)'),
    ],
)
def test_bad_memory(tree: Path, value: str, expected: str) -> None:
    assert error(tree, DEMO + f"memory = {value}\n") == f"partitions.demo.memory: {expected}"


def test_memory_more_than_host_ram(tree: Path) -> None:
    ram = host_ram()
    size = (ram // (1 << 30) + 1) << 30
    if size > 64 << 30:
        pytest.skip("this host has more RAM than corevisor's 64G maximum")
    msg = error(tree, DEMO + f'memory = "{size >> 30}G"\n')
    assert msg.startswith(f"partitions.demo.memory: {size >> 30}G is more than this host's RAM (")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4096, 4096), ("2M", 2 << 20), ("64m", 64 << 20), ("1G", 1 << 30), ("8K", 8192), ("12", 12)],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value, "x") == expected


# ------------------------------------------------------------------ pin


def test_pin_core_does_not_exist(tree: Path) -> None:
    msg = error(tree, DEMO + f"pin = [{NCPUS + 5}]\n")
    assert msg == (
        f"partitions.demo.pin: host core {NCPUS + 5} does not exist "
        f"(this host has cores {format_cpu_list(range(NCPUS))})"
    )


def test_pin_count_must_match(tree: Path) -> None:
    pin = [ALLOWED[0]] * 2
    msg = error(tree, DEMO + f"cpus = 3\npin = {pin}\n")
    assert msg == (
        "partitions.demo.pin: 2 cores for 3 vCPUs "
        "(give one core for all vCPUs, or exactly one per vCPU)"
    )


def test_pin_wrong_types(tree: Path) -> None:
    assert error(tree, DEMO + 'pin = ["0"]\n') == (
        'partitions.demo.pin[0]: expected an integer, got a string "0"'
    )
    assert error(tree, DEMO + "pin = 0\n") == (
        "partitions.demo.pin: expected an array of core numbers, got an integer 0"
    )
    assert error(tree, DEMO + 'pin = "zero"\n') == (
        'partitions.demo.pin: bad CPU list "zero" (use e.g. 0,1 or 0-3 or 0,2-3)'
    )


def test_pin_outside_affinity(tree: Path) -> None:
    if len(ALLOWED) < 2:
        pytest.skip("needs two usable host cores")
    # Narrow this thread's affinity (what sched_getaffinity(0) reports) for the check.
    os.sched_setaffinity(0, {ALLOWED[0]})
    try:
        msg = error(tree, DEMO + f"pin = [{ALLOWED[1]}]\n")
    finally:
        os.sched_setaffinity(0, ALLOWED)
    assert msg == (
        f"partitions.demo.pin: host core {ALLOWED[1]} is not available to corevisor "
        f"(its CPU affinity allows cores {ALLOWED[0]})"
    )


@pytest.mark.parametrize(
    ("text", "cores"),
    [("0,1", (0, 1)), ("0-3", (0, 1, 2, 3)), ("0,2-3", (0, 2, 3)), (" 5 ", (5,))],
)
def test_parse_cpu_list(text: str, cores: tuple[int, ...]) -> None:
    assert parse_cpu_list(text, "--pin") == cores


@pytest.mark.parametrize("text", ["", "a", "1,", "3-1", "-1", "0-999999999"])
def test_parse_cpu_list_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="^--pin: "):
        parse_cpu_list(text, "--pin")


def test_format_cpu_list() -> None:
    assert format_cpu_list([3, 0, 1, 2, 6, 8, 9]) == "0-3,6,8-9"
    assert format_cpu_list([]) == "none"


# ------------------------------------------------------------------ cmdline and serial


def test_cmdline_too_long(tree: Path) -> None:
    msg = error(tree, DEMO + f'cmdline = "{"x" * 4097}"\n')
    assert msg == "partitions.demo.cmdline: 4097 bytes long (at most 4096)"


def test_cmdline_with_nul(tree: Path) -> None:
    msg = error(tree, DEMO + 'cmdline = "a\\u0000b"\n')
    assert msg == "partitions.demo.cmdline: contains a NUL character"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"tty"', 'bad serial "tty" (use stdout, null, file:PATH or unix:PATH)'),
        ('"file:"', '"file:" needs a path after file:'),
        ("1", "expected a string, got an integer 1"),
    ],
)
def test_bad_serial(tree: Path, value: str, expected: str) -> None:
    assert error(tree, DEMO + f"serial = {value}\n") == f"partitions.demo.serial: {expected}"


def test_unix_socket_path_too_long(tree: Path) -> None:
    msg = error(tree, DEMO + f'serial = "unix:/tmp/{"s" * 120}"\n')
    assert "(Unix sockets allow at most 107)" in msg


# ------------------------------------------------------------------ command line


def test_partition_from_args(tree: Path) -> None:
    image = str(tree / "guests" / "hello.elf")
    part = partition_from_args(image, cpus=2, memory="16M", pin=str(ALLOWED[0]), cmdline="x=1")
    assert part == PartitionSpec(
        name="hello",
        image=Path(image),
        cpus=2,
        memory=16 << 20,
        pin=(ALLOWED[0],),
        cmdline="x=1",
    )


def test_partition_from_args_name_from_odd_file_names(tree: Path) -> None:
    odd = tree / "9 Lives.ELF"
    odd.write_bytes(pvh_elf(b"\xf4"))
    assert partition_from_args(str(odd)).name == "vm-9-lives"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"memory": "64Q"}, '--memory: bad size "64Q" (use a number of bytes or a suffix'),
        ({"cpus": 65}, "--cpus: 65 is more than the 64 vCPUs corevisor allows"),
        ({"pin": "0-"}, '--pin: bad CPU list "0-"'),
        ({"pin": f"{NCPUS + 3}"}, f"--pin: host core {NCPUS + 3} does not exist"),
        ({"serial": "com1"}, '--serial: bad serial "com1"'),
        ({"name": "Bad Name"}, '--name: bad partition name "Bad Name"'),
        ({"cmdline": "a\0b"}, "--cmdline: contains a NUL character"),
    ],
)
def test_partition_from_args_errors(
    tree: Path, kwargs: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        partition_from_args(str(tree / "guests" / "hello.elf"), **kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(expected)


def test_partition_from_args_missing_image(tree: Path) -> None:
    with pytest.raises(ConfigError, match="^image: guests/x.elf does not exist$"):
        partition_from_args("guests/x.elf")
