"""Tests for loader/initramfs.py: archives are checked by the real `cpio -idv`.

The reference reader is Debian's cpio (scripts/install-system-deps installs it): an
archive it extracts into the same tree (names, types, modes, contents, link targets,
device numbers, mtimes) is one the kernel's unpacker reads too, since both follow the
same newc layout.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from corevisor.errors import LoaderError
from corevisor.loader.initramfs import (
    Entry,
    build_initramfs,
    char_device,
    directory,
    entries_from_directory,
    entries_from_files,
    regular,
    symlink,
    write_newc,
)

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(
    CPIO is None, reason="cpio is missing: run scripts/install-system-deps"
)
IS_ROOT = os.geteuid() == 0


def extract(archive: bytes, dest: Path) -> str:
    """Unpack with the real cpio (-m keeps mtimes); return its listing (stderr of -v)."""
    assert CPIO is not None
    dest.mkdir()
    done = subprocess.run(
        [CPIO, "-idmv", "--no-absolute-filenames", "--quiet"],
        input=archive,
        cwd=dest,
        capture_output=True,
        check=True,
    )
    return done.stderr.decode()


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """A comparable description of a tree: per path, type, mode and content."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", perm, p.read_bytes(), int(st.st_mtime))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", perm)
            else:
                out[rel] = (kind, perm, os.major(st.st_rdev), os.minor(st.st_rdev))
    return out


def make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "etc" / "deep" / "er").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "etc" / "empty").write_bytes(b"")
    (root / "etc" / "odd").write_bytes(b"x" * 4097)  # not a multiple of 4
    (root / "etc" / "deep" / "er" / "n a m e").write_bytes(bytes(range(256)))
    (root / "etc" / "secret").write_bytes(b"s")
    (root / "etc" / "secret").chmod(0o600)
    (root / "sh").symlink_to("bin/tool")
    (root / "dangling").symlink_to("/nowhere/at/all")
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.utime(p, (1_600_000_000, 1_600_000_000))


@needs_cpio
def test_directory_round_trips_through_real_cpio(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    if IS_ROOT:
        os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mkfifo(src / "fifo", 0o644)
    archive = write_newc(entries_from_directory(src))
    listing = extract(archive, tmp_path / "out")
    assert tree(tmp_path / "out") == tree(src)
    assert "sh" in listing.split()


@needs_cpio
def test_file_list_adds_parents_and_device_nodes(tmp_path: Path) -> None:
    host = tmp_path / "host"
    make_tree(host)
    files = {"/usr/local/bin/t": host / "bin" / "tool", "init": host / "etc" / "odd"}
    extra = [char_device("dev/console", 5, 1), directory("dev")]
    entries = [extra[1], extra[0], *entries_from_files(files, mtime=7)]
    out = tmp_path / "out"
    extract(write_newc(entries), out)
    assert (out / "usr" / "local" / "bin" / "t").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "usr" / "local" / "bin" / "t").stat().st_mode) == 0o755
    assert (out / "init").stat().st_mtime == 7
    assert (out / "usr").is_dir()
    if IS_ROOT:
        st = (out / "dev" / "console").lstat()
        assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 5 and os.minor(st.st_rdev) == 1


@needs_cpio
def test_build_initramfs_adds_dev_console(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    listing = extract(build_initramfs(src, mtime=0), tmp_path / "out")
    assert "dev/console" in listing.split()


def test_layout_bytes_by_hand() -> None:
    archive = write_newc([regular("a", b"xyz", 0o640, mtime=0x10), symlink("b", "a")])
    head = archive[:110]
    assert head[:6] == b"070701"
    fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _, _, _, _, namesize, check = fields
    assert (ino, mode, uid, gid, nlink, mtime, size, namesize, check) == (
        1, 0o100640, 0, 0, 1, 0x10, 3, 2, 0,
    )
    # 110-byte header + "a\0" pads to 112, then "xyz" pads to 4
    assert archive[110:116] == b"a\0xyz\0"
    assert archive.endswith(b"TRAILER!!!\0" + b"\0" * (-(110 + 11) % 4))
    assert len(archive) % 4 == 0


@pytest.mark.parametrize(
    "entries, message",
    [
        ([regular("a", b""), regular("/a", b"")], "a is in the archive twice"),
        ([regular("../x", b"")], "bad member name"),
        ([regular("", b"")], "bad member name"),
        ([Entry("big", stat.S_IFREG, b"", mtime=1 << 33)], "does not fit newc"),
    ],
)
def test_bad_members_are_refused(entries: list[Entry], message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        write_newc(entries)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="is not a directory"):
        entries_from_directory(tmp_path / "missing")
