"""Machine control through the Python API: entry modes, pause/resume, stop, pinning."""

from __future__ import annotations

import os
import time
from pathlib import Path

from corevisor.arch.x86_64 import cpu
from corevisor.builder import build
from corevisor.spec import PartitionSpec, SerialSpec
from tests.kvm.images import LOAD_ADDR, out_byte, pvh_elf, serial_print

# out 0x80, al ; jmp back: a CPL0 loop that exits to the VMM forever
SPIN_ON_PORT_80 = bytes([0xE6, 0x80, 0xEB, 0xFC])


def _image(tmp_path: Path, code: bytes) -> Path:
    img = tmp_path / "t.elf"
    img.write_bytes(pvh_elf(code))
    return img


def _config(tmp_path: Path, img: Path, **kw: object) -> PartitionSpec:
    args: dict[str, object] = {"name": "t", "image": img, "memory": 16 << 20}
    args["serial"] = SerialSpec.file(tmp_path / "serial.log")
    args.update(kw)
    return PartitionSpec(**args)  # type: ignore[arg-type]


def test_long_mode_entry_runs_64bit_code(tmp_path: Path) -> None:
    # 64-bit only encoding: mov rax, imm64 (REX.W B8) then print and exit with al
    code = bytes([0x48, 0xB8]) + (0x2A).to_bytes(8, "little")  # mov rax, 42
    code += serial_print(b"long mode\n") + bytes([0x48, 0x89, 0xC0])  # mov rax, rax
    code += bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4])  # mov al, 42; out 0xf4, al; hlt
    cfg = _config(tmp_path, _image(tmp_path, code))
    with build(cfg) as m:
        cpu.setup_long_mode(m.vcpus[0].fd, m.memory, LOAD_ADDR, rsi=0)
        sregs = m.vcpus[0].fd.get_sregs()
        assert sregs.efer & cpu.EFER_LMA and sregs.cs.l == 1
        report = m.run(timeout=60)
    assert (report.kind, report.code) == ("exit", 42)
    assert (tmp_path / "serial.log").read_text() == "long mode\n"


def test_pause_freezes_guest_and_resume_continues(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _image(tmp_path, SPIN_ON_PORT_80))
    with build(cfg) as m:
        post = m.devices["postcode"]
        m.start()
        deadline = time.monotonic() + 30
        while post.writes < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert post.writes >= 50
        m.pause()
        frozen = post.writes
        time.sleep(0.3)
        assert post.writes == frozen
        m.resume()
        while post.writes < frozen + 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert post.writes >= frozen + 50
        m.stop("test done")
        report = m.outcome(30)
    assert report.kind == "stopped"


def test_timeout_stops_a_spinning_guest(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _image(tmp_path, SPIN_ON_PORT_80))
    with build(cfg) as m:
        report = m.run(timeout=0.5)
    assert report.kind == "stopped" and "timed out" in report.message


def test_vcpu_threads_are_pinned_to_the_named_cores(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    pin = tuple(reversed(cores[:2])) if len(cores) >= 2 else (cores[0], cores[0])
    cfg = _config(tmp_path, _image(tmp_path, SPIN_ON_PORT_80), cpus=2, pin=pin)
    with build(cfg) as m:
        m.start()
        time.sleep(0.2)
        for vcpu, core in zip(m.vcpus, pin, strict=True):
            assert vcpu.native_id is not None
            assert os.sched_getaffinity(vcpu.native_id) == {core}
        m.stop("test done")
        m.outcome(30)


def test_guest_output_goes_to_serial_file(tmp_path: Path) -> None:
    code = serial_print(b"to a file\n") + out_byte(0xF4, 0) + b"\xf4"
    cfg = _config(tmp_path, _image(tmp_path, code))
    with build(cfg) as m:
        report = m.run(timeout=60)
    assert (report.kind, report.code) == ("exit", 0)
    assert (tmp_path / "serial.log").read_text() == "to a file\n"
