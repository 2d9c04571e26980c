"""The allowlist of each thread role: which system calls, which ioctl requests.

Found by tracing every bundled guest, the demo, the virtio guests, the GDB tests and the
controller tests (``strace -f``, threads told apart by the names start_thread gives
them: scripts/syscall-profile), then kept as small as the code allows. Each list says
why its less obvious entries are there. The counts per role are in docs/sandbox.md and
the README; ``counts()`` computes them, and a unit test keeps the two in step.

Every role gets BASE: what any Python thread does whatever its job (allocate memory,
wait on a lock, end), plus the reporter's own calls (prctl PR_GET_NAME, gettid, write,
exit_group). Leaf roles may not map or make memory executable (PROT_EXEC): a thread
taken over through a bug cannot load new code. Only control may, for the extension
modules an import loads.

ioctls are allowed by request number. vCPU and GDB threads get the KVM requests on a
vCPU they use, and vCPUs those a guest reprograms its platform with from an exit (GSI
routes, ioeventfds and memory slots of moved BARs and shadow RAM, VFIO_DEVICE_SET_IRQS
for a passed-through device's MSI/MSI-X); virtio, console and socket threads only
KVM_IRQ_LINE (an interrupt into the guest); control gets every KVM and VFIO request
corevisor defines (kvm/bindings.py: it builds, restores and inspects machines, opens
passthrough containers, groups and devices), the TAP requests (virtio/net.py) and the
terminal ones.

What does not live here: the BPF encoding (bpf.py), installing (enforce.py).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from functools import cache

from corevisor.kvm import bindings as b
from corevisor.sandbox import CONSOLE, CONTROL, DOORBELL, GDB, ROLES, SOCKET, VCPU, VIRTIO
from corevisor.sandbox.bpf import Allow, ArgIn, ArgMask, Errno, Program, Rule, build
from corevisor.sandbox.syscalls import NUMBERS

__all__ = ["calls", "ioctls", "rules", "program", "counts", "HOT"]

PROT_EXEC = 0x4
CLONE_THREAD = 0x00010000
PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 15, 16, 38, 22
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
# terminal and fd ioctls (asm-generic/ioctls.h)
TCGETS, TCSETS, TCSETSW, TCSETSF, TCSBRK = 0x5401, 0x5402, 0x5403, 0x5404, 0x5409
TIOCGWINSZ, FIONREAD, FIONBIO, FIOCLEX, FIONCLEX = 0x5413, 0x541B, 0x5421, 0x5451, 0x5450

# Every thread, whatever its role.
BASE = (
    "futex",  # locks, conditions, joins
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",  # the allocators
    "rt_sigprocmask", "rt_sigreturn", "restart_syscall",
    "clock_gettime", "gettimeofday", "clock_nanosleep",  # when the vDSO is not used
    "gettid", "getpid",
    "write",  # output, reports, the reporter itself
    "close",
    "dup2", "dup3",  # pointing a failed stdout at /dev/null (opened beforehand)
    "exit", "exit_group",
)

# What each role adds to BASE (the set-up a role does before it is confined, such as a
# vCPU's pinning, is not in its list).
_CALLS: dict[str, tuple[str, ...]] = {
    VCPU: (
        "ioctl",
        "rt_sigtimedwait",  # taking the kick off before KVM_RUN
        "tgkill",  # kicking the machine's other vCPUs when the guest stops it
        "sendto", "shutdown",  # serial output to a unix: socket client
        "read",  # an eventfd (a doorbell counter) read by a device
        "pread64", "pwrite64",  # a passed-through device's config space and trapped BARs
    ),
    VIRTIO: (
        "ioctl", "poll", "read", "readv", "writev",  # queue eventfds, a TAP
        "pread64", "pwrite64", "preadv", "pwritev", "fsync", "fdatasync",  # a disk
        "getrandom",  # virtio-rng
        "sendto", "shutdown",  # virtio-console output to a unix: socket client
    ),
    CONSOLE: ("ioctl", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "read"),
    SOCKET: (
        "ioctl", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
        "accept4", "getsockname", "recvfrom", "sendto", "shutdown", "read",
    ),
    DOORBELL: ("poll", "read"),
    GDB: (
        "ioctl", "accept4", "getsockname", "getpeername", "setsockopt", "poll", "pselect6",
        "recvfrom", "sendto", "shutdown",
        "tgkill",  # holding and releasing vCPUs (the kick)
    ),
    CONTROL: (
        # files: images, disks, logs, sockets' paths, imports
        "openat", "open", "read", "pread64", "pwrite64", "readv", "writev", "lseek",
        "newfstatat", "fstat", "stat", "lstat", "statx", "fstatfs", "statfs",
        "getdents64", "readlink", "readlinkat", "access", "faccessat", "faccessat2",
        "getcwd", "mkdir", "mkdirat", "unlink", "unlinkat", "rename", "renameat",
        "renameat2", "chmod", "fchmodat", "fchmod", "ftruncate", "fallocate", "fsync", "fdatasync",
        "fcntl", "flock", "dup", "pipe2", "umask",
        # machines: guest RAM, channel memory, eventfds, polling, the monitor's sleep
        "memfd_create", "eventfd2", "poll", "ppoll", "pselect6", "select",
        "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "nanosleep",
        # sockets: unix: serial lines, the GDB stub, an API, fd passing
        "bind", "listen", "connect", "accept4", "getsockname", "getpeername",
        "setsockopt", "getsockopt", "recvfrom", "sendto", "recvmsg", "sendmsg", "shutdown",
        # threads: creating them (thread flags only), signals, scheduling
        "set_robust_list", "rseq", "sigaltstack", "rt_sigaction", "rt_sigtimedwait",
        "tgkill", "sched_getaffinity", "sched_setaffinity", "sched_yield",
        # process facts asked by the standard library
        "getuid", "geteuid", "getgid", "getegid", "getrandom", "uname", "sysinfo",
        "prlimit64", "getrusage", "ioctl",
    ),
}

# The hot calls, tested first in every filter.
HOT = ("ioctl", "futex", "write", "read", "poll", "epoll_wait", "rt_sigtimedwait", "getpid",
       "tgkill", "gettid", "pread64", "pwrite64", "recvfrom", "sendto")

_VCPU_IOCTLS = (
    b.KVM_RUN,
    # reports, halt probes, a debugger's exits handled on the vCPU
    b.KVM_GET_REGS, b.KVM_GET_SREGS, b.KVM_GET_FPU, b.KVM_GET_MP_STATE,
    b.KVM_GET_VCPU_EVENTS, b.KVM_GET_LAPIC, b.KVM_GET_MSRS, b.KVM_SET_REGS,
    b.KVM_SET_GUEST_DEBUG,
    # interrupts a device raises from an exit (the UART's IRQ 4, an MSI)
    b.KVM_IRQ_LINE, b.KVM_SIGNAL_MSI,
    # the platform the guest reprograms from an exit: an MSI/MSI-X entry or enable bit
    # (pci/routing.py rewrites the GSI routes), a BAR moved (pci/platform.py moves its
    # queue-notify ioeventfds), the PAM registers (firmware/bios.py maps shadow RAM)
    b.KVM_SET_GSI_ROUTING, b.KVM_IOEVENTFD, b.KVM_SET_USER_MEMORY_REGION,
    # a passed-through device's MSI/MSI-X turned on or off (vfio/function.py)
    b.VFIO_DEVICE_SET_IRQS,
)
_GDB_IOCTLS = (
    b.KVM_GET_REGS, b.KVM_SET_REGS, b.KVM_GET_SREGS, b.KVM_SET_SREGS, b.KVM_GET_FPU,
    b.KVM_SET_FPU, b.KVM_GET_MP_STATE, b.KVM_GET_VCPU_EVENTS, b.KVM_GET_LAPIC,
    b.KVM_GET_MSRS, b.KVM_SET_GUEST_DEBUG, FIONBIO,
)
_IRQ_IOCTLS = (b.KVM_IRQ_LINE, b.KVM_SIGNAL_MSI)
_TERMINAL_IOCTLS = (TCGETS, TCSETS, TCSETSW, TCSETSF, TCSBRK, TIOCGWINSZ, FIONREAD, FIONBIO,
                    FIOCLEX, FIONCLEX)


def _kvm_requests() -> tuple[int, ...]:
    """Every KVM ioctl request bindings.py defines (type byte 0xAE), for control."""
    return tuple(
        sorted(
            {
                v
                for k, v in vars(b).items()
                if k.startswith("KVM_") and isinstance(v, int) and v >= 0xAE00
                and (v >> 8) & 0xFF == 0xAE
            }
        )
    )


def _vfio_requests() -> tuple[int, ...]:
    """Every VFIO request bindings.py defines (type byte ';'), for control: passthrough."""
    return tuple(sorted(v for k, v in vars(b).items() if k.startswith("VFIO_")
                        and isinstance(v, int) and (v >> 8) == b.VFIO_TYPE))


def _tap_requests() -> tuple[int, ...]:
    from corevisor.virtio import net  # the TAP requests live with the TAP code

    return (net.TUNSETIFF, net.TUNSETOFFLOAD, net.TUNSETVNETHDRSZ)


@cache
def ioctls(role: str) -> frozenset[int]:
    """The ioctl requests role may issue."""
    if role == VCPU:
        return frozenset(_VCPU_IOCTLS)
    if role == GDB:
        return frozenset(_GDB_IOCTLS)
    if role in (VIRTIO, CONSOLE, SOCKET):
        return frozenset(_IRQ_IOCTLS)
    if role == CONTROL:
        own = (*_kvm_requests(), *_vfio_requests(), *_tap_requests(), *_TERMINAL_IOCTLS)
        leaves = (r for other in ROLES if other != CONTROL for r in ioctls(other))
        return frozenset((*own, *leaves))
    return frozenset()


def calls(role: str) -> frozenset[str]:
    """The names of the system calls role may make (control: every role's too)."""
    if role not in _CALLS:
        raise ValueError(f"no sandbox role {role!r} (roles: {', '.join(ROLES)})")
    own = set(BASE) | set(_CALLS[role]) | {"prctl"}
    if role == CONTROL:
        own |= {"clone", "seccomp"}
        for other in ROLES:
            own |= set(BASE) | set(_CALLS[other])
    return frozenset(own)


def _numbers(names: Iterable[str]) -> dict[str, int]:
    missing = [n for n in names if n not in NUMBERS]
    if missing:
        raise ValueError(f"unknown system calls: {', '.join(missing)}")
    return {n: NUMBERS[n] for n in names}


@cache
def rules(role: str) -> dict[int, Rule]:
    """syscall number -> Rule for role."""
    out: dict[int, Rule] = {nr: Allow() for nr in _numbers(calls(role)).values()}
    out[NUMBERS["ioctl"]] = ArgIn(1, ioctls(role))
    if role == CONTROL:
        # a prctl to name a thread or confine it further; never to loosen anything
        prctl = {PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP}
        out[NUMBERS["prctl"]] = ArgIn(0, frozenset(prctl))
        out[NUMBERS["clone"]] = ArgMask(0, CLONE_THREAD, CLONE_THREAD)  # threads, no fork
        out[NUMBERS["clone3"]] = Errno(errno.ENOSYS)  # flags in memory: make libc use clone
        out[NUMBERS["socket"]] = ArgIn(0, frozenset({AF_UNIX, AF_INET, AF_INET6}))
    else:
        out[NUMBERS["prctl"]] = ArgIn(0, frozenset({PR_GET_NAME}))
        out[NUMBERS["mmap"]] = ArgMask(2, PROT_EXEC, 0)
        out[NUMBERS["mprotect"]] = ArgMask(2, PROT_EXEC, 0)
    if role not in (VCPU, GDB, VIRTIO, CONSOLE, SOCKET, CONTROL):
        del out[NUMBERS["ioctl"]]
    return out


@cache
def program(role: str) -> Program:
    """The role's BPF program, built once per process."""
    return build(rules(role), hot=[NUMBERS[n] for n in HOT])


def counts() -> dict[str, int]:
    """role -> how many system calls it may make (an ioctl counts once)."""
    return {role: len(program(role).allowed) for role in ROLES}
