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
    for dangerous in (b.KVM_CREATE_VM, b.KVM_CREATE_VCPU, b.KVM_IRQFD, b.KVM_SET_CPUID2,
                      b.KVM_SET_SIGNAL_MASK, b.KVM_SET_MSRS, b.KVM_SET_SREGS):
        assert dangerous not in vcpu
    # what a guest reprograms from an exit on a PC: MSI routes, BARs, PAM shadow RAM
    for platform in (b.KVM_SET_GSI_ROUTING, b.KVM_IOEVENTFD, b.KVM_SET_USER_MEMORY_REGION):
        assert platform in vcpu
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


def run_bpf(program: tuple[tuple[int, int, int, int], ...], nr: int, args: tuple[int, ...] = (),
            arch: int = 0xC000003E) -> tuple[int, int]:
    """A classic-BPF interpreter for the instructions bpf.py emits: (action, steps)."""
    data = {0: nr, 4: arch}
    for i, a in enumerate((*args, 0, 0, 0, 0, 0, 0)[:6]):
        data[16 + 8 * i] = a & 0xFFFFFFFF
    acc, pc, steps = 0, 0, 0
    while True:
        code, jt, jf, k = program[pc]
        steps += 1
        if code == 0x20:
            acc = data[k]
        elif code == 0x54:
            acc &= k
        elif code in (0x15, 0x35):
            hit = acc == k if code == 0x15 else acc >= k
            pc += jt if hit else jf
        elif code == 0x06:
            return k, steps
        pc += 1


@pytest.mark.parametrize("role", sandbox.ROLES)
def test_each_program_allows_exactly_its_rules(role: str) -> None:
    from corevisor.sandbox.bpf import RET_ALLOW, RET_TRAP

    prog = policy.program(role).insns
    allowed = policy.calls(role)
    for name, nr in NUMBERS.items():
        action, _ = run_bpf(prog, nr, (0, 0, 0))
        if name == "clone3" and role == sandbox.CONTROL:
            assert action == 0x50000 | 38  # ENOSYS
        elif name not in allowed or name in ("ioctl", "prctl", "clone", "socket"):
            assert action in (RET_TRAP, RET_ALLOW), name  # argument-checked or forbidden
            if name not in allowed:
                assert action == RET_TRAP, name
        else:
            assert action == RET_ALLOW, (role, name)
    assert run_bpf(prog, NUMBERS["write"], arch=0x40000003)[0] == RET_TRAP  # i386 ABI
    assert run_bpf(prog, NUMBERS["write"] | 0x40000000)[0] == RET_TRAP  # x32 ABI
    if role != sandbox.DOORBELL:
        for request in policy.ioctls(role):
            assert run_bpf(prog, NUMBERS["ioctl"], (3, request | (0xFF << 32)))[0] == RET_ALLOW
        assert run_bpf(prog, NUMBERS["ioctl"], (3, 0xDEAD))[0] == RET_TRAP
    if role != sandbox.CONTROL:
        assert run_bpf(prog, NUMBERS["mmap"], (0, 4096, 0x5))[0] == RET_TRAP  # PROT_EXEC
        assert run_bpf(prog, NUMBERS["mmap"], (0, 4096, 0x3))[0] == RET_ALLOW
    else:
        assert run_bpf(prog, NUMBERS["clone"], (0x3D0F00,))[0] == RET_ALLOW  # a thread
        assert run_bpf(prog, NUMBERS["clone"], (0x01200011,))[0] == RET_TRAP  # fork


def test_kvm_run_costs_a_few_dozen_bpf_instructions() -> None:
    """The vCPU's hot call, through both filters it has (control's and its own)."""
    args = (5, b.KVM_RUN, 0)
    steps = sum(run_bpf(policy.program(r).insns, NUMBERS["ioctl"], args)[1]
                for r in (sandbox.CONTROL, sandbox.VCPU))
    assert steps < 80, steps


def _system_file(tmp_path: Path, extra: str) -> Path:
    from tests.kvm.images import pvh_elf  # a minimal PVH image

    (tmp_path / "g.elf").write_bytes(pvh_elf(b"\xf4"))
    path = tmp_path / "s.toml"
    path.write_text(f'[partitions.a]\nimage = "g.elf"\n\n[system]\n{extra}\n')
    return path


@pytest.mark.parametrize(("extra", "expected"), [("", True), ("sandbox = true", True),
                                                 ("sandbox = false", False)])
def test_the_system_file_key(tmp_path: Path, extra: str, expected: bool) -> None:
    from corevisor.config.toml import load_config

    assert load_config(_system_file(tmp_path, extra)).sandbox is expected


def test_the_system_file_key_must_be_a_boolean(tmp_path: Path) -> None:
    from corevisor.config.toml import load_config
    from corevisor.errors import ConfigError

    with pytest.raises(ConfigError, match=r"s\.toml: system\.sandbox: expected true or false"):
        load_config(_system_file(tmp_path, 'sandbox = "yes"'))


def test_the_jail_holds_what_the_spec_names_and_limits_follow_its_size(tmp_path: Path) -> None:
    from corevisor.sandbox import jail
    from corevisor.spec import BlkSpec, NetSpec, PartitionSpec, SerialSpec, SystemSpec, VirtioSpec

    img, disk, ro_disk = tmp_path / "g.elf", tmp_path / "d.img", tmp_path / "r.img"
    a = PartitionSpec(name="a", image=img, memory=64 << 20, cpus=2,
                      serial=SerialSpec.unix(tmp_path / "s" / "a.sock"),
                      virtio=VirtioSpec(blk=(BlkSpec(disk), BlkSpec(ro_disk, readonly=True)),
                                        net=(NetSpec("tap0"),)))
    b_ = PartitionSpec(name="b", image=img, memory=16 << 20,
                       serial=SerialSpec.file(tmp_path / "b.log"))
    system = SystemSpec(partitions=(a, b_), log_dir=tmp_path / "logs")
    planned, spec = jail.plan(system, tmp_path / "root", 1000, 1000)
    assert planned == system  # a log_dir was given: nothing to add
    assert spec.ro == (img, ro_disk, img) and spec.rw == (disk,)
    assert spec.create_files == (tmp_path / "b.log",)
    assert spec.create_dirs == (tmp_path / "s", tmp_path / "logs")
    assert spec.devices == ("/dev/kvm", "/dev/null", "/dev/net/tun")
    assert spec.nofile == 256 + 2 * 64
    threads = 4 + (2 + 3 + 2) + (1 + 0 + 2)
    assert spec.address_space == (80 << 20) + (1 << 30) + threads * (80 << 20)


def test_the_jail_refuses_a_passthrough_device_in_one_line(tmp_path: Path) -> None:
    from corevisor.sandbox import jail
    from corevisor.spec import PartitionSpec, PciAddress, SystemSpec

    part = PartitionSpec(name="a", image=tmp_path / "g.elf", vfio=(PciAddress(0, 0, 4, 0),))
    with pytest.raises(jail.JailError, match=r"^jail: partition a passes 0000:00:04.0 through "
                                             r"\(vfio\), which the jail cannot hold yet"):
        jail.plan(SystemSpec(partitions=(part,)), tmp_path / "root", 1000, 1000)
