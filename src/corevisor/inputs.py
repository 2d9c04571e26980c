"""Every host file a user names, checked for its type and bounded before it is read.

A path from the command line or a system file can name anything: a FIFO (whose open
or read blocks until some writer shows up), a device (/dev/zero reads forever, opening
/dev/watchdog arms it), a directory, a sparse 30 GiB file, a symlink to any of those.
Every reader of such a path goes through this module, which decides *before reading a
byte* whether the file is what its use needs and whether its size is one that use can
legitimately have:

* ``stat_file`` / ``open_file`` / ``read_file`` / ``read_head``: regular files (guest
  images and kernels, initrds, system files, initramfs members, disk images). The path
  is opened with O_PATH (which never runs a device driver's open and never blocks),
  the type and size come from fstat on that descriptor, and the descriptor that is
  read is a reopening of the *same* inode through /proc/self/fd, so nothing can be
  swapped in between the check and the read (no TOCTOU). The reopened descriptor is
  O_NONBLOCK as well, and ``read_file`` reads at most what fstat reported, never
  "until EOF", so a file that grows while it is read is still bounded.
* ``open_output``: a ``file:`` serial target. Regular files and character devices (a
  terminal, /dev/null) make sense; a FIFO (a reader that stalls would stall a vCPU:
  use ``unix:``), a socket, a directory or a block device is refused. It is checked
  with stat before it is opened (so no device but a character device is ever opened),
  opened O_NONBLOCK (a FIFO cannot block the open), and judged again by fstat on the
  descriptor it will write.
* ``lock_file``: the lock a disk image is held under (see its docstring).

Failures raise the caller's error class (ConfigError while checking a configuration,
LoaderError while loading) with one line: ``LABEL REASON``, where LABEL is what the
caller shows for the file ("partitions.a.image: guests/x.elf") and REASON a predicate
("does not exist", "is a FIFO, not a regular file", "is 30G, more than the 64M ...").

What does not live here: what a file must contain (the loaders and config.py parse
it), output failures once a target is open (outputs.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corevisor.errors import ConfigError, CorevisorError

__all__ = [
    "OpenFile",
    "stat_file",
    "open_file",
    "read_file",
    "read_head",
    "open_output",
    "lock_file",
    "describe_type",
    "size_text",
    "MAX_SYSTEM_FILE",
]

# A system file describes at most a few dozen partitions: kilobytes. A megabyte is a
# generous bound that still keeps a mistaken path (a disk image, a log) from being
# parsed as TOML.
MAX_SYSTEM_FILE = 1 << 20

ErrorClass = type[CorevisorError]


@dataclass(frozen=True)
class Named:
    """How a message names a file: the key or option (``where``) and the path as the
    user wrote it (``shown``). Messages read ``WHERE: SHOWN does not exist``, ``WHERE:
    SHOWN is a FIFO, not a regular file``, ``WHERE: cannot use SHOWN: <strerror>``."""

    where: str
    shown: str = ""  # empty: where names the file itself (a serial target, "x.toml")

    def says(self, predicate: str) -> str:
        subject = ": ".join(part for part in (self.where, self.shown) if part)
        return f"{subject} {predicate}"

    def cannot(self, verb: str, why: str) -> str:
        if not self.shown:
            return f"{self.where}: cannot {verb}: {why}"
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}cannot {verb} {self.shown}: {why}"


Label = Named | str  # a bare string is a path shown with no key before it

_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISREG, "a regular file"),
)


def describe_type(mode: int) -> str:
    """What kind of file a st_mode says, for messages ("a FIFO")."""
    for test, name in _TYPES:
        if test(mode):
            return name
    return "an unknown kind of file"


def size_text(n: int) -> str:
    """64M, 30G, 1.5G; exact bytes below a mebibyte unless a whole number of K."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
        if n >= unit and unit > 1 << 10:
            return f"{n / unit:.1f}{suffix}"
    return f"{n} bytes"


def _named(label: Label) -> Named:
    return label if isinstance(label, Named) else Named(label)


def _os_error(label: Label, e: OSError, verb: str, error: ErrorClass) -> CorevisorError:
    """An OSError from opening or reading a path, as one line."""
    if e.errno == errno.ENOENT and verb != "open":  # opening to create: a missing dir
        return error(_named(label).says("does not exist"))
    return error(_named(label).cannot(verb, e.strerror or str(e)))


@dataclass(frozen=True)
class OpenFile:
    """A checked, open regular file: the descriptor, its fstat size, and its label."""

    fd: int
    size: int
    label: Label


def _fail(label: Label, predicate: str, error: ErrorClass) -> CorevisorError:
    return error(_named(label).says(predicate))


def _check_regular(st: os.stat_result, label: Label, limit: int | None, why: str,
                   error: ErrorClass) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _fail(label, f"is {describe_type(st.st_mode)}, not a regular file", error)
    if limit is not None and st.st_size > limit:
        raise _fail(
            label, f"is {size_text(st.st_size)}, more than the {size_text(limit)} {why}", error
        )


def _path_fd(
    path: Path | str, label: Label, follow: bool, error: ErrorClass, verb: str = "use"
) -> int:
    """An O_PATH descriptor: opens nothing but the name (no driver open, no blocking)."""
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(path, flags)
    except OSError as e:
        raise _os_error(label, e, verb, error) from None
    except ValueError:  # an embedded NUL: the config checks catch it first, but be safe
        raise _fail(label, "is not a valid path", error) from None


def stat_file(
    path: Path | str,
    label: Label,
    *,
    limit: int | None = None,
    why: str = "this file can be",
    follow: bool = True,
    error: ErrorClass = ConfigError,
) -> os.stat_result:
    """The stat of a regular file at most limit bytes, or one error line; reads nothing.

    ``why`` completes "more than the LIMIT ..." in the message ("a system file can be").
    """
    pfd, st = _checked(path, label, limit, why, follow, error)
    os.close(pfd)
    return st


def _checked(path: Path | str, label: Label, limit: int | None, why: str, follow: bool,
             error: ErrorClass, verb: str = "use") -> tuple[int, os.stat_result]:
    """An O_PATH descriptor of a regular file within limit, and its stat (caller closes)."""
    pfd = _path_fd(path, label, follow, error, verb)
    try:
        st = os.fstat(pfd)
        _check_regular(st, label, limit, why, error)
    except BaseException:
        os.close(pfd)
        raise
    return pfd, st


def _reopen(pfd: int, path: Path | str, st: os.stat_result, flags: int, label: Label,
            follow: bool, error: ErrorClass, verb: str) -> int:
    """Open the inode behind an O_PATH descriptor for I/O, without going by name again.

    /proc/self/fd/N names exactly that inode. Without /proc (a jail may lack it) the
    name is opened again and must lead to the same inode.
    """
    flags |= os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        try:
            fd = os.open(f"/proc/self/fd/{pfd}", flags)
        except FileNotFoundError:
            fd = os.open(path, flags | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        raise _os_error(label, e, verb, error) from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise _fail(label, "changed while it was being opened", error)
    return fd


def open_file(
    path: Path | str,
    label: Label,
    *,
    limit: int | None = None,
    why: str = "this file can be",
    writable: bool = False,
    follow: bool = True,
    error: ErrorClass = ConfigError,
) -> OpenFile:
    """Open a regular file (read-only, or read-write) after checking type and size.

    The caller owns ``OpenFile.fd`` and closes it. ``follow=False`` refuses a symlink
    (initramfs members: a link is archived as a link, never followed).
    """
    verb = "use" if writable else "read"
    pfd, st = _checked(path, label, limit, why, follow, error, verb)
    try:
        mode = os.O_RDWR if writable else os.O_RDONLY
        fd = _reopen(pfd, path, st, mode, label, follow, error, verb)
    finally:
        os.close(pfd)
    return OpenFile(fd, st.st_size, label)


def _read_exactly(f: OpenFile, n: int, error: ErrorClass) -> bytes:
    """At most n bytes from the start; fewer only if the file is shorter."""
    out = bytearray()
    try:
        while len(out) < n:
            chunk = os.pread(f.fd, min(n - len(out), 1 << 24), len(out))
            if not chunk:
                break
            out += chunk
    except OSError as e:
        raise _os_error(f.label, e, "read", error) from None
    return bytes(out)


def read_file(
    path: Path | str,
    label: Label,
    *,
    limit: int,
    why: str = "this file can be",
    follow: bool = True,
    error: ErrorClass = ConfigError,
) -> bytes:
    """The whole content of a regular file of at most limit bytes (what fstat said)."""
    f = open_file(path, label, limit=limit, why=why, follow=follow, error=error)
    try:
        return _read_exactly(f, min(f.size, limit), error)
    finally:
        os.close(f.fd)


def read_head(
    path: Path | str, label: Label, n: int, *, error: ErrorClass = ConfigError
) -> bytes:
    """The first n bytes of a regular file (fewer if it is shorter), for a magic check."""
    f = open_file(path, label, error=error)
    try:
        return _read_exactly(f, n, error)
    finally:
        os.close(f.fd)


@contextmanager
def _closing_on_error(fd: int) -> Iterator[int]:
    try:
        yield fd
    except BaseException:
        os.close(fd)
        raise


def _check_output_type(mode: int, label: Label, error: ErrorClass) -> None:
    if stat.S_ISREG(mode) or stat.S_ISCHR(mode):
        return
    live = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
    hint = " (for a live reader use unix:PATH)" if live else ""
    raise _fail(
        label,
        f"is {describe_type(mode)}: output goes to a regular file or a character device{hint}",
        error,
    )


def open_output(
    path: Path | str, label: Label, *, truncate: bool = False, error: ErrorClass = ConfigError
) -> int:
    """An fd appending to path (created if missing; emptied first with truncate): a
    regular file or a character device.

    The descriptor is blocking once checked (a terminal must not drop output on a busy
    moment); only the open itself is non-blocking. A regular file is truncated only
    once it is known to be one (O_TRUNC on the open would act before the check).
    """
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None  # created by the open below (or refused, if its directory is missing)
    except OSError as e:
        raise _os_error(label, e, "open", error) from None
    if st is not None:
        _check_output_type(st.st_mode, label, error)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO with no reader (it was swapped in after stat)
            raise _fail(label, "is a FIFO: output goes to a regular file or a "
                        "character device (for a live reader use unix:PATH)", error) from None
        raise _os_error(label, e, "open", error) from None
    with _closing_on_error(fd):
        mode = os.fstat(fd).st_mode
        _check_output_type(mode, label, error)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if truncate and stat.S_ISREG(mode):
            os.ftruncate(fd, 0)
    return fd


# --- locks ---------------------------------------------------------------------------------

# struct flock on x86-64: l_type, l_whence (shorts), padding, l_start, l_len (off_t),
# l_pid (pid_t), padding.
_FLOCK = struct.Struct("=hh4xqqi4x")
assert _FLOCK.size == 32


def _holders(st: os.stat_result) -> list[int]:
    """PIDs that hold a lock on the inode, from /proc/PID/fdinfo/* ("lock:" lines).

    An OFD lock belongs to an open file, not a process, so the lock query (F_OFD_GETLK)
    answers pid -1; the kernel still lists each open file's locks in its fdinfo.
    Best effort: processes we may not look into are skipped.
    """
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    found: list[int] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
                    text = f.read(1 << 16)
            except OSError:
                continue
            if any(ln.startswith("lock:") and key in ln for ln in text.splitlines()):
                found.append(pid)
                break
    return found


def _who(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read(64).strip()
    except OSError:
        comm = "?"
    return f"pid {pid} ({comm}{', this process' if pid == os.getpid() else ''})"


def lock_file(f: OpenFile, *, exclusive: bool, error: ErrorClass = ConfigError) -> None:
    """Take an open file description (OFD) lock on the whole file, or one error line.

    The rule QEMU applies to disk images: a writer needs the image to itself, readers
    may share it. So a read-write user takes an exclusive (write) lock and a read-only
    user a shared (read) lock; any two of them conflict unless both only read. OFD locks
    (F_OFD_SETLK) belong to the open file, so two opens in one process (two partitions
    of one system given the same disk) conflict too, and the lock goes away with the
    last descriptor of that open file, whatever ends the process. They are advisory:
    they stop other corevisor runs, and QEMU both ways for a writer (QEMU's shared
    byte-range locks, at bytes 100 and up, lie inside our whole-file range; a read-only
    corevisor beside a writing QEMU is not caught, as QEMU's locks are all shared), but
    not a plain ``dd``.
    """
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(f.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
        return
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise _os_error(f.label, e, "lock", error) from None
    probe = fcntl.fcntl(f.fd, fcntl.F_OFD_GETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    held = _FLOCK.unpack(probe)[0]
    how = "an exclusive (read-write)" if held == fcntl.F_WRLCK else "a shared (read-only)"
    pids = _holders(os.fstat(f.fd))
    by = ", ".join(_who(p) for p in pids) if pids else "another process"
    want = "read-write" if exclusive else "read-only"
    raise _fail(
        f.label,
        f"is in use: {by} holds {how} lock on it, so it cannot be opened {want} "
        "(a disk has one writer or any number of readers)",
        error,
    )
