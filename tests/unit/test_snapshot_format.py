"""The snapshot directory: round trips, sparse memory, and every kind of damage refused
with one clear line (corrupt sections, truncation, versions, spec, memory, a full disk)."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from corevisor.errors import SnapshotError
from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import SupportedCpuid
from corevisor.memory import GuestMemory
from corevisor.snapshot import format as fmt
from corevisor.snapshot import state as st

MIB = 1 << 20
RAM = [(0, 8 * MIB), (16 * MIB, 4 * MIB)]


def _zero(cls: type, ctype: type[ctypes.Structure]) -> object:
    return st._from_c(cls, ctype())


def machine_snapshot() -> st.MachineSnapshot:
    """A state of the right shape (zeroed KVM structures) for tests that need no KVM."""
    vcpu = st.KvmVcpuState(
        index=0,
        cpuid=(SupportedCpuid(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),),
        tsc_khz=2_100_000,
        mp_state=b.KVM_MP_STATE_RUNNABLE,
        regs=_zero(st.Registers, b.kvm_regs),  # type: ignore[arg-type]
        sregs=_zero(st.SpecialRegisters, b.kvm_sregs),  # type: ignore[arg-type]
        xsave=bytes(4096),
        xcrs=(st.Xcr(0, 1),),
        debugregs=_zero(st.DebugRegisters, b.kvm_debugregs),  # type: ignore[arg-type]
        lapic=bytes(1024),
        msrs=(st.Msr(0x10, 12345), st.Msr(0x6E0, 0)),
        msrs_unreadable=(),
        events=_zero(st.VcpuEvents, b.kvm_vcpu_events),  # type: ignore[arg-type]
    )
    vm = st.KvmVmState(
        pic_master=_zero(st.PicState, b.kvm_pic_state),  # type: ignore[arg-type]
        pic_slave=_zero(st.PicState, b.kvm_pic_state),  # type: ignore[arg-type]
        ioapic=_zero(st.IoapicState, b.kvm_ioapic_state),  # type: ignore[arg-type]
        pit=_zero(st.PitState, b.kvm_pit_state2),  # type: ignore[arg-type]
        clock=st.ClockState(123, 0),
    )
    return st.MachineSnapshot(
        host=st.HostCpu("GenuineIntel", 0x906EA, 4096),
        vm=vm,
        vcpus=(vcpu,),
        devices=(("postcode", st.Msr(1, 2)),),
    )


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous(RAM)
    m.write(0x1000, b"boot code")
    m.write(0x7F_F000, b"\xff" * 4096)  # the last page of the first run
    m.write(16 * MIB + 0x2000, b"second run")
    m.write(0x40_0000, b"written, then zeroed")
    m.fill(0x40_0000, 4096)  # touched (not a hole in the memfd) but all zero
    yield m
    m.close()


@pytest.fixture
def snap(tmp_path: Path, memory: GuestMemory) -> fmt.Snapshot:
    return fmt.write(tmp_path / "snap", {"name": "t", "memory": 12 * MIB}, machine_snapshot(),
                     memory, RAM, name="t")


def _sections(raw: bytes) -> dict[str, tuple[int, int]]:
    """name -> (payload offset, length) in a state file, read independently of format.py."""
    count = struct.unpack_from("<I", raw, 12)[0]
    pos = 20
    out = {}
    for _ in range(count):
        length, name_len = struct.unpack_from("<QB", raw, pos)
        name = raw[pos + 9 : pos + 9 + name_len].decode()
        body = pos + 9 + name_len + 32
        out[name] = (body, length)
        pos = body + length
    assert pos == len(raw)
    return out


def _error(path: Path) -> str:
    with pytest.raises(SnapshotError) as e:
        fmt.read(path)
    text = str(e.value)
    assert "\n" not in text  # one line
    return text


# --- round trips ----------------------------------------------------------------------


def test_write_then_read_gives_everything_back(snap: fmt.Snapshot, tmp_path: Path) -> None:
    back = fmt.read(tmp_path / "snap")
    assert back.machine == machine_snapshot()
    assert back.spec == {"name": "t", "memory": 12 * MIB}
    assert back.meta.name == "t" and back.meta.writer.startswith("corevisor")
    assert sorted(os.listdir(tmp_path / "snap")) == ["memory.raw", "spec.json", "state.bin"]
    raw = (tmp_path / "snap" / "state.bin").read_bytes()
    assert raw[:8] == fmt.MAGIC and struct.unpack_from("<HH", raw, 8) == (1, 2)
    assert list(_sections(raw)) == list(fmt.SECTIONS)


def test_memory_file_is_sparse_and_restores_exactly(
    snap: fmt.Snapshot, memory: GuestMemory, tmp_path: Path
) -> None:
    path = tmp_path / "snap" / "memory.raw"
    info = os.stat(path)
    assert info.st_size == 12 * MIB  # the runs back to back
    assert snap.memory.data_bytes == 3 * 4096  # three non-zero pages; the zeroed one is not
    assert info.st_blocks * 512 <= 3 * 4096  # everything else is a hole
    assert snap.memory.runs == (fmt.MemoryRun(0, 8 * MIB, 0), fmt.MemoryRun(16 * MIB, 4 * MIB,
                                                                              8 * MIB))
    fresh = GuestMemory.anonymous(RAM)
    try:
        fresh.write(0x5000, b"what a build loaded")  # must not survive the copy
        fmt.copy_memory(fmt.read(tmp_path / "snap"), fresh)
        for gpa, size in RAM:
            assert fresh.read(gpa, size) == memory.read(gpa, size)
    finally:
        fresh.close()


def test_open_memory_maps_the_file_copy_on_write(snap: fmt.Snapshot, memory: GuestMemory,
                                                 tmp_path: Path) -> None:
    before = (tmp_path / "snap" / "memory.raw").read_bytes()
    mapped = fmt.open_memory(fmt.read(tmp_path / "snap"))
    try:
        for gpa, size in RAM:
            assert mapped.read(gpa, size) == memory.read(gpa, size)
        mapped.write(0x1000, b"guest writes stay here")
        assert mapped.read(0x1000, 22) == b"guest writes stay here"
        # copy-on-write pages are not holes of the file: a second snapshot reads them all
        assert mapped.data_extents(0, 8 * MIB) == [(0, 8 * MIB)]
    finally:
        mapped.close()
    assert (tmp_path / "snap" / "memory.raw").read_bytes() == before
    copied = fmt.open_memory(fmt.read(tmp_path / "snap"), private=False)
    try:
        assert copied.read(16 * MIB + 0x2000, 10) == b"second run"
    finally:
        copied.close()


def test_memfd_holes_are_skipped_without_reading(memory: GuestMemory) -> None:
    extents = memory.data_extents(0, 8 * MIB)
    assert sum(size for _, size in extents) <= 3 * 4096
    assert all(gpa % 4096 == 0 and size % 4096 == 0 for gpa, size in extents)


# --- damage ---------------------------------------------------------------------------


@pytest.mark.parametrize("section", fmt.SECTIONS)
def test_a_corrupt_section_is_named(snap: fmt.Snapshot, tmp_path: Path, section: str) -> None:
    path = tmp_path / "snap" / "state.bin"
    raw = bytearray(path.read_bytes())
    body, length = _sections(bytes(raw))[section]
    raw[body + length // 2] ^= 0x20
    path.write_bytes(raw)
    expected = f"{path}: section {section!r} is corrupt (checksum mismatch)"
    assert _error(tmp_path / "snap") == expected


@pytest.mark.parametrize("cut", [0, 7, 19, 20, 25, 200, -1])
def test_a_truncated_state_file_is_refused(snap: fmt.Snapshot, tmp_path: Path, cut: int) -> None:
    path = tmp_path / "snap" / "state.bin"
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    assert "truncated" in _error(tmp_path / "snap")


def test_truncation_at_a_section_boundary_is_refused(snap: fmt.Snapshot, tmp_path: Path) -> None:
    path = tmp_path / "snap" / "state.bin"
    raw = path.read_bytes()
    body, length = _sections(raw)["vm"]
    path.write_bytes(raw[: body + length])
    assert "truncated in section" in _error(tmp_path / "snap")
    path.write_bytes(raw + b"\0")
    assert "1 bytes after the last section" in _error(tmp_path / "snap")


def _rewrite_header(path: Path, major: int, minor: int) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into("<HH", raw, 8, major, minor)
    struct.pack_into("<I", raw, 16, zlib.crc32(raw[:16]))
    path.write_bytes(raw)


@pytest.mark.parametrize("major, minor", [(2, 0), (0, 9), (1, 3)])
def test_other_versions_are_refused(snap: fmt.Snapshot, tmp_path: Path, major: int,
                                    minor: int) -> None:
    _rewrite_header(tmp_path / "snap" / "state.bin", major, minor)
    text = _error(tmp_path / "snap")
    assert f"snapshot format {major}.{minor}; this corevisor reads 1.0 to 1.2" in text


def test_an_older_minor_version_loads(snap: fmt.Snapshot, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MINOR", 4)  # this reader is 1.4, the file 1.2
    assert fmt.read(tmp_path / "snap").machine == machine_snapshot()
    _rewrite_header(tmp_path / "snap" / "state.bin", 1, 4)
    assert fmt.read(tmp_path / "snap").machine == machine_snapshot()


def test_header_damage_is_caught(snap: fmt.Snapshot, tmp_path: Path) -> None:
    path = tmp_path / "snap" / "state.bin"
    raw = bytearray(path.read_bytes())
    raw[12] ^= 1  # the section count
    path.write_bytes(raw)
    assert "header is corrupt (CRC mismatch)" in _error(tmp_path / "snap")
    raw[12] ^= 1
    raw[1] = ord("X")
    path.write_bytes(raw)
    assert "not a corevisor snapshot (bad magic)" in _error(tmp_path / "snap")


def test_a_changed_spec_is_refused(snap: fmt.Snapshot, tmp_path: Path) -> None:
    spec = tmp_path / "snap" / "spec.json"
    spec.write_text(spec.read_text().replace("12582912", "12582913"))
    assert _error(tmp_path / "snap") == f"{spec}: does not match the snapshot (checksum mismatch)"


def test_memory_damage_is_caught(snap: fmt.Snapshot, tmp_path: Path) -> None:
    mem = tmp_path / "snap" / "memory.raw"
    with mem.open("r+b") as f:
        f.seek(0x1000)
        f.write(b"B")  # "boot code" -> "Boot code"
    loaded = fmt.read(tmp_path / "snap")  # the size is right: reading works ...
    with pytest.raises(SnapshotError, match="memory.raw: corrupt"):
        fmt.verify_memory(loaded)  # ... the digest does not
    fresh = GuestMemory.anonymous(RAM)
    try:
        with pytest.raises(SnapshotError, match="memory.raw: corrupt"):
            fmt.copy_memory(loaded, fresh)
    finally:
        fresh.close()
    os.truncate(mem, 4 * MIB)
    assert "memory.raw: 4194304 bytes, the snapshot says 12582912 (truncated?)" in _error(
        tmp_path / "snap"
    )


def test_not_a_snapshot_and_occupied_directories(tmp_path: Path, memory: GuestMemory) -> None:
    assert "not a snapshot (no state.bin)" in _error(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(SnapshotError, match="exists and is not an empty directory"):
        fmt.write(tmp_path / "busy", {}, machine_snapshot(), memory, RAM)
    assert os.listdir(tmp_path / "busy") == ["x"]


def test_a_section_with_a_valid_checksum_but_garbage_inside(snap: fmt.Snapshot,
                                                            tmp_path: Path) -> None:
    # Someone rewrote a section and fixed its checksum: the codec still refuses it.
    path = tmp_path / "snap" / "state.bin"
    raw = bytearray(path.read_bytes())
    body, length = _sections(bytes(raw))["host"]
    raw[body] = 0x09  # an unknown tag
    raw[body - 32 : body] = hashlib.sha256(raw[body : body + length]).digest()
    path.write_bytes(raw)
    assert "section 'host'" in _error(tmp_path / "snap") and "unknown tag" in _error(
        tmp_path / "snap"
    )


# --- a full disk ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_removes_the_partial_files(small_disk: Path, existing: bool) -> None:
    target = small_disk / "snap"
    if existing:
        target.mkdir()
    memory = GuestMemory.anonymous(RAM)
    try:
        for page in range(0, 2 * MIB, 4096):  # 2 MiB of data for a 1 MiB disk
            memory.write(page, b"\x01")
        with pytest.raises(SnapshotError) as e:
            fmt.write(target, {}, machine_snapshot(), memory, RAM)
    finally:
        memory.close()
    assert str(e.value) == (
        f"{target}: cannot write the snapshot: No space left on device; the partial files "
        "were removed"
    )
    assert os.listdir(small_disk) == (["snap"] if existing else [])
    assert not existing or os.listdir(target) == []
    # and the disk is usable again: a snapshot that fits is written there
    fits = GuestMemory.anonymous(RAM)
    try:
        fmt.write(small_disk / "ok", {}, machine_snapshot(), fits, RAM)
    finally:
        fits.close()
    assert fmt.read(small_disk / "ok").machine == machine_snapshot()


# --- the CPU a snapshot resumes on -------------------------------------------------------


def test_another_cpu_is_refused_with_both_named() -> None:
    here = st.HostCpu("GenuineIntel", 0x906EA, 4096)
    st.check_host_cpu(here, here)
    with pytest.raises(SnapshotError) as e:
        st.check_host_cpu(st.HostCpu("AuthenticAMD", 0xA20F12, 4096), here)
    assert str(e.value) == (
        "the snapshot was taken on AuthenticAMD family 0x19 model 0x21 stepping 2; this host "
        "is GenuineIntel family 0x6 model 0x9e stepping 10"
    )
    with pytest.raises(SnapshotError, match="model 0x9f"):
        st.check_host_cpu(dataclasses.replace(here, signature=0x906FA), here)
    with pytest.raises(SnapshotError, match="XSAVE state is 11008 bytes"):
        st.check_host_cpu(dataclasses.replace(here, xsave_size=11008), here)
