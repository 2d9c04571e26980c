"""Running one command in the L1 guest: QEMU's command line, the per-run share, the outcome.

One run is one boot: a per-run directory on the host (shared with the guest over 9p
as tag "lab") carries in the command script (the caller's environment, working
directory and argv) and the list of writable shares, and carries out the command's
stdout, stderr and exit status; QEMU's serial console goes to a file there too. The
command's output is streamed to the caller while it runs (polled from those files),
and the run ends when QEMU exits (the guest's init powers off) or the timeout kills it.

Every way a run can fail without the command's own status is a LabError with one
message and its own exit status (Exit), so `lab/run` prints one "lab:"
line and bench/ scripts can tell a lab problem from a failing command.

What does not live here: the kernel and modules (kernel.py), the initramfs and the
init script (initramfs.py, init.sh), bytecode (pycache.py), argument parsing (cli.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from corevisor.errors import LoaderError
from lab import pycache
from lab.initramfs import BusyboxNotFound, l1_initramfs
from lab.kernel import KernelNotFound, ModuleNotFound, find_kernel

__all__ = ["Exit", "LabError", "LabResult", "run", "cache_dir", "EDU_BDF"]

class Exit(enum.IntEnum):
    """lab/run's own exit statuses, one per kind of failure (a command's status passes through)."""

    NO_IOMMU = 118  # --iommu, but the L1 guest has no IOMMU group
    SETUP = 119  # the host lacks something else (busybox-static), a bad option or directory
    NO_QEMU = 120  # qemu-system-x86_64 is not installed
    NO_KERNEL = 121  # no packaged kernel (linux-image-amd64) with its modules
    MODULE = 122  # a module did not load in the L1 guest
    NO_KVM = 123  # /dev/kvm is missing in the L1 guest
    TIMEOUT = 124  # the run took longer than --timeout (QEMU killed)
    L1_FAILED = 125  # the L1 guest stopped without a status (panic, mount failure, QEMU error)


QEMU = "qemu-system-x86_64"
# The L1 kernel's command line. quiet: the console is a file nobody reads unless a run
# fails; panic=-1 with -no-reboot: a panic ends QEMU at once instead of hanging the run.
L1_CMDLINE = "console=ttyS0 quiet panic=-1 rdinit=/init"
NINEP_ROOT_TAG = "hostroot"
EDU_SLOT = 4
EDU_BDF = f"0000:00:{EDU_SLOT:02x}.0"  # where --iommu puts QEMU's edu device (bound to vfio-pci)
# Where the guest mounts its own tmpfs over the host's root (lab/init.sh mounts these).
TMPFS_DIRS = ("/tmp", "/run", "/var/tmp", "/dev/shm")
_INIT_ERROR = re.compile(rb"lab-init: error (\w+): (.*)")
_INIT_STATUS = {"module": Exit.MODULE, "kvm": Exit.NO_KVM, "iommu": Exit.NO_IOMMU}
_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1
# Variables that describe the caller's session, not the command's environment: they
# would point at sockets, fds or directories the L1 guest does not have.
_DROPPED_ENV = frozenset({
    "_", "PWD", "OLDPWD", "SHLVL", "TMPDIR", "DISPLAY", "WAYLAND_DISPLAY", "XDG_RUNTIME_DIR",
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "TMUX",
    "TMUX_PANE", "DBUS_SESSION_BUS_ADDRESS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL",
    "PYTEST_CURRENT_TEST", "PYTHONDONTWRITEBYTECODE",
})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LabError(Exception):
    """The lab could not run the command to its end; status is lab/run's exit status."""

    def __init__(self, message: str, status: int, console: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.console = console  # the L1 console, when the guest got that far


@dataclass(frozen=True)
class LabResult:
    """What a command did in the L1 guest, and how long the whole run took."""

    status: int
    stdout: bytes
    stderr: bytes
    seconds: float
    console: bytes  # the L1 kernel's console (quiet: little unless something went wrong)


def cache_dir() -> Path:
    """Where the lab keeps its initramfs and bytecode: never in the repository."""
    if "LAB_CACHE_DIR" in os.environ:
        return Path(os.environ["LAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corevisor-lab"


class _Tail:
    """Copy what a growing file gains to a sink (and keep it), from where it was."""

    def __init__(self, path: Path, sink: BinaryIO | None) -> None:
        self.path = path
        self.sink = sink
        self.data = bytearray()

    def pump(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(len(self.data))
                chunk = f.read()
        except FileNotFoundError:
            return
        if chunk:
            self.data += chunk
            if self.sink is not None:
                self.sink.write(chunk)
                self.sink.flush()


def _command_script(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The shell script the guest runs in the chroot: environment, directory, command."""
    lines = ["# written by lab/vm.py: the caller's environment, directory and command"]
    for name, value in sorted(env.items()):
        if name not in _DROPPED_ENV and _NAME.fullmatch(name):
            lines.append(f"export {name}={shlex.quote(value)}")
    lines.append("export TMPDIR=/tmp")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(a) for a in command))
    return "\n".join(lines) + "\n"


def _virtfs(tag: str, path: Path, readonly: bool) -> list[str]:
    ro = ",readonly=on" if readonly else ""
    return [
        "-fsdev", f"local,id={tag},path={path},security_model=none,multidevs=remap{ro}",
        "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
    ]


def _qemu_argv(
    kernel: Path, initrd: Path, share: Path, shares: list[str], *, npt: bool, cpus: int,
    memory: str, iommu: bool, cpu: str, l1_cmdline: str,
) -> list[str]:
    cmdline = f"{L1_CMDLINE} kvm_amd.npt={int(npt)} kvm_amd.nested=1 {l1_cmdline}".strip()
    devices: list[str] = []
    if iommu:
        # The vIOMMU must exist before the PCI devices it translates for.
        devices += ["-device", "intel-iommu"]
        cmdline += " intel_iommu=on lab.iommu=1"
    devices += _virtfs("lab", share, readonly=False)
    devices += _virtfs(NINEP_ROOT_TAG, Path("/"), readonly=True)
    devices += shares
    if iommu:
        # 1234:11e8, does DMA on command: for VFIO work. A fixed slot, so its address
        # (EDU_BDF) does not move with the number of 9p shares before it.
        devices += ["-device", f"edu,addr={EDU_SLOT:#x}"]
    return [
        QEMU, "-accel", "tcg,thread=multi", "-M", "q35", "-cpu", cpu,
        "-smp", str(cpus), "-m", memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-chardev", f"file,id=console,path={share / 'console.log'}", "-serial", "chardev:console",
        "-monitor", f"unix:{share / 'monitor.sock'},server=on,wait=off",
        *devices,
    ]


def _prepare(cache: Path, python: Path | None) -> tuple[Path, Path]:
    """Host-side checks and the cached inputs: (kernel image, initramfs)."""
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (apt-get install qemu-system-x86)", Exit.NO_QEMU)
    try:
        kernel = find_kernel()
        initrd = l1_initramfs(kernel, cache)
        image = kernel.vmlinux(cache)
    except KernelNotFound as e:
        raise LabError(str(e), Exit.NO_KERNEL) from None
    except ModuleNotFound as e:
        raise LabError(f"packaged kernel lacks a module: {e}", Exit.NO_KERNEL) from None
    except BusyboxNotFound as e:
        raise LabError(str(e), Exit.SETUP) from None
    except LoaderError as e:
        raise LabError(f"cannot extract the vmlinux: {e}", Exit.NO_KERNEL) from None
    pycache.precompile(cache / "pycache", python)
    return image, initrd


def run(
    command: Sequence[str],
    *,
    npt: bool = True,
    cpus: int = 2,
    memory: str = "4G",
    iommu: bool = False,
    cpu: str = "max",
    l1_cmdline: str = "",
    timeout: float = 1800.0,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    writable: Sequence[Path] = (),
    python: Path | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> LabResult:
    """Boot the L1 guest, run command there (chrooted into the host's root), power off.

    npt selects nested (True) or shadow (False) paging for kvm_amd; cpu is QEMU's CPU
    model (its "max" is the one with SVM and nested paging); l1_cmdline adds to the L1
    kernel's command line (MODULE.param= words reach the modules); cwd and env default to the
    caller's (one below TMPFS_DIRS is shared read-only; one of them is refused); writable
    lists host directories the command may write (each mounted at its own path;
    everything else is read-only or a tmpfs); python is the interpreter whose bytecode
    is precompiled on the host (default: the repository's .venv). stdout/stderr, if
    given, receive the command's output as it comes; the result holds all of it.
    Raises LabError for every failure that is not the command's own.
    """
    if not command:
        raise LabError("no command to run", Exit.SETUP)
    where = _visible((cwd or Path.cwd()).resolve(), "the working directory")
    cache = cache_dir()
    kernel, initrd = _prepare(cache, python)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corevisor-lab-") as tmp:
        share = Path(tmp)
        call_env = dict(os.environ if env is None else env)
        call_env["PYTHONPYCACHEPREFIX"] = str((cache / "pycache").resolve())
        call_env["COREVISOR_LAB"] = f"npt={int(npt)}"
        (share / "command").write_text(_command_script(command, where, call_env))
        # A working directory the guest's tmpfs would hide is shared read-only first.
        seen = [(where, "ro")] if _hidden(where) else []
        dirs = [*seen, (cache / "pycache", "loose"), *((Path(w), "") for w in writable)]
        shares = _writable_shares(share, dirs)
        argv = _qemu_argv(kernel, initrd, share, shares, npt=npt, cpus=cpus, memory=memory,
                          iommu=iommu, cpu=cpu, l1_cmdline=l1_cmdline)
        out, err = _Tail(share / "stdout", stdout), _Tail(share / "stderr", stderr)
        qemu_status = _boot(argv, share / "qemu.log", start + timeout, (out, err))
        console_log = share / "console.log"
        console = console_log.read_bytes() if console_log.exists() else b""
        try:
            if qemu_status is None:
                raise LabError(f"timeout: the run took longer than {timeout:g} s (QEMU killed)",
                               Exit.TIMEOUT)
            status = _status(share, qemu_status, console)
        except LabError as e:
            e.console = console
            raise
        return LabResult(status, bytes(out.data), bytes(err.data), time.monotonic() - start,
                         console)


def _visible(path: Path, what: str) -> Path:
    """path, if the guest can show it; a tmpfs directory itself cannot be shared.

    A path below one of TMPFS_DIRS (a checkout in /tmp/ci) is shared into the guest at
    its own path, over the guest's tmpfs (_shares); the tmpfs directory itself (/tmp) is
    refused, since sharing the host's would take the guest's writable /tmp away.
    """
    if str(path) in TMPFS_DIRS:
        raise LabError(f"{what} {path} is under {path}, which the L1 guest replaces "
                       "with its own empty tmpfs: use a directory below it or elsewhere",
                       Exit.SETUP)
    return path


def _hidden(path: Path) -> bool:
    """Whether the guest's own tmpfs hide path (it is below one of TMPFS_DIRS)."""
    return any(Path(d) in path.parents for d in TMPFS_DIRS)


def _writable_shares(share: Path, dirs: Sequence[tuple[Path, str]]) -> list[str]:
    """QEMU options for the writable host directories, and their list for the init script.

    Each (path, mode) is mounted at its own path in the guest; mode "loose" means
    cache=loose (for directories only this guest writes while it runs: the bytecode
    cache), "ro" a read-only share (a working directory below the guest's tmpfs).
    """
    qemu_args: list[str] = []
    mounts = ""
    for i, (path, mode) in enumerate(dirs):
        where = _visible(path.resolve(), "writable directory")
        if re.search(r"\s", str(where)):
            raise LabError(f"writable directory {where}: a path with white space", Exit.SETUP)
        if not where.is_dir():
            raise LabError(f"writable directory {where} does not exist", Exit.SETUP)
        qemu_args += _virtfs(f"rw{i}", where, readonly=mode == "ro")
        mounts += f"rw{i} {where}{' ' + mode if mode else ''}\n"
    (share / "mounts").write_text(mounts)
    return qemu_args


def _boot(argv: list[str], log: Path, deadline: float, tails: Sequence[_Tail]) -> int | None:
    """Run QEMU, streaming the tails, until it exits (its status) or the deadline (None)."""
    with log.open("wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                preexec_fn=_die_with_parent)
    try:
        status = _wait(proc, deadline, tails)
        if status is None:  # timed out: say where the L1 vCPUs were, for --console
            with (log.parent / "console.log").open("ab") as console:
                console.write(_l1_registers(log.parent / "monitor.sock"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for tail in tails:
        tail.pump()
    return status


def _l1_registers(monitor: Path) -> bytes:
    """QEMU's `info registers -a` from its monitor: where a stuck L1 guest is stuck."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(monitor))
            s.sendall(b"info registers -a\n")
            out = b""
            with contextlib.suppress(TimeoutError):
                while chunk := s.recv(65536):
                    out += chunk
    except OSError as e:
        return f"\nlab: no L1 registers from QEMU's monitor: {e}\n".encode()
    start = out.find(b"CPU#")  # past the monitor's banner and its echo of the command
    regs = out[start:] if start >= 0 else out
    return b"\nlab: timeout; the L1 vCPUs (QEMU monitor, info registers -a):\n" + regs


def _die_with_parent() -> None:
    """In QEMU's child: SIGKILL when the lab's process dies, however it dies.

    A lab run killed by a CI timeout must not leave a QEMU spinning on a shared
    2-core machine (prctl PR_SET_PDEATHSIG).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait(proc: subprocess.Popen[bytes], deadline: float, tails: Sequence[_Tail]) -> int | None:
    """Stream the tails until QEMU exits (its status) or the deadline passes (None)."""
    while True:
        try:
            return proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            pass
        for tail in tails:
            tail.pump()
        if time.monotonic() > deadline:
            return None


def _status(share: Path, qemu_status: int, console: bytes) -> int:
    """The command's exit status, or the LabError that says why there is none."""
    status_file = share / "status"
    if status_file.exists():
        return int(status_file.read_text().strip())
    found = _INIT_ERROR.search(console)
    if found:
        kind, detail = found.group(1).decode(), found.group(2).decode(errors="replace").strip()
        what = {"module": "module load failed", "kvm": "no /dev/kvm in the L1 guest",
                "iommu": "no IOMMU in the L1 guest"}.get(kind, f"{kind} failed in the L1 guest")
        raise LabError(f"{what}: {detail}", _INIT_STATUS.get(kind, Exit.L1_FAILED))
    qemu_log = (share / "qemu.log").read_text(errors="replace").strip()
    if qemu_status != 0:
        raise LabError(f"{QEMU} failed (status {qemu_status}): "
                       f"{qemu_log.splitlines()[-1] if qemu_log else 'no message'}", Exit.L1_FAILED)
    raise LabError(f"the L1 guest stopped without a status: {_last_words(console)}",
                   Exit.L1_FAILED)


def _last_words(console: bytes) -> str:
    """What the L1 kernel said last that matters: its panic line and the one before."""
    lines = [ln.strip() for ln in console.decode(errors="replace").splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "Kernel panic" in line:
            return " | ".join(lines[max(0, i - 1): i + 1])
    return " | ".join(lines[-3:]) or "no console output"
