"""Building an initramfs: a cpio archive in the "newc" format, written in pure Python.

Linux unpacks the initrd it is given into its root file system when the archive is a
newc cpio (Documentation/driver-api/early-userspace/buffer-format.rst), so a Linux
guest's whole user space can come from a host directory without root, mknod or the
cpio tool: ``corevisor run --kernel K --initramfs-dir D``.

The format, per member: the ASCII magic "070701", thirteen 8-digit hex fields (ino,
mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
namesize including its NUL, check = 0), the name, NUL padding to a multiple of 4, the
data (a symlink's data is its target), padding to 4 again; the archive ends with a
member named "TRAILER!!!". Owners are always root (uid/gid 0) because the guest has
no use for the host's ids; every member gets its own inode number and nlink 1 (2 for
directories), so the kernel never mistakes two files for hard links. Parents come
before their children, because the kernel creates members in archive order.

What does not live here: putting the archive in guest RAM (initrd.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from corevisor import inputs
from corevisor.errors import LoaderError, quote, show

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_FIELDS = 13
_HEADER_SIZE = 6 + 8 * _HEADER_FIELDS
assert _HEADER_SIZE == 110
# newc sizes are 32-bit, and Linux wants its initrd below 4 GiB.
MAX_INITRAMFS = 4 << 30


@dataclass(frozen=True)
class Entry:
    """One archive member. mode carries the file type bits (stat.S_IFREG, ...).

    data is a regular file's contents or a symlink's target; rdev is (major, minor)
    of a device node.
    """

    path: str
    mode: int
    data: bytes = b""
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)


def regular(path: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> Entry:
    return Entry(path, stat.S_IFREG | mode, data, mtime)


def directory(path: str, mode: int = 0o755, mtime: int = 0) -> Entry:
    return Entry(path, stat.S_IFDIR | mode, b"", mtime)


def symlink(path: str, target: str, mtime: int = 0) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode(), mtime)


def char_device(path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    """A character device node, e.g. char_device("dev/console", 5, 1) for early init."""
    return Entry(path, stat.S_IFCHR | mode, b"", 0, (major, minor))


def _archive_name(path: str) -> str:
    """Members are relative ("bin/sh"), as the kernel and cpio -i expect."""
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise LoaderError(f"initramfs: bad member name {quote(path)}")
    return "/".join(parts)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(ino: int, entry: Entry, name: str) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        entry.mtime,
        len(entry.data),
        0,  # devmajor (of the file system the member came from: meaningless here)
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(encoded),
        0,  # check (only "070702" archives carry a checksum)
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise LoaderError(f"initramfs: {show(name)}: field value {value} does not fit newc")
    header = NEWC_MAGIC + b"".join(b"%08x" % v for v in fields)
    return (
        header
        + encoded
        + _pad4(_HEADER_SIZE + len(encoded))
        + entry.data
        + _pad4(len(entry.data))
    )


def write_newc(entries: Iterable[Entry]) -> bytes:
    """The newc archive of entries, in order, with the trailer; duplicate names refused."""
    out = bytearray()
    seen: set[str] = set()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        name = _archive_name(entry.path)
        if name in seen:
            raise LoaderError(f"initramfs: {show(name)} is in the archive twice")
        seen.add(name)
        out += _member(ino, entry, name)
    out += _member(0, Entry(TRAILER, 0), TRAILER)
    return bytes(out)


class Budget:
    """What is left of the archive's size bound, charged before each member is read.

    Every member costs its header and name too, so a tree of a million empty files is
    bounded as well as one huge file.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def charge(self, name: str, size: int, host: Path) -> None:
        cost = _HEADER_SIZE + len(name) + 4 + size + 3
        if cost > self.left:
            raise LoaderError(
                f"initramfs: {show(host)}: the archive would be more than "
                f"{inputs.size_text(self.limit)}, the most this guest can take (its RAM)"
            )
        self.left -= cost


def _entry_from_host(name: str, host: Path, mtime: int | None, budget: Budget) -> Entry:
    """One member from a host file (not following symlinks)."""
    try:
        st = host.lstat()
        when = int(st.st_mtime) if mtime is None else mtime
        mode = stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode)
        budget.charge(name, st.st_size if stat.S_ISREG(st.st_mode) else 0, host)
        if stat.S_ISREG(st.st_mode):
            # Read by the same rules as every input: the lstat above only chose the
            # member's kind; a file swapped for a FIFO, device or link is refused.
            data = inputs.read_file(
                host, inputs.Named("initramfs", show(host)), limit=st.st_size,
                why="it was when listed", follow=False, error=LoaderError,
            )
            return Entry(name, mode, data, when)
        if stat.S_ISLNK(st.st_mode):
            return Entry(name, mode, os.fsencode(os.readlink(host)), when)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            return Entry(name, mode, b"", when, rdev)
        return Entry(name, mode, b"", when)  # directory, fifo, socket
    except OSError as e:
        raise LoaderError(f"initramfs: cannot read {show(host)}: {e.strerror or e}") from e


def entries_from_directory(
    root: Path, mtime: int | None = None, limit: int = MAX_INITRAMFS
) -> list[Entry]:
    """Every file under root (root itself excluded), parents first, sorted by name.

    mtime=None keeps the files' own times; a number makes the archive reproducible.
    Symlinks are stored as links, never followed. The walk keeps its own stack, so a
    tree of any depth is archived (or refused for a path the host cannot open), never
    a RecursionError. More than limit bytes of archive is refused before the member
    that would cross it is read.
    """
    budget = Budget(limit)
    try:
        is_dir = stat.S_ISDIR(os.stat(root).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as e:
        raise LoaderError(f"initramfs: cannot use {show(root)}: {e.strerror or e}") from e
    if not is_dir:
        raise LoaderError(f"initramfs: {show(root)} is not a directory")
    entries: list[Entry] = []
    # Each frame: a directory's children still to visit (reversed, so pop() is in order).
    stack: list[tuple[Path, str, list[str]]] = [(root, "", _children(root))]
    while stack:
        d, prefix, children = stack[-1]
        if not children:
            stack.pop()
            continue
        child = children.pop()
        host = d / child
        name = f"{prefix}{child}"
        entry = _entry_from_host(name, host, mtime, budget)
        entries.append(entry)
        if stat.S_ISDIR(entry.mode):  # lstat's mode: a symlink to a directory is a link
            stack.append((host, name + "/", _children(host)))
    return entries


def _children(d: Path) -> list[str]:
    """d's entries, sorted and reversed for popping in name order."""
    try:
        return sorted(os.listdir(d), reverse=True)
    except OSError as e:
        raise LoaderError(f"initramfs: cannot list {show(d)}: {e.strerror or e}") from e


def entries_from_files(
    files: Mapping[str, Path], mtime: int | None = None, limit: int = MAX_INITRAMFS
) -> list[Entry]:
    """Members named by the mapping's keys with the host files' contents and modes.

    Parent directories that are not listed are added (mode 0755) before their first
    child, so the kernel can create every member.
    """
    entries: list[Entry] = []
    have: set[str] = set()
    budget = Budget(limit)
    for name in sorted(files, key=lambda n: _archive_name(n).split("/")):
        clean = _archive_name(name)
        parts = clean.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in have:
                have.add(parent)
                entries.append(directory(parent, mtime=mtime or 0))
        have.add(clean)
        entries.append(_entry_from_host(clean, files[name], mtime, budget))
    return entries


def build_initramfs(
    root: Path, extra: Iterable[Entry] = (), mtime: int | None = None, limit: int = MAX_INITRAMFS
) -> bytes:
    """A newc archive of a directory tree plus extra members (device nodes, say); at most
    limit bytes of members are read (the guest's RAM, say).

    /dev/console is added when the tree lacks it: without it the kernel cannot open
    init's stdin/stdout and a busybox init prints nothing.
    """
    entries = entries_from_directory(root, mtime, limit)
    entries += list(extra)
    names = {_archive_name(e.path) for e in entries}
    if "dev/console" not in names:
        if "dev" not in names:
            entries.append(directory("dev"))
        entries.append(char_device("dev/console", 5, 1))
    return write_newc(entries)
