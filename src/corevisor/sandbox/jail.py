"""The jail: `corevisor run --jail DIR --uid U --gid G` (root only).

Before any guest code runs, the VMM is moved where a bug in it can reach next to nothing:

1. new mount, IPC and PID namespaces (unshare); the process forks, and the child, PID 1
   of the new PID namespace, becomes the VMM while the parent waits for it, passes on
   SIGINT, SIGTERM and SIGHUP, and exits with its status;
2. a tmpfs mounted on DIR (in the new mount namespace only: nothing appears on the host
   and nothing is left when the run ends) holding only what the run needs, each at its
   own absolute path so the spec needs no rewriting: the images, initrds and modules
   (read-only bind mounts), the disks (read-write unless read-only), ``file:`` serial
   targets, the log directory and the directories of ``unix:`` sockets (read-write),
   ``/dev/kvm``, ``/dev/net/tun`` (with a TAP) and ``/dev/null`` as device nodes of its
   own owned by U:G (the host's nodes keep their owners), a read-only ``/proc`` of the
   new PID namespace (the halt rule reads a thread's context switches there), and the
   current directory (empty: relative paths resolve as before);
3. pivot_root into it, the old root detached; the tmpfs is then made read-only;
4. resource limits: RLIMIT_NOFILE and RLIMIT_AS sized from the system, RLIMIT_CORE 0
   (a core dump would hold guest memory);
5. setgroups([]), setgid(G), setuid(U): no capability survives, and no_new_privs
   (set with the seccomp filters) keeps it so.

The parent stays root, outside the PID namespace, so it is confined too: a filter of
its own allows it to wait, to signal its child (no other process), to write its one
line and to exit.

Everything the run will import is imported before the pivot: the interpreter's files
are not in the jail. The jail does not chown a file of the user's: images and disks
must be readable (writable) by U:G through their own permission bits; a ``file:``
target or the log directory it has to create belongs to U:G.

PID 1 of a namespace ignores a signal it has no handler for, even from itself; the
vCPU kick (signals.KICK_SIGNAL, unblocked only inside KVM_RUN) would be dropped, so the
jail gives it a handler that is never run (the kick is never delivered: signals.py).

What does not live here: the seccomp filters (enforce.py, policy.py), which the CLI
installs after the jail, as the unprivileged user.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import pkgutil
import resource
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from corevisor.errors import CorevisorError, show
from corevisor.spec import SerialKind, SystemSpec

__all__ = ["JailSpec", "enter", "limits"]

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155
OLD_ROOT = ".old-root"
# RLIMIT_AS: guest RAM and channels are mapped once each; the interpreter, its heap and
# the threads' stacks and malloc arenas need the rest (measured: docs/sandbox.md).
AS_BASE = 1 << 30
AS_PER_THREAD = 80 << 20
NOFILE_BASE = 256
NOFILE_PER_PARTITION = 64

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(CorevisorError):
    """The jail cannot be built (not root, a bad DIR or user, a mount refused)."""


@dataclass(frozen=True)
class JailSpec:
    """What the jail holds: paths bound read-only and read-write, device nodes, limits."""

    root: Path
    uid: int
    gid: int
    ro: tuple[Path, ...] = ()
    rw: tuple[Path, ...] = ()
    create_files: tuple[Path, ...] = ()  # rw files to create (as U:G) if missing
    create_dirs: tuple[Path, ...] = ()  # rw directories to create (as U:G) if missing
    devices: tuple[str, ...] = ("/dev/kvm", "/dev/null")
    nofile: int = NOFILE_BASE
    address_space: int = AS_BASE
    cwd: Path = field(default_factory=Path.cwd)


def _err(what: str) -> JailError:
    e = ctypes.get_errno()
    return JailError(f"jail: {what}: {os.strerror(e)}")


def limits(system: SystemSpec) -> tuple[int, int]:
    """(RLIMIT_NOFILE, RLIMIT_AS) for system: fds per partition; address space for the
    guests' RAM and channels plus the interpreter and every thread it may start."""
    parts = system.partitions
    threads = 4 + sum(p.cpus + p.virtio.count + 2 for p in parts)
    memory = sum(p.memory for p in parts) + sum(c.size for c in system.channels)
    nofile = NOFILE_BASE + NOFILE_PER_PARTITION * len(parts)
    return nofile, memory + AS_BASE + AS_PER_THREAD * threads


def plan(system: SystemSpec, root: Path, uid: int, gid: int) -> tuple[SystemSpec, JailSpec]:
    """What the jail must hold for system; the spec gets a log_dir if it needs one."""
    ro: list[Path] = []
    rw: list[Path] = []
    files: list[Path] = []
    dirs: list[Path] = []
    devices = ["/dev/kvm", "/dev/null"]
    for p in system.partitions:
        if p.vfio:
            raise JailError(f"jail: partition {p.name} passes {p.vfio[0]} through (vfio), "
                            "which the jail cannot hold yet (no /dev/vfio, no sysfs): run it "
                            "without --jail (the seccomp sandbox still applies)")
        ro.extend(f for f in (p.image, p.bios) if f is not None)
        if p.initrd is not None:
            ro.append(p.initrd)
        ro.extend(m.path for m in p.modules)
        for blk in p.virtio.blk:
            (ro if blk.readonly else rw).append(blk.path)
        if p.virtio.net and "/dev/net/tun" not in devices:
            devices.append("/dev/net/tun")
        if p.serial.kind is SerialKind.FILE and p.serial.path is not None:
            files.append(p.serial.path)
        if p.serial.kind is SerialKind.UNIX and p.serial.path is not None:
            dirs.append(p.serial.path.parent)
        if p.gdb is not None and p.gdb.host == "localhost":
            ro.extend(Path(f) for f in ("/etc/hosts", "/etc/nsswitch.conf") if Path(f).exists())
    # System's own rule for a shared console with log files (system.py, __init__)
    shared = len(system.partitions) != 1 or system.log_dir is not None
    if shared:
        log_dir = system.log_dir
        if log_dir is None:  # System would make a temp dir; make it here, outside the jail
            log_dir = Path(tempfile.mkdtemp(prefix="corevisor-logs-"))
            os.chown(log_dir, uid, gid)
            system = replace(system, log_dir=log_dir)
        dirs.append(log_dir)
    nofile, address_space = limits(system)
    ro = [q for q in ro if not str(q).startswith("/proc/")]  # memfds: reached via /proc
    spec = JailSpec(root, uid, gid, tuple(ro), tuple(rw), tuple(files), tuple(dirs),
                    tuple(devices), nofile, address_space)
    return system, spec


def preload() -> None:
    """Import every corevisor module (and what they import) while the files are there."""
    import corevisor

    for mod in pkgutil.walk_packages(corevisor.__path__, "corevisor."):
        if mod.name.endswith("__main__"):
            continue
        importlib.import_module(mod.name)
    for name in ("encodings.idna", "traceback", "linecache", "ipaddress", "tempfile",
                 "selectors", "termios", "faulthandler"):
        importlib.import_module(name)


def _precheck(root: Path, uid: int, gid: int) -> None:
    """What must hold before anything is created for the jail."""
    if os.geteuid() != 0:
        raise JailError("--jail needs root: it creates namespaces, mounts and device nodes, "
                        "then drops to --uid/--gid")
    if uid == 0 or gid == 0:
        raise JailError("--uid/--gid 0: the jail drops to an unprivileged user, not root")
    if not root.is_dir():
        raise JailError(f"--jail {show(root)}: not a directory")
    if root.resolve() == Path("/"):
        raise JailError("--jail /: the jail needs a directory of its own")


def _check(spec: JailSpec) -> None:
    for path in (*spec.ro, *spec.rw):
        if not path.exists():
            raise JailError(f"jail: {show(path)}: does not exist")


def _enc(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags),
                   _enc(data)) != 0:
        raise _err(f"mount {show(source)} on {show(target)}")


def _inside(root: Path, path: Path) -> Path:
    """Where path is in the jail, written as it was (a ".." in it still needs the
    directory before it: Path.mkdir(parents=True) creates it)."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    return root / str(absolute).lstrip("/")


def _bind(root: Path, path: Path, readonly: bool) -> None:
    """Bind path at the same place in the jail (a file onto a file, a dir onto a dir)."""
    target = _inside(root, path)
    if target.exists():  # named twice (two partitions, one image): bound already
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        target.mkdir()
    else:
        target.touch()
    _mount(str(path), str(target), None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    _mount(None, str(target), None, flags)


def _node(root: Path, device: str, uid: int, gid: int) -> None:
    st = os.stat(device)
    target = _inside(root, Path(device))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(target, stat.S_IFCHR | 0o660, st.st_rdev)
    os.chown(target, uid, gid)
    os.chmod(target, 0o666 if device == "/dev/null" else 0o660)


def _create_owned(spec: JailSpec) -> None:
    """The rw files and directories the run creates, made (on the host) as U:G."""
    for d in spec.create_dirs:
        if not d.exists():
            d.mkdir(parents=True)
            os.chown(d, spec.uid, spec.gid)
    for f in spec.create_files:
        if not f.exists():
            f.touch()
            os.chown(f, spec.uid, spec.gid)


def _build_root(spec: JailSpec) -> None:
    root = spec.root
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    _mount("corevisor-jail", str(root), "tmpfs", MS_NOSUID, "mode=0755,size=1m")
    for path in spec.ro:
        _bind(root, path, readonly=True)
    for path in (*spec.rw, *spec.create_files, *spec.create_dirs):
        _bind(root, path, readonly=False)
    for device in spec.devices:
        _node(root, device, spec.uid, spec.gid)
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    _mount("proc", str(proc), "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _inside(root, spec.cwd).mkdir(parents=True, exist_ok=True)
    (root / OLD_ROOT).mkdir()
    if _libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), str(root).encode(),
                     str(root / OLD_ROOT).encode()) != 0:
        raise _err(f"pivot_root into {show(root)}")
    os.chdir("/")
    if _libc.umount2(f"/{OLD_ROOT}".encode(), MNT_DETACH) != 0:
        raise _err("detaching the old root")
    os.rmdir(f"/{OLD_ROOT}")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    os.chdir(spec.cwd)


def _limit(spec: JailSpec) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.nofile, spec.nofile))
    resource.setrlimit(resource.RLIMIT_AS, (spec.address_space, spec.address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _drop(spec: JailSpec) -> None:
    os.setgroups([])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        raise JailError("jail: still able to become root after dropping privileges")


def _confine_parent(child: int) -> None:
    """The parent stays root outside the jail: it gets a filter of its own, allowing
    little beyond waiting for its child and signalling it (and no other process)."""
    from corevisor.sandbox import enforce, policy
    from corevisor.sandbox.bpf import Allow, ArgIn, Rule, build, install
    from corevisor.sandbox.syscalls import NUMBERS

    enforce.reporter()
    names = (*policy.BASE, "wait4", "rt_sigaction", "newfstatat", "fstat", "ioctl", "lseek")
    rules: dict[int, Rule] = {NUMBERS[n]: Allow() for n in names}
    rules[NUMBERS["kill"]] = ArgIn(0, frozenset({child}))
    rules[NUMBERS["ioctl"]] = ArgIn(1, frozenset({policy.TCGETS, policy.TIOCGWINSZ}))
    install(build(rules))


def _wait_for(child: int) -> NoReturn:
    """The parent's whole life after the fork: pass signals on, exit as the child did."""

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    _confine_parent(child)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        killer = os.WTERMSIG(status)
        print(f"corevisor: jail: the VMM was killed by {signal.Signals(killer).name}",
              file=sys.stderr, flush=True)
        os._exit(128 + killer)
    os._exit(os.waitstatus_to_exitcode(status))


def enter(system: SystemSpec, root: Path, uid: int, gid: int) -> SystemSpec:
    """Build the jail and return in it, as U:G, in a child process (the parent never
    returns: it exits with the child's status). Returns the spec to run."""
    root = Path(os.path.abspath(root))
    _precheck(root, uid, gid)
    system, spec = plan(system, root, uid, gid)
    _check(spec)
    preload()
    _create_owned(spec)
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID) != 0:
        raise _err("unshare (mount, IPC and PID namespaces)")
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child != 0:
        _wait_for(child)
    try:
        from corevisor.signals import KICK_SIGNAL

        signal.signal(KICK_SIGNAL, lambda signum, frame: None)  # PID 1: see the docstring
        _build_root(spec)
        _limit(spec)
        _drop(spec)
    except (OSError, CorevisorError) as e:
        message = e if isinstance(e, CorevisorError) else f"jail: {e.strerror or e}"
        print(f"corevisor: {message}", file=sys.stderr, flush=True)
        os._exit(2)
    return system
