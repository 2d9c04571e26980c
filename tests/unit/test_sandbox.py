"""The seccomp sandbox without KVM: the allowlists' shape, and real filters in child
processes (a filter cannot be removed, so each case runs in a fresh interpreter) whose
forbidden calls must end the process with status 159 and the one-line report."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corevisor import sandbox
from corevisor.kvm import bindings as b
from corevisor.sandbox import policy
from corevisor.sandbox.bpf import ArgIn
from corevisor.sandbox.syscalls import NUMBERS

LEAVES = [r for r in sandbox.ROLES if r != sandbox.CONTROL]
# Calls no thread of a running VMM may make, whatever its role.
NEVER = ("execve", "execveat", "fork", "vfork", "ptrace", "mount", "umount2", "pivot_root",
         "chroot", "unshare", "setns", "setuid", "setgid", "setresuid", "capset", "kexec_load",
         "init_module", "finit_module", "bpf", "perf_event_open", "process_vm_writev",
         "userfaultfd", "io_uring_setup", "keyctl", "reboot", "swapon", "kill")
REPORT = re.compile(
    r"^corevisor: sandbox: (thread (?P<name>\S+)|the main thread) \(tid \d+\) made a system "
    r"call its seccomp filter forbids: (?P<call>\w+) \((?P<nr>\d+)\)(?P<rest>.*); stopping "
    r"the VMM \(exit status 159\)$",
    re.M,
)


def test_control_allows_everything_a_leaf_role_allows() -> None:
    # Filters stack and the strictest wins: a leaf thread started by a control thread
    # could use nothing control lacks.
    control = policy.calls(sandbox.CONTROL)
    for role in LEAVES:
        assert policy.calls(role) <= control, role
        assert policy.ioctls(role) <= policy.ioctls(sandbox.CONTROL), role


@pytest.mark.parametrize("role", sandbox.ROLES)
def test_no_role_may_exec_fork_mount_or_change_identity(role: str) -> None:
    allowed = policy.calls(role)
    assert not allowed & set(NEVER), role
    if role != sandbox.CONTROL:
        assert not allowed & {"openat", "open", "socket", "clone", "clone3", "memfd_create"}


def test_vcpu_ioctls_are_its_own_vcpu_and_interrupts_only() -> None:
    vcpu = policy.ioctls(sandbox.VCPU)
    assert b.KVM_RUN in vcpu and b.KVM_IRQ_LINE in vcpu
    for dangerous in (b.KVM_CREATE_VM, b.KVM_CREATE_VCPU, b.KVM_SET_USER_MEMORY_REGION,
                      b.KVM_IOEVENTFD, b.KVM_IRQFD, b.KVM_SET_CPUID2, b.KVM_SET_SIGNAL_MASK):
        assert dangerous not in vcpu
    rule = policy.rules(sandbox.VCPU)[NUMBERS["ioctl"]]
    assert isinstance(rule, ArgIn) and rule.index == 1 and rule.values == vcpu


def test_control_knows_every_kvm_request_and_nothing_that_is_not_one() -> None:
    control = policy.ioctls(sandbox.CONTROL)
    for name in ("KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_RUN", "KVM_SET_SIGNAL_MASK"):
        assert getattr(b, name) in control
    assert b.KVM_API_VERSION not in control and b.KVM_GUESTDBG_USE_SW_BP not in control


def test_the_counts_in_the_docs_are_the_filters_counts() -> None:
    text = (Path(__file__).parents[2] / "docs" / "sandbox.md").read_text()
    for role, count in policy.counts().items():
        assert re.search(rf"^\| `{role}` \| {count} \|", text, re.M), (role, count)


def _run(body: str) -> subprocess.CompletedProcess[str]:
    """body runs in a fresh interpreter after sandbox.enable() (the control filter)."""
    script = "from corevisor import sandbox, signals\nsandbox.enable()\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)


def _thread(role: str, body: str) -> str:
    return f"""
import os, threading
def target():
{textwrap.indent(textwrap.dedent(body), '    ')}
t = signals.start_thread(target, "probe-{role}", {role!r})
t.join()
print("joined")
"""


@pytest.mark.parametrize("role", LEAVES)
def test_a_leaf_thread_that_opens_a_file_is_stopped_with_the_report(role: str) -> None:
    r = _run(_thread(role, """
        os.write(1, b"allowed\\n")
        os.open("/etc/hostname", os.O_RDONLY)
        os.write(1, b"not reached\\n")
    """))
    assert r.returncode == sandbox.EXIT_STATUS, (r.stdout, r.stderr)
    assert r.stdout == "allowed\n"
    m = REPORT.search(r.stderr)
    assert m and m["name"] == f"probe-{role}" and m["call"] == "openat" and m["nr"] == "257", r
    assert 'in target' in r.stderr  # the thread's Python traceback follows the line


def test_the_main_thread_cannot_exec() -> None:
    r = _run("import os\nos.execv('/bin/true', ['true'])\n")
    assert r.returncode == sandbox.EXIT_STATUS
    m = REPORT.search(r.stderr)
    assert m and m["name"] is None and m["call"] == "execve", r.stderr


def test_the_main_thread_cannot_fork_but_starts_threads() -> None:
    r = _run("""
        import os, threading
        t = signals.start_thread(lambda: print("thread ran"), "worker")
        t.join()
        os.fork()
    """)
    assert r.returncode == sandbox.EXIT_STATUS and r.stdout == "thread ran\n", r
    m = REPORT.search(r.stderr)
    assert m and m["call"] == "clone", r.stderr


def test_an_ioctl_outside_the_role_is_reported_with_its_request() -> None:
    r = _run(_thread(sandbox.VCPU, f"""
        import fcntl
        fd = {b.KVM_CREATE_VM}
        fcntl.ioctl(0, fd, 0)
    """))
    assert r.returncode == sandbox.EXIT_STATUS
    m = REPORT.search(r.stderr)
    assert m and m["call"] == "ioctl" and m["rest"] == f", fd 0, request {b.KVM_CREATE_VM:#x}"


def test_a_thread_started_before_enable_is_confined_too() -> None:
    script = textwrap.dedent("""
        import os, threading
        from corevisor import sandbox
        go = threading.Event()
        def early():
            go.wait()
            os.execv("/bin/true", ["true"])
        t = threading.Thread(target=early)
        t.start()
        sandbox.enable()
        go.set()
        t.join()
        print("not reached")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == sandbox.EXIT_STATUS and "not reached" not in r.stdout
    m = REPORT.search(r.stderr)
    assert m and m["call"] == "execve", r.stderr


def test_tracebacks_on_a_confined_thread_read_no_source_file() -> None:
    r = _run(_thread(sandbox.VIRTIO, """
        import traceback
        try:
            raise ValueError("device bug")
        except ValueError:
            text = traceback.format_exc()
        print("formatted", "device bug" in text)
    """))
    assert r.returncode == 0 and "formatted True" in r.stdout, r.stderr
