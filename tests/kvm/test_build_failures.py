"""A build that fails anywhere leaves nothing behind: no thread, no fd, no socket file.

One partition with every kind of resource (2 vCPUs, a unix: serial socket, virtio blk,
net on a transient TAP, rng and console, an initrd, a channel, a GDB stub) is built
while failures are injected (a) right after each builder step, (b) at each KVM ioctl
of the build in turn, (c) at each eventfd the build creates. After each, the threads
and /proc/self/fd must be what they were before. Regression test for issue 8: threads
used to start during the build and be registered for closing only afterwards, so an
irqfd refused by KVM left I/O threads running and fds open.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corevisor import builder
from corevisor.builder import PartitionLinks, build
from corevisor.channel import Channel, ends_for
from corevisor.errors import KvmError
from corevisor.kvm import ioctls
from corevisor.spec import (
    BlkSpec,
    ChannelSpec,
    HostPort,
    NetSpec,
    PartitionSpec,
    SerialKind,
    SerialSpec,
    VirtioSpec,
)
from tests.kvm.images import pvh_elf

SPIN_ON_PORT_80 = bytes([0xE6, 0x80, 0xEB, 0xFC])
STEPS = [
    "attach_memory",
    "attach_irqchip",
    "attach_exit_policy",
    "attach_vcpus",
    "attach_legacy_devices",
    "attach_hypercalls",
    "attach_virtio_devices",
    "load_image",
    "load_initrd",
    "attach_boot_tables",
    "boot_bsp",
    "attach_channels",
    "attach_debugger",
]


class Injected(Exception):
    """The failure a test injects (not a CorevisorError: a bug must be cleaned up too)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[PartitionSpec, PartitionLinks, Path]]:
    img = tmp_path / "t.elf"
    img.write_bytes(pvh_elf(SPIN_ON_PORT_80))
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"07070100" * 64)
    sock = tmp_path / "serial.sock"
    cfg = PartitionSpec(
        name="t",
        image=img,
        cpus=2,
        memory=32 << 20,
        serial=SerialSpec(SerialKind.UNIX, sock),
        initrd=initrd,
        gdb=HostPort("127.0.0.1", _free_port()),
        gdb_attach=True,
        virtio=VirtioSpec(
            blk=(BlkSpec(disk),), net=(NetSpec("cvlife0"),), rng=True, console=True
        ),
    )
    channel = Channel(ChannelSpec("link", ("t", "peer"), 4096, 0xD000_0000))
    try:
        yield cfg, PartitionLinks(channels=ends_for("t", [channel])), sock
    finally:
        channel.close()


def _snapshot() -> tuple[set[threading.Thread], dict[int, str]]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own directory fd, gone by now
    return set(threading.enumerate()), fds


def _check_nothing_left(before: tuple[set[threading.Thread], dict[int, str]], sock: Path) -> None:
    threads, fds = _snapshot()
    assert threads == before[0], [t.name for t in threads - before[0]]
    assert fds == before[1], {fd: fds[fd] for fd in set(fds) - set(before[1])}
    assert not sock.exists()


def _fail_nth(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, n: int,
              error: Callable[[], Exception]) -> list[int]:
    """Make the n-th call (0-based) of module.name raise error(); returns the call count."""
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] - 1 == n:
            raise error()
        return real(*args, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_a_full_build_starts_nothing_and_closes_everything(
    setup: tuple[PartitionSpec, PartitionLinks, Path],
) -> None:
    cfg, links, sock = setup
    before = _snapshot()
    m = build(cfg, links=links)
    assert set(threading.enumerate()) == before[0]  # nothing runs until start()
    m.start()
    assert {t.name for t in set(threading.enumerate()) - before[0]} == {
        "vcpu0", "vcpu1", "serial-t", "gdb-server", "virtio-virtio-blk0",
        "virtio-virtio-net0", "virtio-virtio-rng", "virtio-virtio-console",
    }
    m.close()
    _check_nothing_left(before, sock)


@pytest.mark.parametrize("step", STEPS)
def test_failure_after_each_step_releases_everything(
    step: str,
    setup: tuple[PartitionSpec, PartitionLinks, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, links, sock = setup
    real = getattr(builder, step)

    def then_fail(*args: Any, **kw: Any) -> Any:
        real(*args, **kw)
        raise Injected(step)

    monkeypatch.setattr(builder, step, then_fail)
    before = _snapshot()
    with pytest.raises(Injected):
        build(cfg, links=links)
    _check_nothing_left(before, sock)


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str,
                 setup: tuple[PartitionSpec, PartitionLinks, Path]) -> int:
    calls = _fail_nth(monkeypatch, module, name, -1, lambda: Injected())
    build(setup[0], links=setup[1]).close()
    monkeypatch.undo()
    return calls[0]


def test_failure_at_each_kvm_ioctl_releases_everything(
    setup: tuple[PartitionSpec, PartitionLinks, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ioctl of the build refused in turn, as KVM refuses them (KvmError)."""
    cfg, links, sock = setup
    total = _count_calls(monkeypatch, ioctls, "_ioctl", setup)
    assert total > 40  # memory slots, irqchip, vCPU set-up, ioeventfds, irqfds, ...
    for n in range(total):
        _fail_nth(monkeypatch, ioctls, "_ioctl", n, lambda: KvmError("INJECTED", errno.EPERM))
        before = _snapshot()
        with pytest.raises(KvmError, match="INJECTED"):
            build(cfg, links=links)
        _check_nothing_left(before, sock)
        monkeypatch.undo()


def test_failure_at_each_eventfd_releases_everything(
    setup: tuple[PartitionSpec, PartitionLinks, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every eventfd the build makes (queues, interrupts, wake-ups) fails in turn (EMFILE)."""
    cfg, links, sock = setup
    total = _count_calls(monkeypatch, os, "eventfd", setup)
    assert total >= 8
    for n in range(total):
        _fail_nth(monkeypatch, os, "eventfd", n, lambda: OSError(errno.EMFILE, "injected"))
        before = _snapshot()
        with pytest.raises(OSError, match="injected"):
            build(cfg, links=links)
        _check_nothing_left(before, sock)
        monkeypatch.undo()
