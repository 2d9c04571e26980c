"""The snapshot directory: a versioned, checksummed state file, the spec, sparse RAM.

    DIR/state.bin    magic, format major.minor, then sections (name, length, SHA-256,
                     payload); each payload is one value of the codec (codec.py)
    DIR/spec.json    the machine's spec, as JSON (what to build before restoring)
    DIR/memory.raw   guest RAM, one run after another; all-zero pages are holes

docs/snapshot-format.md is the full description. A file loads only with this major
version and a minor version not newer than this one (MAJOR, MINOR). Everything read is
checked before anything is built from it: the magic, the version, the header's CRC,
every section's length and SHA-256, the spec's SHA-256 (kept in the state), the memory
file's size; and the memory's own SHA-256 when it is read anyway (copy_memory) or on
request (verify_memory), since reading 256 MiB to check it would defeat mapping it
lazily (open_memory). Every flaw is one SnapshotError line naming the file.

Writing puts every file under a temporary name first and renames them when all are
complete, state.bin last, so a directory holding state.bin holds a whole snapshot. Any
failure (a full disk) removes what was written, and the directory if it was created.

What does not live here: what the state means (state.py and each part's restore), the
value encoding (codec.py), pausing and building machines (the lifecycle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from corevisor.errors import SnapshotError
from corevisor.memory import GuestMemory, MemoryRegion, file_extents
from corevisor.snapshot import codec
from corevisor.snapshot.state import MachineSnapshot

__all__ = [
    "MAJOR",
    "MINOR",
    "MAGIC",
    "STATE_FILE",
    "SPEC_FILE",
    "MEMORY_FILE",
    "SnapshotMeta",
    "MemoryRun",
    "MemoryFile",
    "Snapshot",
    "write",
    "read",
    "copy_memory",
    "open_memory",
    "verify_memory",
]

MAGIC = b"\x89CVSNAP\n"  # a high byte and a newline: mangled by a text transfer, and seen
MAJOR = 1
MINOR = 2  # 1.1: HypercallsState gained clock_ns, the generation; 1.2: UserDeviceState.config
STATE_FILE = "state.bin"
SPEC_FILE = "spec.json"
MEMORY_FILE = "memory.raw"
PAGE = 4096
_CHUNK = 2 << 20  # memory is copied and checked for zero pages this much at a time
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE)
_HEADER = struct.Struct("<8sHHI")  # magic, major, minor, section count
_CRC = struct.Struct("<I")
_SECTION = struct.Struct("<QB")  # payload length, name length; name; SHA-256; payload
MAX_SECTIONS = 64
MAX_SPEC_BYTES = 1 << 20
_PARTIAL = ".partial"


@dataclass(frozen=True)
class SnapshotMeta:
    """Who wrote the snapshot, when, and the spec it belongs to."""

    name: str
    created: float  # seconds since the epoch
    writer: str  # "corevisor <version>"
    spec_sha256: bytes


@dataclass(frozen=True)
class MemoryRun:
    """Guest-physical [gpa, gpa + size) is at offset of the memory file."""

    gpa: int
    size: int
    offset: int


@dataclass(frozen=True)
class MemoryFile:
    """The memory file: its name, size, where each RAM run is, and a digest of its
    non-zero pages (see _digest) with how many bytes they hold."""

    file: str
    size: int
    runs: tuple[MemoryRun, ...]
    data_bytes: int
    sha256: bytes


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory that passed every check but the memory digest."""

    path: Path
    meta: SnapshotMeta
    spec: dict[str, Any]
    machine: MachineSnapshot
    memory: MemoryFile


# The sections of state.bin: SnapshotMeta, MemoryFile, then MachineSnapshot's fields.
_MACHINE_SECTIONS = tuple(f.name for f in fields(MachineSnapshot))
SECTIONS = ("meta", "memory", *_MACHINE_SECTIONS)


# --- writing ------------------------------------------------------------------------


def write(
    path: Path,
    spec: Mapping[str, Any],
    machine: MachineSnapshot,
    memory: GuestMemory,
    ram: Sequence[tuple[int, int]],
    name: str = "",
) -> Snapshot:
    """Write a snapshot of machine (paused) with the RAM runs ram (gpa, size) of memory
    into the directory path, which must not exist or be empty."""
    path = Path(path)
    spec_bytes = (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode()
    created_dir = _make_dir(path)
    written: list[Path] = []
    try:
        mem_file = _write_memory(path, memory, ram, written)
        _write_file(path / SPEC_FILE, spec_bytes, written)
        meta = SnapshotMeta(name, time.time(), _writer(), hashlib.sha256(spec_bytes).digest())
        sections = {"meta": meta, "memory": mem_file}
        sections.update({f: getattr(machine, f) for f in _MACHINE_SECTIONS})
        _write_file(path / STATE_FILE, _state_bytes(sections), written)
        for f in (MEMORY_FILE, SPEC_FILE, STATE_FILE):  # state.bin last: it marks "complete"
            os.rename(path / (f + _PARTIAL), path / f)
            written[written.index(path / (f + _PARTIAL))] = path / f
        _fsync_dir(path)
    except OSError as e:
        _remove(written, path if created_dir else None)
        raise SnapshotError(
            f"{path}: cannot write the snapshot: {e.strerror or e}; the partial files were "
            "removed"
        ) from None
    except BaseException:
        _remove(written, path if created_dir else None)
        raise
    return Snapshot(path, meta, json.loads(spec_bytes), machine, mem_file)


def _writer() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"corevisor {version('corevisor')}"
    except PackageNotFoundError:
        return "corevisor"


def _make_dir(path: Path) -> bool:
    """Create path (True), or accept an existing empty directory (False)."""
    try:
        path.mkdir(parents=True)
        return True
    except FileExistsError:
        if not path.is_dir() or any(path.iterdir()):
            raise SnapshotError(f"{path}: exists and is not an empty directory") from None
        return False
    except OSError as e:
        raise SnapshotError(f"{path}: cannot create the directory: {e.strerror or e}") from None


def _remove(written: list[Path], directory: Path | None) -> None:
    for p in written:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if directory is not None:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _write_file(path: Path, data: bytes, written: list[Path]) -> None:
    partial = path.with_name(path.name + _PARTIAL)
    written.append(partial)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_bytes(sections: Mapping[str, object]) -> bytes:
    head = _HEADER.pack(MAGIC, MAJOR, MINOR, len(sections))
    out = bytearray(head + _CRC.pack(zlib.crc32(head)))
    for name, value in sections.items():
        payload = codec.encode(value)
        raw = name.encode()
        out += _SECTION.pack(len(payload), len(raw)) + raw
        out += hashlib.sha256(payload).digest() + payload
    return bytes(out)


def _write_memory(
    path: Path, memory: GuestMemory, ram: Sequence[tuple[int, int]], written: list[Path]
) -> MemoryFile:
    """RAM runs one after another (page-aligned); only non-zero pages are written, so
    every zero page is a hole. Pages the guest never touched are skipped without being
    read: the memfd itself has holes there (SEEK_DATA)."""
    partial = path / (MEMORY_FILE + _PARTIAL)
    written.append(partial)
    runs = []
    offset = 0
    for gpa, size in ram:
        if gpa % PAGE or size % PAGE or not memory.contains(gpa, size):
            raise SnapshotError(f"RAM run {gpa:#x}+{size:#x} is not whole pages of guest RAM")
        runs.append(MemoryRun(gpa, size, offset))
        offset += size
    digest = hashlib.sha256()
    data_bytes = 0
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, offset)
        for run in runs:
            for off, data in _nonzero(memory, run):
                view = memoryview(data)
                pos = run.offset + off
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
                _digest(digest, run.offset + off, data)
                data_bytes += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return MemoryFile(MEMORY_FILE, offset, tuple(runs), data_bytes, digest.digest())


def _digest(digest: Any, offset: int, data: bytes) -> None:
    """The memory digest covers each maximal run of non-zero pages as (offset, length,
    bytes): the same whatever holes the file system kept, so it can be checked again."""
    digest.update(struct.pack("<QQ", offset, len(data)))
    digest.update(data)


def _nonzero(memory: GuestMemory, run: MemoryRun) -> Iterator[tuple[int, bytes]]:
    """(offset in run, bytes) of each maximal stretch of non-zero pages of run."""
    for gpa, size in memory.data_extents(run.gpa, run.size):
        start = gpa - run.gpa
        yield from _nonzero_pages(lambda a, n: memory.read(run.gpa + a, n), start, start + size)


def _nonzero_pages(
    read: Any, start: int, end: int
) -> Iterator[tuple[int, bytes]]:
    """Stretches of non-zero pages in [start, end), reading _CHUNK bytes at a time."""
    stretch_start = -1
    pieces: list[bytes] = []
    for chunk_at in range(start, end, _CHUNK):
        n = min(_CHUNK, end - chunk_at)
        chunk = read(chunk_at, n)
        if chunk == _ZERO_CHUNK[:n]:
            if pieces:
                yield stretch_start, b"".join(pieces)
                pieces = []
            continue
        for page in range(0, n, PAGE):
            data = chunk[page : page + PAGE]
            if data == _ZERO_PAGE[: len(data)]:
                if pieces:
                    yield stretch_start, b"".join(pieces)
                    pieces = []
            else:
                if not pieces:
                    stretch_start = chunk_at + page
                pieces.append(data)
    if pieces:
        yield stretch_start, b"".join(pieces)


# --- reading ------------------------------------------------------------------------


def read(path: Path) -> Snapshot:
    """Read and check a snapshot directory (not the memory digest: see the module)."""
    path = Path(path)
    state_path = path / STATE_FILE
    try:
        raw = state_path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{path}: not a snapshot (no {STATE_FILE})") from None
    except OSError as e:
        raise SnapshotError(f"{state_path}: cannot read: {e.strerror or e}") from None
    sections = _sections(raw, state_path)
    meta, mem = sections["meta"], sections["memory"]
    if not isinstance(meta, SnapshotMeta) or not isinstance(mem, MemoryFile):
        raise SnapshotError(f"{state_path}: the meta or memory section holds the wrong record")
    spec = _read_spec(path / SPEC_FILE, meta)
    machine = MachineSnapshot(**{f: sections[f] for f in _MACHINE_SECTIONS})
    _check_memory_file(path, mem)
    return Snapshot(path, meta, spec, machine, mem)


def _sections(raw: bytes, where: Path) -> dict[str, Any]:
    if len(raw) < _HEADER.size + _CRC.size:
        raise SnapshotError(f"{where}: truncated ({len(raw)} bytes, not even a header)")
    magic, major, minor, count = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise SnapshotError(f"{where}: not a corevisor snapshot (bad magic)")
    (crc,) = _CRC.unpack_from(raw, _HEADER.size)
    if crc != zlib.crc32(raw[: _HEADER.size]):
        raise SnapshotError(f"{where}: the header is corrupt (CRC mismatch)")
    if major != MAJOR or minor > MINOR:
        raise SnapshotError(
            f"{where}: snapshot format {major}.{minor}; this corevisor reads {MAJOR}.0 to "
            f"{MAJOR}.{MINOR}"
        )
    if count > MAX_SECTIONS:
        raise SnapshotError(f"{where}: {count} sections (corrupt)")
    pos = _HEADER.size + _CRC.size
    out: dict[str, Any] = {}
    for _ in range(count):
        if pos + _SECTION.size > len(raw):
            raise SnapshotError(f"{where}: truncated in section {len(out) + 1} of {count}")
        length, name_len = _SECTION.unpack_from(raw, pos)
        pos += _SECTION.size
        name = raw[pos : pos + name_len].decode("ascii", "replace")
        body = pos + name_len + 32
        if body + length > len(raw):
            raise SnapshotError(f"{where}: truncated in section {name!r}")
        payload = raw[body : body + length]
        if hashlib.sha256(payload).digest() != raw[pos + name_len : body]:
            raise SnapshotError(f"{where}: section {name!r} is corrupt (checksum mismatch)")
        if name not in SECTIONS or name in out:
            raise SnapshotError(f"{where}: unexpected section {name!r}")
        out[name] = codec.decode(payload, f"{where} section {name!r}")
        pos = body + length
    if pos != len(raw):
        raise SnapshotError(f"{where}: {len(raw) - pos} bytes after the last section")
    missing = [s for s in SECTIONS if s not in out]
    if missing:
        raise SnapshotError(f"{where}: sections missing: {', '.join(missing)}")
    return out


def _read_spec(path: Path, meta: SnapshotMeta) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read: {e.strerror or e}") from None
    if hashlib.sha256(data).digest() != meta.spec_sha256:
        raise SnapshotError(f"{path}: does not match the snapshot (checksum mismatch)")
    try:
        spec = json.loads(data)
    except ValueError as e:
        raise SnapshotError(f"{path}: not JSON ({e})") from None
    if not isinstance(spec, dict):
        raise SnapshotError(f"{path}: the spec is not a JSON object")
    return spec


def _check_memory_file(path: Path, mem: MemoryFile) -> None:
    where = path / mem.file
    if mem.file != MEMORY_FILE:
        raise SnapshotError(f"{path}: the memory section names {mem.file!r}")
    try:
        size = os.stat(where).st_size
    except OSError as e:
        raise SnapshotError(f"{where}: cannot open: {e.strerror or e}") from None
    if size != mem.size:
        raise SnapshotError(f"{where}: {size} bytes, the snapshot says {mem.size} (truncated?)")
    end = 0
    for run in mem.runs:
        if not isinstance(run, MemoryRun) or run.offset != end or run.size % PAGE:
            raise SnapshotError(f"{path}: the memory runs are corrupt")
        end += run.size
    if end != mem.size:
        raise SnapshotError(f"{path}: the memory runs cover {end} bytes, the file {mem.size}")


# --- memory back into a machine ------------------------------------------------------


def copy_memory(snap: Snapshot, memory: GuestMemory) -> None:
    """Copy the saved RAM into memory (a fresh machine's, all zero), checking the
    digest on the way: a mismatch raises after the copy, and the caller discards the
    machine it was for. Only the file's data extents are read."""
    for run in snap.memory.runs:
        if not memory.contains(run.gpa, run.size):
            raise SnapshotError(
                f"{snap.path}: RAM run {run.gpa:#x}+{run.size:#x} is not in this machine's RAM"
            )
    for run in snap.memory.runs:
        memory.discard(run.gpa, run.size)  # what the build loaded there is not the guest's
    digest = hashlib.sha256()
    data = 0
    for run, at, piece in _file_pieces(snap):
        memory.write(run.gpa + at, piece)
        _digest(digest, run.offset + at, piece)
        data += len(piece)
    _check_digest(snap, digest.digest(), data)


def verify_memory(snap: Snapshot) -> None:
    """Check the memory file against its digest (reads all of its data)."""
    digest = hashlib.sha256()
    data = 0
    for run, at, piece in _file_pieces(snap):
        _digest(digest, run.offset + at, piece)
        data += len(piece)
    _check_digest(snap, digest.digest(), data)


def _check_digest(snap: Snapshot, digest: bytes, data: int) -> None:
    if (digest, data) != (snap.memory.sha256, snap.memory.data_bytes):
        raise SnapshotError(f"{snap.path / MEMORY_FILE}: corrupt (its checksum does not match)")


def _file_pieces(snap: Snapshot) -> Iterator[tuple[MemoryRun, int, bytes]]:
    """(run, offset in run, bytes) of each maximal stretch of non-zero pages of the
    memory file, per run (as _write_memory wrote them)."""
    where = snap.path / MEMORY_FILE
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"{where}: cannot open: {e.strerror or e}") from None
    try:
        if not snap.memory.size:
            return
        mm = mmap.mmap(fd, snap.memory.size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            for run in snap.memory.runs:
                base = run.offset
                for a, b in file_extents(fd, base, base + run.size):
                    for at, piece in _nonzero_pages(
                        lambda x, n, base=base: mm[base + x : base + x + n], a - base, b - base
                    ):
                        yield run, at, piece
        finally:
            mm.close()
    finally:
        os.close(fd)


def open_memory(snap: Snapshot, private: bool = True) -> GuestMemory:
    """The saved RAM as a GuestMemory backed by the memory file itself.

    private (the default): mapped copy-on-write (MAP_PRIVATE), so pages load on first
    touch and the guest's writes stay in this process, never in the file; clones of one
    snapshot share the pages none of them wrote. Not private: the file is copied into a
    fresh memfd first (the snapshot can then be deleted), digest checked.
    """
    mem = snap.memory
    if not private:
        memory = GuestMemory.anonymous([(r.gpa, r.size) for r in mem.runs], name="restored-ram")
        try:
            copy_memory(snap, memory)
        except BaseException:
            memory.close()
            raise
        return memory
    where = snap.path / MEMORY_FILE
    regions: list[MemoryRegion] = []
    try:
        for run in mem.runs:
            fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
            try:
                mm = mmap.mmap(
                    fd, run.size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=run.offset,
                )
            except BaseException:
                os.close(fd)
                raise
            regions.append(MemoryRegion(run.gpa, run.size, fd=fd, offset=run.offset, mm=mm))
        return GuestMemory(regions)
    except OSError as e:
        for r in regions:
            r.mm.close()
            os.close(r.fd)
        raise SnapshotError(f"{where}: cannot map: {e.strerror or e}") from None
