"""A hostile host around real guests, through the real CLI (issue 9, classes 1, 2, 3, 8).

1. Input files that would block or exhaust the host (FIFOs, devices, sparse giants,
   links to /dev/zero) as every kind of input: one line naming it, exit 2, nothing
   read. A regression that blocks shows up as the CLI's 180 s timeout failing the test.
2. Output the host cannot take (a closed pipe, /dev/full, a full file system, a full
   log_dir, an unwritable stderr): the guest runs to its end, one report line, the
   exit status is the guest's.
3. Exit-port values that do not fit a process status: never 0 for a non-zero write.
8. Disks shared between corevisor processes (and QEMU): one writer or many readers,
   the holder named by its PID.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kvm.conftest import corevisor
from tests.kvm.test_gdb import free_port

CLI = [sys.executable, "-m", "corevisor.cli"]


def one_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("corevisor:")]
    lines = [x for x in lines if not x.startswith("corevisor: system: ")]  # where logs go
    assert len(lines) == 1, stderr
    for n in needles:
        assert n in lines[0], stderr
    return lines[0]


# --- class 1: inputs that block or exhaust the host ------------------------------------


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.fixture
def bad(tmp_path: Path, guests: dict[str, Path]) -> dict[str, Path]:
    """Hostile files of every kind, named like what they pretend to be."""
    out: dict[str, Path] = {}
    for name in ("fifo.toml", "fifo.elf", "fifo.img", "fifo.cpio", "fifo.log"):
        os.mkfifo(tmp_path / name)
        out[name] = tmp_path / name
    for name in ("zero.toml", "zero.elf", "zero.img", "zero.cpio"):
        (tmp_path / name).symlink_to("/dev/zero")
        out[name] = tmp_path / name
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "dir.img").mkdir()
    out["dir.toml"], out["dir.img"] = tmp_path / "dir.toml", tmp_path / "dir.img"
    huge_elf = tmp_path / "huge.elf"  # a real image's header, 30 GiB of holes after it
    huge_elf.write_bytes(guests["hello"].read_bytes())
    os.truncate(huge_elf, 30 << 30)
    big_elf = tmp_path / "big.elf"  # below any fixed bound, above this guest's RAM
    big_elf.write_bytes(guests["hello"].read_bytes())
    os.truncate(big_elf, 100 << 20)
    out["big.elf"] = big_elf
    huge_toml = tmp_path / "huge.toml"
    huge_toml.write_text(f'[partitions.a]\nimage = "{guests["hello"]}"\n')
    os.truncate(huge_toml, 2 << 30)
    huge_rd = tmp_path / "huge.cpio"
    sparse(huge_rd, 1 << 30)
    out.update({"huge.elf": huge_elf, "huge.toml": huge_toml, "huge.cpio": huge_rd})
    return out


def toml(tmp_path: Path, guests: dict[str, Path], extra: str) -> str:
    path = tmp_path / "sys.toml"
    path.write_text(f'[partitions.a]\nimage = "{guests["hello"]}"\n{extra}\n')
    return str(path)


CLI_CASES = [
    # (arguments built from the fixture, text the one line must contain)
    (lambda b, g: ["run", str(b["fifo.toml"])], "is a FIFO"),
    (lambda b, g: ["run", str(b["zero.toml"])], "is a character device"),
    (lambda b, g: ["run", str(b["dir.toml"])], "is a directory"),
    (lambda b, g: ["run", str(b["huge.toml"])], "is 2G, more than the 1M a system file can be"),
    (lambda b, g: ["run", str(b["fifo.elf"])], "is a FIFO"),
    (lambda b, g: ["run", str(b["zero.elf"])], "is a character device"),
    (lambda b, g: ["run", str(b["huge.elf"])], "is 30G, more than the 1G an image can be"),
    (
        lambda b, g: ["run", str(b["big.elf"]), "--memory", "64M"],
        "is 100M, more than the 64M of the guest's RAM",
    ),
    (lambda b, g: ["run", "--kernel", str(b["zero.elf"])], "is a character device"),
    (lambda b, g: ["run", str(g["hello"]), "--initrd", str(b["fifo.cpio"])], "is a FIFO"),
    (lambda b, g: ["run", str(g["hello"]), "--initrd", str(b["zero.cpio"])], "character device"),
    (
        lambda b, g: ["run", str(g["hello"]), "--memory", "64M", "--initrd", str(b["huge.cpio"])],
        "is 1G, more than the",
    ),
    (lambda b, g: ["run", str(g["hello"]), "--disk", str(b["fifo.img"])], "is a FIFO"),
    (lambda b, g: ["run", str(g["hello"]), "--disk", f"{b['zero.img']},ro"], "character device"),
    (lambda b, g: ["run", str(g["hello"]), "--disk", str(b["dir.img"])], "is a directory"),
    (lambda b, g: ["run", str(g["hello"]), "--serial", f"file:{b['fifo.log']}"], "is a FIFO"),
    (lambda b, g: ["run", str(g["hello"]), "--serial", f"file:{b['dir.img']}"], "is a directory"),
]


@pytest.mark.parametrize("case", range(len(CLI_CASES)))
def test_hostile_input_files_on_the_command_line(
    bad: dict[str, Path], guests: dict[str, Path], case: int
) -> None:
    build, needle = CLI_CASES[case]
    args = build(bad, guests)
    r = corevisor(*args)
    assert r.returncode == 2, (args, r.stderr)
    one_line(r.stderr, needle)
    assert "hello:" not in r.stdout  # refused before the guest ran


@pytest.mark.parametrize(
    "extra, needle",
    [
        ('initrd = "@zero.cpio"', "partitions.a.initrd: "),
        ('blk = [{path = "@fifo.img"}]', "partitions.a.blk[0].path: "),
        ('serial = "file:@fifo.log"', 'serial "file:'),
        ('[partitions.b]\nimage = "@fifo.elf"', "partitions.b.image: "),
    ],
)
def test_hostile_input_files_in_a_system_file(
    tmp_path: Path, bad: dict[str, Path], guests: dict[str, Path], extra: str, needle: str
) -> None:
    text = extra
    for name, path in bad.items():
        text = text.replace(f"@{name}", str(path))
    r = corevisor("run", toml(tmp_path, guests, text))
    assert r.returncode == 2, r.stderr
    one_line(r.stderr, needle)


@pytest.mark.parametrize("plant", ["fifo", "blockdev", "dir"])
def test_a_log_dir_with_a_trap_under_a_log_name(
    tmp_path: Path, guests: dict[str, Path], plant: str
) -> None:
    """The per-partition log is an output file too: a FIFO (which would block the open),
    a device or a directory planted at <log_dir>/<name>.log is one line."""
    logs = tmp_path / "logs"
    logs.mkdir()
    trap = logs / "a.log"
    if plant == "fifo":
        os.mkfifo(trap)
    elif plant == "blockdev":
        os.mknod(trap, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    else:
        trap.mkdir()
    r = corevisor("run", toml(tmp_path, guests, f'[system]\nlog_dir = "{logs}"'))
    assert r.returncode == 2, r.stderr
    one_line(r.stderr, f"a: log file {trap} is a")


def test_initramfs_dir_is_bounded_and_archives_fifos(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo")
    (root / "zero").symlink_to("/dev/zero")
    r = corevisor("run", "--kernel", str(guests["hello"]), "--initramfs-dir", str(root),
                  "--memory", "32M", "--cmdline", "exit=5")
    assert r.returncode == 5, r.stderr  # a FIFO and a link are members, never read
    sparse(root / "sparse", 100 << 20)
    r = corevisor("run", "--kernel", str(guests["hello"]), "--initramfs-dir", str(root),
                  "--memory", "32M")
    assert r.returncode == 2
    one_line(r.stderr, "sparse", "the archive would be more than 32M")


# --- class 2: output the host cannot take -----------------------------------------------


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A mounted 64 KiB tmpfs, filled up: every write there is ENOSPC."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "logs").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, bytes(4096)):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def run_with(args: list[str], stdout: object, stderr: object = subprocess.PIPE,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                          text=True, timeout=180, check=False)


def closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone: every write is EPIPE."""
    r, w = os.pipe()
    os.close(r)
    return w


def failures(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    assert "internal error" not in stderr, stderr
    return [x for x in stderr.splitlines() if "failed (" in x and "is dropped" in x]


@pytest.mark.parametrize("guest, status", [("hello", 3), ("rtos", 0)])
def test_stdout_a_closed_pipe(guests: dict[str, Path], guest: str, status: int) -> None:
    w = closed_pipe()
    args = ["run", guest] + (["--cmdline", "exit=3"] if guest == "hello" else [])
    r = run_with(args, stdout=w)
    os.close(w)
    assert r.returncode == status, r.stderr
    (line,) = failures(r.stderr)
    assert line.startswith(f"corevisor: {guest}: output to stdout failed (Broken pipe)")
    assert f"{guest}: guest exited with status {status}" in r.stderr


def test_stdout_on_a_full_device(guests: dict[str, Path]) -> None:
    with open("/dev/full", "w") as full:
        r = run_with(["run", "hello", "--cmdline", "exit=3"], stdout=full)
    assert r.returncode == 3, r.stderr
    (line,) = failures(r.stderr)
    assert "hello: output to stdout failed (No space left on device)" in line


def test_file_serial_on_a_full_device_and_a_full_file_system(
    guests: dict[str, Path], full_fs: Path
) -> None:
    for target in ("/dev/full", str(full_fs / "serial.out")):
        r = corevisor("run", "hello", "--cmdline", "exit=4", "--serial", f"file:{target}")
        assert r.returncode == 4, r.stderr
        (line,) = failures(r.stderr)
        assert f"output to file:{target} failed (No space left on device)" in line


def test_full_log_dir_and_closed_stdout_do_not_crash_loop(
    tmp_path: Path, guests: dict[str, Path], full_fs: Path
) -> None:
    """Two partitions that would restart on a crash, a full log_dir, stdout a closed
    pipe: before, each partition crash-looped on the first byte; now both run."""
    path = tmp_path / "sys.toml"
    path.write_text(
        f'[system]\nlog_dir = "{full_fs / "logs"}"\n'
        f'[partitions.a]\nimage = "{guests["hello"]}"\ncmdline = "exit=9"\nrestart = "restart"\n'
        f'[partitions.b]\nimage = "{guests["rtos"]}"\nrestart = "restart"\n'
    )
    w = closed_pipe()
    r = run_with(["run", str(path)], stdout=w)
    os.close(w)
    assert r.returncode == 9, r.stderr
    assert "restarting" not in r.stderr
    lines = failures(r.stderr)
    logs = [x for x in lines if "output to log " in x]
    assert sorted(x.split(":")[1].strip() for x in logs) == ["a", "b"], r.stderr
    assert len([x for x in lines if "output to stdout failed" in x]) == 1, r.stderr
    assert "corevisor: a: guest exited with status 9" in r.stderr
    assert "corevisor: b: guest exited with status 0" in r.stderr


@pytest.mark.parametrize(
    "redirect", ["2>/dev/full", "2>&-", "2<&0", "2>&{w} {w}>&-", ">&-"],
    ids=["stderr-full", "stderr-closed", "stderr-read-only", "stderr-closed-pipe", "stdout-closed"],
)
def test_unwritable_standard_streams_keep_the_status(
    guests: dict[str, Path], redirect: str
) -> None:
    w = closed_pipe()
    cmd = " ".join(CLI) + " run hello --cmdline exit=6 " + redirect.format(w=w)
    r = subprocess.run(["bash", "-c", cmd], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=180, check=False, pass_fds=(w,))
    os.close(w)
    assert r.returncode == 6, (redirect, r.stdout, r.stderr)
    # corevisor's own lines never move to stdout when stderr is gone
    assert "corevisor:" not in r.stdout


# --- class 3: exit status ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, status",
    [(0, 0), (7, 7), (255, 255), (256, 255), (257, 255), (512, 255), (65536, 255),
     (4294967295, 255)],
)
def test_exit_port_values_map_to_a_status(guests: dict[str, Path], value: int, status: int) -> None:
    r = corevisor("run", "hello", "--cmdline", f"exit={value}")
    assert f"hello: exit {value}" in r.stdout
    assert r.returncode == status, r.stderr
    line = one_line(r.stderr, f"guest exited with status {value}")
    assert (f"corevisor exits {status}" in line) == (value > 255)


def test_a_partition_exiting_256_fails_the_system(tmp_path: Path, guests: dict[str, Path]) -> None:
    path = tmp_path / "sys.toml"
    path.write_text(
        f'[partitions.a]\nimage = "{guests["hello"]}"\ncmdline = "exit=0"\n'
        f'[partitions.b]\nimage = "{guests["hello"]}"\ncmdline = "exit=512"\n'
    )
    r = corevisor("run", str(path))
    assert r.returncode == 255, r.stderr


# --- class 8: shared disks --------------------------------------------------------------


class Holder:
    """A corevisor that has its disks open and stays so: halted for a GDB that never comes."""

    def __init__(self, *disks: str) -> None:
        args = [a for d in disks for a in ("--disk", d)]
        self.proc = subprocess.Popen(
            [*CLI, "run", "hello", *args, "--gdb", f"127.0.0.1:{free_port()}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline()
        assert "GDB server on" in first, first + self.proc.stderr.read()  # built: disks locked

    def end(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=60) == 130


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def test_one_writer_or_many_readers(disk: Path) -> None:
    writer = Holder(str(disk))
    try:
        for spec in (str(disk), f"{disk},ro"):
            r = corevisor("run", "hello", "--disk", spec)
            assert r.returncode == 2, r.stderr
            one_line(r.stderr, "disk.img is in use", f"pid {writer.proc.pid} (",
                     "exclusive (read-write) lock")
    finally:
        writer.end()
    reader = Holder(f"{disk},ro")
    try:
        r = corevisor("run", "hello", "--disk", f"{disk},ro", "--cmdline", "exit=3")
        assert r.returncode == 3, r.stderr  # readers share
        r = corevisor("run", "hello", "--disk", str(disk))
        assert r.returncode == 2
        one_line(r.stderr, f"pid {reader.proc.pid} (", "shared (read-only) lock",
                 "cannot be opened read-write")
    finally:
        reader.end()
    r = corevisor("run", "hello", "--disk", str(disk), "--cmdline", "exit=4")
    assert r.returncode == 4, r.stderr  # the lock went with its holder


def test_two_partitions_of_one_system_cannot_share_a_writable_disk(
    tmp_path: Path, guests: dict[str, Path], disk: Path
) -> None:
    path = tmp_path / "sys.toml"
    part = f'image = "{guests["hello"]}"\nblk = [{{path = "{disk}"}}]\n'
    path.write_text(f"[partitions.a]\n{part}[partitions.b]\n{part}")
    r = corevisor("run", str(path))
    assert r.returncode == 2, r.stderr
    one_line(r.stderr, "partitions.b.blk[0]", "this process")
    both_ro = f'image = "{guests["hello"]}"\nblk = [{{path = "{disk}", readonly = true}}]\n'
    path.write_text(f"[partitions.a]\n{both_ro}[partitions.b]\n{both_ro}")
    r = corevisor("run", str(path))
    assert r.returncode == 0, r.stderr


def _locked(path: Path) -> bool:
    """Whether anyone holds a lock on the file (the probe itself takes none)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        probe = struct.pack("=hh4xqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        return struct.unpack("=hh4xqqi4x", got)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_qemu_and_corevisor_keep_out_of_each_others_writable_disk(disk: Path) -> None:
    qemu = ["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-monitor", "none",
            "-drive", f"file={disk},format=raw,if=virtio"]
    holder = Holder(str(disk))
    try:
        r = subprocess.run(qemu, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode != 0
        assert "lock" in r.stderr, r.stderr
    finally:
        holder.end()
    q = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # QEMU locks while it starts; wait for it, at most ~60 s
            if _locked(disk) or q.poll() is not None:
                break
            time.sleep(0.1)
        assert _locked(disk), "QEMU never locked the image"
        r = corevisor("run", "hello", "--disk", str(disk))
        assert r.returncode == 2
        one_line(r.stderr, f"pid {q.pid} (qemu-system-x86")
    finally:
        q.kill()
        q.wait()


def test_a_socket_is_not_a_disk(tmp_path: Path) -> None:
    path = tmp_path / "disk.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        r = corevisor("run", "hello", "--disk", str(path))
    assert r.returncode == 2
    one_line(r.stderr, "is a socket")
