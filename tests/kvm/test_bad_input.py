"""Bad images, configs and guests: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kvm.conftest import corevisor
from tests.kvm.images import exit_with, pvh_elf, serial_print


def _one_line_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr
    lines = [x for x in stderr.splitlines() if x.startswith("corevisor:")]
    assert len(lines) == 1, stderr
    for n in needles:
        assert n in lines[0], stderr


def test_image_that_is_not_elf(tmp_path: Path) -> None:
    img = tmp_path / "kernel.bin"
    img.write_bytes(b"MZ\x90\x00" + bytes(100))
    r = corevisor("run", str(img))
    assert r.returncode == 2
    _one_line_error(r.stderr, "kernel.bin", "ELF")


def test_missing_image(tmp_path: Path) -> None:
    r = corevisor("run", str(tmp_path / "nope.elf"))
    assert r.returncode == 2
    _one_line_error(r.stderr, "nope.elf")


def test_segment_outside_guest_ram(tmp_path: Path) -> None:
    img = tmp_path / "big.elf"
    img.write_bytes(pvh_elf(serial_print(b"x") + exit_with(0), load_addr=0x3F00000))
    r = corevisor("run", str(img), "--memory", "16M")
    assert r.returncode == 2
    _one_line_error(r.stderr, "big.elf", "guest RAM")


def test_bss_larger_than_ram(tmp_path: Path) -> None:
    img = tmp_path / "bss.elf"
    img.write_bytes(pvh_elf(exit_with(0), memsz=64 << 20))
    r = corevisor("run", str(img), "--memory", "16M")
    assert r.returncode == 2
    _one_line_error(r.stderr, "bss.elf")


def test_bad_config_values(tmp_path: Path, guests: dict[str, Path]) -> None:
    cfg = tmp_path / "system.toml"
    cases = {
        f'[partitions.a]\nimage = "{guests["hello"]}"\nmemory = "64Q"\n': "memory",
        f'[partitions.a]\nimage = "{guests["hello"]}"\ncpu = 2\n': "cpu",
        f'[partitions.a]\nimage = "{guests["hello"]}"\ncpus = 1000\n': "cpus",
        '[partitions.a]\nimage = "missing.elf"\n': "image",
        f'[partitions.a]\nimage = "{guests["hello"]}"\npin = [99]\n': "pin",
        "[partitions.a\n": "system.toml",
    }
    for text, key in cases.items():
        cfg.write_text(text)
        r = corevisor("run", str(cfg))
        assert r.returncode == 2, text
        _one_line_error(r.stderr, "system.toml", key)


def test_bad_command_line_options(guests: dict[str, Path]) -> None:
    r = corevisor("run", str(guests["hello"]), "--memory", "lots")
    assert r.returncode == 2
    _one_line_error(r.stderr, "--memory")
    r = corevisor("run", str(guests["hello"]), "--cpus", "2", "--pin", "0,1,7")
    assert r.returncode == 2
    _one_line_error(r.stderr, "--pin")
    # regressions: each of these used to be accepted silently
    for args, culprit in (
        (("--cpus", "0"), "--cpus"),
        (("--pin", ""), "--pin"),
        (("--timeout", "-1"), "--timeout"),
    ):
        r = corevisor("run", str(guests["hello"]), *args)
        assert r.returncode == 2, args
        _one_line_error(r.stderr, culprit)


def test_config_file_runs_guest(tmp_path: Path, guests: dict[str, Path]) -> None:
    cfg = tmp_path / "system.toml"
    cfg.write_text(
        f'[partitions.demo]\nimage = "{guests["hello"]}"\ncpus = 2\nmemory = "32M"\n'
        f'pin = [0, 1]\ncmdline = "exit=7"\n'
    )
    r = corevisor("run", str(cfg))
    assert "hello: cpus=2 " in r.stdout
    assert r.returncode == 7, r.stderr


@pytest.mark.portable
def test_emulation_failure_or_fault_is_reported(tmp_path: Path) -> None:
    """A CPL0 instruction PVM's emulator lacks (xrstor with garbage state).

    On PVM hosts KVM reports an emulation failure; on VT-x/AMD-V the instruction runs
    natively and faults (#GP with no IDT: triple fault). Either way: a clear report.
    """
    from corevisor.kvm.host import detect

    # xrstor [0] with edx:eax = -1: invalid state -> emulation failure or #GP
    code = serial_print(b"go\n") + bytes([0x31, 0xC9, 0xB8, 0xFF, 0xFF, 0xFF, 0xFF, 0x89, 0xC2])
    code += bytes([0x0F, 0xAE, 0x2D]) + (0x2000).to_bytes(4, "little") + exit_with(0)
    img = tmp_path / "emu.elf"
    img.write_bytes(pvh_elf(code))
    r = corevisor("run", str(img))
    assert "go" in r.stdout
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    if detect().is_pvm:
        assert "guest stopped: KVM internal error: emulation failure" in r.stderr, r.stderr
    else:
        assert "guest stopped: triple fault" in r.stderr, r.stderr
    assert "rip=" in r.stderr
