"""The bundled guests on real KVM through the real CLI: output and exit status.

The tests marked portable run again in the lab (make lab-test), on SVM: the same images
through KVM's hardware path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kvm.conftest import corevisor


@pytest.mark.portable
def test_hello_prints_and_exits_with_requested_status(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["hello"]), "--cmdline", "exit=3 greeting")
    assert "hello: Hello from a corevisor guest!" in r.stdout
    assert 'hello: cmdline "exit=3 greeting"' in r.stdout
    assert "hello: cpus=1 " in r.stdout
    assert "hello: exit 3" in r.stdout
    assert r.returncode == 3, r.stderr


def test_hello_reads_real_time_from_the_rtc(guests: dict[str, Path]) -> None:
    import datetime

    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    r = corevisor("run", str(guests["hello"]))
    after = datetime.datetime.now(datetime.UTC)
    line = next(x for x in r.stdout.splitlines() if x.startswith("hello: rtc "))
    seen = datetime.datetime.strptime(line[len("hello: rtc ") :], "%Y-%m-%d %H:%M:%S")
    assert before <= seen.replace(tzinfo=datetime.UTC) <= after


def test_hello_sees_its_memory_size(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["hello"]), "--memory", "32M")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("hello: cpus="))
    kib = int(line.split("mem=")[1].removesuffix("KiB"))
    # the e820 map hides the EBDA..1 MiB hole: usable RAM is a little under 32 MiB
    assert 31 * 1024 < kib <= 32 * 1024


@pytest.mark.portable
def test_multiboot_image_boots(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["hello-mb"]), "--cmdline", "exit=5")
    assert "hello: Hello from a corevisor guest!" in r.stdout
    # a multiboot kernel's command line starts with its own name, as GRUB and QEMU pass it
    assert f'hello: cmdline "{guests["hello-mb"]} exit=5"' in r.stdout
    assert r.returncode == 5, r.stderr


def test_bundled_guest_by_name(guests: dict[str, Path]) -> None:
    r = corevisor("run", "hello", "--cpus", "2")
    assert "hello: cpus=2 " in r.stdout
    assert r.returncode == 0, r.stderr


@pytest.mark.portable
def test_smp_every_cpu_checks_in_on_pinned_cores(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["smp"]), "--cpus", "2", "--pin", "0,1")
    assert "smp: cpu 0 apic 0 checked in" in r.stdout
    assert "smp: cpu 1 apic 1 checked in" in r.stdout
    assert "smp: 2/2 cpus checked in" in r.stdout
    assert r.returncode == 0, r.stderr


@pytest.mark.portable
def test_timer_ticks_interrupt_user_mode(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["timer"]))
    assert "timer: uart irq ok" in r.stdout
    assert "timer: 20 ticks" in r.stdout
    loops = next(x for x in r.stdout.splitlines() if x.startswith("timer: user loop ran"))
    assert int(loops.split()[4]) > 0
    assert r.returncode == 0, r.stderr


@pytest.mark.portable
def test_fault_guest_triple_fault_is_reported(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["fault"]))
    assert "fault: about to triple-fault" in r.stdout
    assert r.returncode == 1
    assert "guest stopped: triple fault" in r.stderr
    assert "rip=" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.portable
def test_demo_runs_and_exits_zero(guests: dict[str, Path]) -> None:
    r = corevisor("run")
    out = r.stdout.splitlines()
    for k in range(1, 6):
        assert f'rtos | rtos: sent "ping {k}"' in out
        assert f'peer | peer: received "ping {k}"' in out
        assert f'rtos | rtos: received "pong {k}"' in out
    assert "rtos | rtos: done" in out
    assert "corevisor: rtos: guest exited with status 0" in r.stderr
    assert "corevisor: peer: guest exited with status 0" in r.stderr
    assert r.returncode == 0, r.stderr


def test_guests_command_lists_built_images(guests: dict[str, Path]) -> None:
    r = corevisor("guests")
    assert r.returncode == 0
    for name, path in guests.items():
        assert f"{name}" in r.stdout
        assert str(path) in r.stdout
        assert path.exists()
