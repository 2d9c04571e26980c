"""inputs.py against real hostile files: FIFOs, devices, sockets, links, huge sparse files.

Each case is a file a user could name by mistake or on purpose. The checks must
answer with one error naming it, before anything blocks or is read whole. The FIFO
cases would hang the test if the module ever opened a FIFO for reading or writing
the blocking way; that is the regression they guard.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corevisor import inputs
from corevisor.errors import ConfigError, LoaderError

GiB = 1 << 30


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """One of every kind of file that is not a plain regular file."""
    paths = {
        "fifo": tmp_path / "fifo",
        "dir": tmp_path / "dir",
        "socket": tmp_path / "sock",
        "chardev": tmp_path / "null-node",
        "blockdev": tmp_path / "loop-node",
        "zero-link": tmp_path / "zero-link",
        "dangling": tmp_path / "dangling",
        "loop": tmp_path / "loop-a",
    }
    os.mkfifo(paths["fifo"])
    paths["dir"].mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(paths["socket"]))
    os.mknod(paths["chardev"], stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    os.mknod(paths["blockdev"], stat.S_IFBLK | 0o600, os.makedev(7, 0))  # like /dev/loop0
    paths["zero-link"].symlink_to("/dev/zero")
    paths["dangling"].symlink_to(tmp_path / "nowhere")
    paths["loop"].symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(paths["loop"])
    yield paths
    sock.close()


EXPECTED = {
    "fifo": "is a FIFO, not a regular file",
    "dir": "is a directory, not a regular file",
    "socket": "is a socket, not a regular file",
    "chardev": "is a character device, not a regular file",
    "blockdev": "is a block device, not a regular file",
    "zero-link": "is a character device, not a regular file",
    "dangling": "does not exist",
    "loop": "Too many levels of symbolic links",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
@pytest.mark.parametrize(
    "reader",
    [
        lambda p: inputs.read_file(p, "LBL", limit=GiB),
        lambda p: inputs.read_head(p, "LBL", 64),
        lambda p: inputs.stat_file(p, "LBL"),
        lambda p: os.close(inputs.open_file(p, "LBL", writable=True).fd),
    ],
    ids=["read_file", "read_head", "stat_file", "open_file-rw"],
)
def test_every_reader_refuses_what_is_not_a_regular_file(
    hostile: dict[str, Path], kind: str, reader: Callable[[Path], object]
) -> None:
    with pytest.raises(ConfigError) as exc:
        reader(hostile[kind])
    assert str(exc.value).startswith(("LBL ", "LBL: "))
    assert EXPECTED[kind] in str(exc.value)


def test_the_error_class_is_the_callers(hostile: dict[str, Path]) -> None:
    with pytest.raises(LoaderError, match="^k is a FIFO"):
        inputs.read_file(hostile["fifo"], "k", limit=10, error=LoaderError)


def test_a_huge_sparse_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(30 * GiB)
    with pytest.raises(ConfigError, match=r"^big is 30G, more than the 64M of the guest's RAM$"):
        inputs.read_file(big, "big", limit=64 << 20, why="of the guest's RAM")


def test_at_the_limit_is_read_and_one_byte_more_is_not(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 4096)
    assert inputs.read_file(f, "f", limit=4096) == b"x" * 4096
    with pytest.raises(ConfigError, match="is 4K, more than the 4095 bytes"):
        inputs.read_file(f, "f", limit=4095)


def test_read_head_of_a_short_file_and_an_empty_one(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"\x7fEL")
    assert inputs.read_head(f, "f", 0x206) == b"\x7fEL"
    f.write_bytes(b"")
    assert inputs.read_head(f, "f", 0x206) == b""


def test_a_symlink_to_a_regular_file_is_followed_unless_refused(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.write_bytes(b"data")
    link = tmp_path / "l"
    link.symlink_to(target)
    assert inputs.read_file(link, "l", limit=10) == b"data"
    with pytest.raises(ConfigError, match="^l is a symbolic link, not a regular file"):
        inputs.read_file(link, "l", limit=10, follow=False)


def test_over_long_paths_and_nul_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^long: cannot read: File name too long"):
        inputs.read_file(tmp_path / ("x" * 5000), "long", limit=10)
    with pytest.raises(ConfigError, match="not a valid path"):
        inputs.read_file("a\0b", "nul", limit=10)


def test_a_memfd_through_proc_is_a_regular_file() -> None:
    """--initramfs-dir hands the loader /proc/self/fd/N of a memfd."""
    fd = os.memfd_create("t")
    try:
        os.write(fd, b"cpio")
        assert inputs.read_file(f"/proc/self/fd/{fd}", "rd", limit=100) == b"cpio"
    finally:
        os.close(fd)


def test_open_file_is_the_inode_that_was_checked(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    opened = inputs.open_file(f, "f")
    try:
        assert os.fstat(opened.fd).st_ino == f.stat().st_ino
        assert opened.size == 3
        assert os.get_blocking(opened.fd) is False
    finally:
        os.close(opened.fd)


# --- file: serial targets ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dir", "socket", "blockdev"])
def test_output_refuses_what_would_stall_or_make_no_sense(
    hostile: dict[str, Path], kind: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        inputs.open_output(hostile[kind], "OUT")
    assert f"OUT is {inputs.describe_type(os.lstat(hostile[kind]).st_mode)}" in str(exc.value)


def test_output_to_a_fifo_with_a_reader_is_refused_too(hostile: dict[str, Path]) -> None:
    reader = os.open(hostile["fifo"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(ConfigError, match="is a FIFO.*unix:PATH"):
            inputs.open_output(hostile["fifo"], "OUT")
    finally:
        os.close(reader)


def test_output_to_a_regular_file_or_a_character_device(
    tmp_path: Path, hostile: dict[str, Path]
) -> None:
    new = tmp_path / "new.log"
    fd = inputs.open_output(new, "OUT")
    os.write(fd, b"hi")
    os.close(fd)
    fd = inputs.open_output(new, "OUT")  # appends
    os.write(fd, b"!")
    assert os.get_blocking(fd)
    os.close(fd)
    assert new.read_bytes() == b"hi!"
    for dev in (hostile["chardev"], Path("/dev/null"), hostile["zero-link"]):
        os.close(inputs.open_output(dev, "OUT"))


def test_truncated_output_empties_only_a_regular_file(
    tmp_path: Path, hostile: dict[str, Path]
) -> None:
    log = tmp_path / "run.log"
    log.write_bytes(b"last run")
    fd = inputs.open_output(log, "LOG", truncate=True)
    os.write(fd, b"this run")
    os.close(fd)
    assert log.read_bytes() == b"this run"
    os.close(inputs.open_output(hostile["chardev"], "LOG", truncate=True))


def test_output_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^OUT: cannot open: No such file"):
        inputs.open_output(tmp_path / "no" / "x", "OUT")


# --- an initramfs tree: every member read by the same rules, the whole archive bounded -----


def test_initramfs_members_that_would_block_are_archived_as_nodes(tmp_path: Path) -> None:
    from corevisor.loader.initramfs import build_initramfs

    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo")
    (root / "zero").symlink_to("/dev/zero")
    (root / "f").write_bytes(b"content")
    archive = build_initramfs(root, mtime=0)
    assert b"fifo" in archive and b"/dev/zero" in archive and b"content" in archive
    assert len(archive) < 4096  # /dev/zero was not followed


def test_initramfs_bound_counts_data_and_headers(tmp_path: Path) -> None:
    from corevisor.loader.initramfs import build_initramfs

    root = tmp_path / "root"
    root.mkdir()
    (root / "big").write_bytes(bytes(64 << 10))
    with pytest.raises(LoaderError, match=r"^initramfs: .*/big: the archive would be more than"):
        build_initramfs(root, limit=32 << 10)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(200):  # empty files: only their headers count
        (many / f"f{i:03}").touch()
    with pytest.raises(LoaderError, match="the archive would be more than"):
        build_initramfs(many, limit=16 << 10)
    assert build_initramfs(many, limit=64 << 10)


def test_without_proc_the_name_is_reopened_and_must_be_the_same_inode(tmp_path: Path) -> None:
    """A jail may have no /proc: the fallback reopens the name and checks the inode."""
    import subprocess
    import sys

    f = tmp_path / "f"
    f.write_bytes(b"abc")
    (tmp_path / "l").symlink_to(f)
    script = (
        "import os, sys\n"
        "from corevisor import inputs\n"
        "assert not os.path.exists('/proc/self/fd')\n"
        f"print(inputs.read_file({str(tmp_path / 'l')!r}, 'l', limit=10).decode())\n"
        f"os.close(inputs.open_file({str(f)!r}, 'f', writable=True).fd)\n"
    )
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'umount -l /proc && exec "$0" -c "$1"', sys.executable, script],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "abc\n"
