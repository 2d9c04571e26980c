"""User input at the config/CLI edge that used to end in a traceback, a usage dump, raw
control characters on the terminal, or silence (issue 9, classes 4, 5 and 6).

Each case goes in as a user would give it — a command line, bytes that are not UTF-8,
a system file — and the test checks what the user sees: exit status 2 and exactly one
line starting "corevisor:", printable, naming the culprit. No KVM is needed: every case
is refused before a VM exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corevisor import cli
from corevisor.config import load_config
from corevisor.console import open_serial
from corevisor.errors import ConfigError, LoaderError, quote, show
from corevisor.loader.initramfs import entries_from_directory
from corevisor.spec import SerialSpec
from tests.kvm.images import pvh_elf

ROOT = Path(__file__).resolve().parents[2]
LONG = "/tmp/" + "x" * 5000  # far beyond NAME_MAX and PATH_MAX: ENAMETOOLONG


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "hello.elf").write_bytes(pvh_elf(b"\xf4"))
    (tmp_path / "disk.img").write_bytes(bytes(1024))
    (tmp_path / "kernel").write_bytes(pvh_elf(b"\xf4"))
    return tmp_path


def one_line(stderr: str, *needles: str) -> str:
    """The single corevisor: line of stderr, checked safe to print."""
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("corevisor: "), stderr
    assert all(ch.isprintable() for ch in lines[0]), repr(lines[0])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status = cli.main(list(argv))
    out = capsys.readouterr()
    assert status == cli.EXIT_USER_ERROR, out
    return one_line(out.err)


def run_bytes(*argv: bytes) -> str:
    """corevisor in a child process, with argv as raw bytes (not necessarily UTF-8)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"corevisor.cli", *argv],
        capture_output=True,
        env=env,
        timeout=60,
    )
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == cli.EXIT_USER_ERROR, err
    assert r.stderr.isascii() or "\ufffd" not in err, err  # we print text, never raw bytes
    return one_line(err)


# ---------------------------------------------------------------------- class 4


def test_command_lines_that_are_not_utf8(tree: Path) -> None:
    img = os.fsencode(tree / "hello.elf")
    cases = {
        (b"run", img, b"--cmdline", b"quiet \xff\xfe"): "--cmdline: not valid UTF-8",
        (b"run", img, b"--net", b"tap\xff"): '--net: "tap\\xff" is not a network interface',
        (b"run", img, b"--memory", b"64\xffM"): '--memory: bad size "64\\xffM"',
        (b"run", img, b"--serial", b"tt\xe9"): '--serial: bad serial "tt\\xe9"',
        (b"run", img, b"--gdb", b"127.0.0.1:\xff"): "--gdb: bad port",
        (b"run", img, b"--pin", b"0,\xff"): "--pin: bad CPU list",
        (b"run", b"/nonexistent/\xff\xfe.elf"): "image: /nonexistent/\\xff\\xfe.elf does not exist",
        (b"run", img, b"--cpus", b"\xff"): "invalid int value",
        (b"run", img, b"--bogus\xff"): "unrecognized arguments: --bogus\\xff",
    }
    for argv, needle in cases.items():
        assert needle in run_bytes(*argv), argv


def test_over_long_paths_are_refused_by_name(
    capsys: pytest.CaptureFixture[str], tree: Path
) -> None:
    img = str(tree / "hello.elf")
    cases = {
        ("run", img, "--initrd", LONG): "--initrd: cannot use /tmp/xxx",
        ("run", "--kernel", img, "--initramfs-dir", LONG): "--initramfs-dir: cannot use",
        ("run", LONG): "image: cannot use",
        ("run", "--kernel", LONG): "image: cannot use",
        ("run", img, "--disk", LONG): "--disk: cannot use",
        ("run", img, "--serial", "unix:" + LONG): "(Unix sockets allow at most 107)",
        ("run", LONG + ".toml"): "cannot read: File name too long",
    }
    for argv, needle in cases.items():
        line = run(capsys, *argv)
        assert needle in line and len(line) < 600, line  # the path is shown elided


@pytest.mark.parametrize(
    "key",
    [
        'image = "LONG"',
        'image = "hello.elf"\ninitrd = "LONG"',
        'image = "hello.elf"\nblk = [{path = "LONG"}]',
        'image = "hello.elf"\n[system]\nlog_dir = "LONG"',
    ],
)
def test_over_long_paths_in_a_system_file(tree: Path, key: str) -> None:
    path = tree / "s.toml"
    path.write_text("[partitions.a]\n" + key.replace("LONG", LONG) + "\n")
    with pytest.raises(ConfigError, match="cannot use .*File name too long"):
        load_config(path)


def test_over_long_serial_file_path_fails_when_opened() -> None:
    with pytest.raises(ConfigError, match='^demo: serial "file:/tmp/x.*": cannot open: File name'):
        open_serial(SerialSpec.file(Path(LONG)), "demo")


def _deep_tree(root: Path, depth: int) -> None:
    """depth nested one-letter directories under root (by fd: no path gets long)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("leaf", os.O_CREAT | os.O_WRONLY, dir_fd=fd), "w") as f:
            f.write("x")
    finally:
        os.close(fd)


def _remove_deep_tree(root: Path) -> None:
    """Undo _deep_tree without recursion (shutil.rmtree recurses, as the walk used to)."""
    fds = [os.open(root, os.O_RDONLY)]
    while True:
        try:
            fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
        except FileNotFoundError:
            break
    with_leaf = fds.pop()
    os.unlink("leaf", dir_fd=with_leaf)
    os.close(with_leaf)
    while fds:
        fd = fds.pop()
        os.rmdir("d", dir_fd=fd)
        os.close(fd)


@pytest.mark.parametrize("depth", [1500, 2600])
def test_deep_initramfs_directory(tmp_path: Path, depth: int) -> None:
    """Deeper than Python's recursion limit: archived; deeper than PATH_MAX: one error."""
    root = tmp_path / "root"
    root.mkdir()
    _deep_tree(root, depth)
    try:
        if len(str(root)) + 2 * depth + len("/leaf") < 4096:
            entries = entries_from_directory(root, mtime=0)
            assert len(entries) == depth + 1
            assert entries[-1].path.endswith("/d/leaf") and entries[-1].data == b"x"
            assert [e.path.count("/") for e in entries] == list(range(depth + 1))
        else:
            with pytest.raises(LoaderError, match="initramfs: cannot .*File name too long"):
                entries_from_directory(root, mtime=0)
    finally:
        _remove_deep_tree(root)


@pytest.mark.parametrize(
    "value",
    [
        "[" * 2000 + "]" * 2000,  # arrays
        "{a = " * 1500 + "1" + "}" * 1500,  # inline tables
        "[{a = [" * 700 + "1" + "]}]" * 700,  # both
    ],
)
def test_deeply_nested_toml(tree: Path, value: str) -> None:
    path = tree / "s.toml"
    path.write_text(f'[partitions.a]\nimage = "hello.elf"\ncmdline = {value}\n')
    with pytest.raises(ConfigError, match=r"s\.toml: values nested too deeply for a system file$"):
        load_config(path)


def test_moderately_nested_toml_still_gets_the_usual_message(tree: Path) -> None:
    path = tree / "s.toml"
    path.write_text('[partitions.a]\nimage = "hello.elf"\ncmdline = [[["x"]]]\n')
    with pytest.raises(ConfigError, match="cmdline: expected a string, got an array"):
        load_config(path)


# ---------------------------------------------------------------------- class 5


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ((), "the following arguments are required: command (see corevisor --help)"),
        (("fly",), "invalid choice: 'fly'"),
        (("run", "--bogus"), "unrecognized arguments: --bogus"),
        (("run", "x.elf", "--memory"), "run: argument --memory: expected one argument"),
        (("run", "x.elf", "--cpus", "two"), "run: argument --cpus: invalid int value: 'two'"),
        (("run", "x.elf", "--timeout", "soon"), "invalid float value: 'soon'"),
        (("run", "--kernel", "k", "--initrd", "i", "--initramfs-dir", "d"), "not allowed with"),
        (("guests", "--frobnicate"), "unrecognized arguments: --frobnicate"),
    ],
)
def test_argparse_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], needle: str
) -> None:
    assert needle in run(capsys, *argv)


def test_help_still_prints_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--help"])
    assert info.value.code == 0 and "usage: corevisor run" in capsys.readouterr().out


def test_control_characters_in_paths_and_names_are_escaped(
    capsys: pytest.CaptureFixture[str], tree: Path
) -> None:
    cases = {
        ("run", "evil\x1b[2J\x1b[31m.elf"): "image: evil\\e[2J\\e[31m.elf does not exist",
        ("run", "two\nlines.elf"): "image: two\\nlines.elf does not exist",
        ("run", str(tree / "hello.elf"), "--gdb", "x\x1b]0;pwned\x07:1"): '"x\\e]0;pwned\\x07"',
        ("run", str(tree / "hello.elf"), "--initrd", "rd\r\x7f"): "--initrd: rd\\r\\x7f does",
        ("run", str(tree / "hello.elf"), "--disk", "d\u2028isk"): "d\\u2028isk does not exist",
        ("run", str(tree / "hello.elf"), "--serial", "tty\x9b1m"): 'bad serial "tty\\x9b1m"',
        ("run", "--kernel", str(tree / "kernel"), "--initramfs-dir", "a\tb"): "a\\tb is not a",
        ("run", "--\x1b[5m"): "unrecognized arguments: --\\e[5m",
    }
    for argv, needle in cases.items():
        assert needle in run(capsys, *argv), argv


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[partitions."a\\u001b[2J"]\nimage = "x"\n', 'partitions."a\\\\e[2J": bad partition'),
        ('[partitions.a]\nimage = "ev\\nil.elf"\n', "partitions.a.image: ev\\nil.elf does not"),
        ('[partitions.a]\nimage = "a\\u0000b"\n', 'partitions.a.image: "a\\0b" is not a valid'),
        ('[partitions.a]\nimage = "hello.elf"\n"k\\u001b" = 1\n', 'unknown key "k\\e"'),
        ('[partitions.a]\nimage = "hello.elf"\nexits = "\\u009b"\n', '"\\x9b" is not one of'),
        ('[partitions.a]\nimage = "hello.elf"\nserial = "file:\\u0000"\n', "contains a NUL"),
        ('[channels."c\\r"]\nbetween = ["a", "b"]\n[partitions.a]\nimage = "hello.elf"\n',
         'channels."c\\\\r": bad channel name "c\\\\r"'),
    ],
)
def test_control_characters_in_a_system_file_are_escaped(
    capsys: pytest.CaptureFixture[str], tree: Path, text: str, needle: str
) -> None:
    path = tree / "s.toml"
    path.write_text(text)
    assert needle.replace("\\\\", "\\") in run(capsys, "run", str(path))


def test_show_and_quote() -> None:
    assert show("plain/path") == "plain/path"
    assert show("a\nb\x1b[0m\x00\x7f\x85\udcff") == "a\\nb\\e[0m\\0\\x7f\\x85\\xff"
    assert show(b"raw\xff") == "raw\\xff"
    assert show("\u00e9t\u00e9") == "\u00e9t\u00e9"  # printable Unicode is left alone
    elided = show("x" * 1000)
    assert len(elided) < 300 and "(1000 characters)" in elided
    assert quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert quote("\x1b") == '"\\e"' and quote(True) == "true" and quote(5) == "5"


# ---------------------------------------------------------------------- class 6


@pytest.mark.parametrize(
    ("option", "key"),
    [
        (("--memory", "32M"), "memory"),
        (("--serial", "null"), "serial"),
        (("--serial", "stdout"), "serial"),  # even the default, given explicitly
        (("--cmdline", "exit=1"), "cmdline"),
        (("--cmdline", ""), "cmdline"),
        (("--cpus", "1"), "cpus"),
        (("--pin", "0"), "pin"),
        (("--gdb", "127.0.0.1:1234"), "gdb"),
        (("--disk", "disk.img"), "blk"),
        (("--net", "tap0"), "net"),
        (("--rng",), "rng"),
    ],
)
def test_per_partition_options_with_a_system_file_are_refused(
    capsys: pytest.CaptureFixture[str], tree: Path, option: tuple[str, ...], key: str
) -> None:
    path = tree / "s.toml"
    path.write_text('[partitions.a]\nimage = "hello.elf"\n')
    line = run(capsys, "run", str(path), *option)
    assert line == (
        f"corevisor: {option[0]} cannot be combined with a system file ({path}): "
        f"give each partition a {key} key instead"
    )


def test_per_partition_options_with_the_demo_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The demo (no target) is a system file too.
    assert "--memory cannot be combined with a system file" in run(capsys, "run", "--memory", "1G")


def _two(tree: Path, a: str, b: str) -> Path:
    path = tree / "s.toml"
    path.write_text(
        f'[partitions.a]\nimage = "hello.elf"\n{a}\n[partitions.b]\nimage = "hello.elf"\n{b}\n'
    )
    return path


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ('serial = "unix:con.sock"', 'serial = "unix:con.sock"'),
        ('serial = "unix:con.sock"', 'serial = "unix:./con.sock"'),
        ('serial = "unix:con.sock"', 'serial = "unix:TREE/con.sock"'),
        ('serial = "unix:sub/../con.sock"', 'serial = "unix:con.sock"'),
    ],
)
def test_two_partitions_on_one_unix_socket(tree: Path, a: str, b: str) -> None:
    path = _two(tree, a, b.replace("TREE", str(tree)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: partitions.b.serial: unix:/"), message
    assert message.endswith(
        f"con.sock is already the serial socket of partition a ({path}: partitions.a.serial)"
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ('gdb = "127.0.0.1:4444"', 'gdb = "127.0.0.1:4444"'),
        ('gdb = "127.0.0.1:4444"', 'gdb = "localhost:4444"'),
        ('gdb = "[::1]:4444"', 'gdb = "127.0.0.2:4444"'),
    ],
)
def test_two_partitions_on_one_gdb_port(tree: Path, a: str, b: str) -> None:
    path = _two(tree, a, b)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: partitions.b.gdb: port 4444 is already the GDB port of partition a "
        f"({path}: partitions.a.gdb)"
    )


def test_different_sockets_and_ports_are_fine(tree: Path) -> None:
    path = _two(
        tree,
        'serial = "unix:a.sock"\ngdb = "127.0.0.1:4444"',
        'serial = "unix:b.sock"\ngdb = "127.0.0.1:4445"',
    )
    assert [p.name for p in load_config(path).partitions] == ["a", "b"]
