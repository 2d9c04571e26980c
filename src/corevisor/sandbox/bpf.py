"""seccomp-BPF programs: a small builder for allowlists and the calls that install them.

A program built here checks, in order: the audit architecture is x86-64 (anything else,
i386 ``int 0x80`` calls included, is refused); the number has no x32 bit; then, for each
allowed system call, its number and, when the call has a Rule with an argument check,
that one argument. Every syscall not allowed gets the program's default action:
SECCOMP_RET_TRAP (SIGSYS to the calling thread, which the reporter turns into one line
naming the call and the thread, then ends the process; sandbox/__init__.py says why).

Argument checks look at the low 32 bits only, which is what the kernel itself uses for
the arguments checked here (an ioctl request and a clone flag word are ``unsigned int``
in the kernel; a socket domain an ``int``): garbage in the high half cannot smuggle a
request past the filter, because the kernel ignores that half too.

The checks are linear (one compare per allowed call, the hot calls first). A filter of
a hundred calls costs well under a microsecond per system call, against tens of
microseconds for a vCPU exit on this host (bench figures in the README).

What does not live here: which calls each thread role gets (policy.py), the report of a
forbidden call (_sigsys.c), when filters are installed (sandbox/__init__.py).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Allow",
    "ArgIn",
    "ArgMask",
    "Errno",
    "Rule",
    "Program",
    "build",
    "install",
    "AUDIT_ARCH_X86_64",
    "RET_ALLOW",
    "RET_TRAP",
]

# linux/filter.h, linux/bpf_common.h
_LD_W_ABS = 0x00 | 0x00 | 0x20
_JEQ_K = 0x05 | 0x10 | 0x00
_JGE_K = 0x05 | 0x30 | 0x00
_AND_K = 0x04 | 0x50 | 0x00
_RET_K = 0x06 | 0x00
# linux/seccomp.h
RET_KILL_PROCESS = 0x80000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_SECCOMP = 317
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
# struct seccomp_data: nr, arch, instruction_pointer, args[6] (64-bit, little-endian)
_NR, _ARCH = 0, 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index


@dataclass(frozen=True)
class Allow:
    """The call is allowed whatever its arguments."""


@dataclass(frozen=True)
class ArgIn:
    """Allowed when the low 32 bits of argument ``index`` are one of ``values``."""

    index: int
    values: frozenset[int]


@dataclass(frozen=True)
class ArgMask:
    """Allowed when (low 32 bits of argument ``index``) & mask == value."""

    index: int
    mask: int
    value: int


@dataclass(frozen=True)
class Errno:
    """Not executed: the call fails with errno (clone3 -> ENOSYS, so that libc falls
    back to clone, whose flags a filter can see; clone3 passes them in memory)."""

    errno: int


Rule = Allow | ArgIn | ArgMask | Errno


class _Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn))]


@dataclass(frozen=True)
class Program:
    """A built filter: its instructions as (code, jt, jf, k) and what it allows."""

    insns: tuple[tuple[int, int, int, int], ...]
    allowed: frozenset[int]  # the syscall numbers with any rule but Errno

    def __len__(self) -> int:
        return len(self.insns)


def _body(rule: Rule, default: int) -> list[tuple[int, int, int, int]]:
    """What runs once the number matched; it always ends in a return."""
    if isinstance(rule, Allow):
        return [(_RET_K, 0, 0, RET_ALLOW)]
    if isinstance(rule, Errno):
        return [(_RET_K, 0, 0, RET_ERRNO | (rule.errno & 0xFFFF))]
    if isinstance(rule, ArgMask):
        return [
            (_LD_W_ABS, 0, 0, _arg_low(rule.index)),
            (_AND_K, 0, 0, rule.mask & 0xFFFFFFFF),
            (_JEQ_K, 0, 1, rule.value & 0xFFFFFFFF),
            (_RET_K, 0, 0, RET_ALLOW),
            (_RET_K, 0, 0, default),
        ]
    values = sorted(v & 0xFFFFFFFF for v in rule.values)
    out: list[tuple[int, int, int, int]] = [(_LD_W_ABS, 0, 0, _arg_low(rule.index))]
    n = len(values)
    for i, v in enumerate(values):
        # a match jumps over the remaining compares and the refusal, to the allow
        out.append((_JEQ_K, n - i, 0, v))
    out.append((_RET_K, 0, 0, default))
    out.append((_RET_K, 0, 0, RET_ALLOW))
    return out


def build(rules: Mapping[int, Rule], hot: Iterable[int] = (), default: int = RET_TRAP) -> Program:
    """A program allowing rules (syscall number -> Rule); ``hot`` numbers are tested first.

    Raises ValueError if a body is too long for BPF's 8-bit jump offsets (no role comes
    near: the longest, an ioctl list, is about 60 compares).
    """
    order = [nr for nr in hot if nr in rules]
    order += sorted(nr for nr in rules if nr not in order)
    insns: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, default),
        (_LD_W_ABS, 0, 0, _NR),
        (_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (_RET_K, 0, 0, default),
    ]
    for nr in order:
        body = _body(rules[nr], default)
        if len(body) > 255:
            raise ValueError(f"syscall {nr}: rule too long for one BPF jump ({len(body)})")
        insns.append((_JEQ_K, 0, len(body), nr))
        insns.extend(body)
    insns.append((_RET_K, 0, 0, default))
    if len(insns) > 4096:  # BPF_MAXINSNS
        raise ValueError(f"filter too long: {len(insns)} instructions")
    allowed = frozenset(nr for nr, r in rules.items() if not isinstance(r, Errno))
    return Program(tuple(insns), allowed)


_libc = ctypes.CDLL(None, use_errno=True)


def install(program: Program, tsync: bool = False) -> None:
    """Install program on the calling thread (tsync: on every thread of the process).

    Sets no_new_privs first, which an unprivileged process needs and which also keeps
    an exec (if a filter allowed one) from gaining privileges. Raises OSError.
    """
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    array = (_Insn * len(program.insns))(*(_Insn(*i) for i in program.insns))
    prog = _Fprog(len(program.insns), ctypes.cast(array, ctypes.POINTER(_Insn)))
    flags = SECCOMP_FILTER_FLAG_TSYNC if tsync else 0
    ret = _libc.syscall(
        ctypes.c_long(SYS_SECCOMP),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(flags),
        ctypes.byref(prog),
    )
    if ret != 0:
        err = ctypes.get_errno()
        if ret > 0:  # TSYNC: the id of a thread that could not be synchronized
            raise OSError(0, f"seccomp: thread {ret} has a filter of its own (TSYNC failed)")
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
