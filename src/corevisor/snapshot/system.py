"""A whole system's snapshot: every partition's, plus what belongs to the system -- the
channels' shared memory and the doorbell rings not yet delivered.

    DIR/system.json            kind "system", format version, the partitions in order,
                               per channel its spec, doorbell counts, memory file, digest
    DIR/partitions/NAME/       one partition snapshot each (docs/snapshot-format.md)
    DIR/channels/NAME.raw      a channel's shared memory; all-zero pages are holes

system.json is written last: a directory holding it holds a whole system snapshot. The
caller (System.snapshot_system) has every partition frozen and every doorbell relay
held while write runs, so the partitions and the channels are taken at one instant;
read checks every file before anything is built. What does not live here: partitions
in a running system (system.py), one partition's files (format.py, partition.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corevisor.channel import Channel, ChannelState
from corevisor.errors import SnapshotError
from corevisor.machine import Machine
from corevisor.memory import file_extents
from corevisor.snapshot import format as fmt
from corevisor.snapshot import state as st
from corevisor.snapshot.partition import _from_json, _to_json, ram_runs, snapshot_spec
from corevisor.spec import ChannelSpec

__all__ = ["SYSTEM_FILE", "SavedChannel", "SystemSnapshot", "write", "read", "is_system",
           "load_channel"]

SYSTEM_FILE = "system.json"
KIND = "system"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SavedChannel:
    spec: ChannelSpec
    state: ChannelState
    file: Path
    sha256: str


@dataclass(frozen=True)
class SystemSnapshot:
    path: Path
    partitions: tuple[tuple[str, Path], ...]  # name, its snapshot directory, in order
    channels: tuple[SavedChannel, ...]


def is_system(path: Path) -> bool:
    return (Path(path) / SYSTEM_FILE).exists()


def write(path: Path, machines: Sequence[Machine], channels: Sequence[Channel]) -> SystemSnapshot:
    """Save frozen machines and held channels into the directory path (must not exist or
    be empty); on failure every file written is removed and SnapshotError says why."""
    path = Path(path)
    created = fmt._make_dir(path)
    try:
        parts = []
        for m in machines:
            where = path / "partitions" / m.name
            fmt.write(where, snapshot_spec(m), st.capture_machine(m), m.memory, ram_runs(m),
                      name=m.name)
            parts.append((m.name, where))
        saved = [_write_channel(path / "channels", ch) for ch in channels]
        doc = {
            "kind": KIND, "format": [fmt.MAJOR, fmt.MINOR],
            "partitions": [name for name, _ in parts],
            "channels": [
                {"spec": _to_json(c.spec), "state": _to_json(c.state),
                 "file": c.file.name, "sha256": c.sha256} for c in saved
            ],
        }
        _write_json(path / SYSTEM_FILE, doc)
    except OSError as e:
        _remove(path, created)
        raise SnapshotError(f"{path}: cannot write the snapshot: {e.strerror or e}; the "
                            "partial files were removed") from None
    except BaseException:
        _remove(path, created)  # a partition's own write removed its files and says why
        raise
    return SystemSnapshot(path, tuple(parts), tuple(saved))


def _remove(path: Path, created: bool) -> None:
    for child in ("partitions", "channels"):
        shutil.rmtree(path / child, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (path / SYSTEM_FILE).unlink()
    if created:
        with contextlib.suppress(OSError):
            path.rmdir()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, path)


def _write_channel(where: Path, ch: Channel) -> SavedChannel:
    """The channel's memfd, sparse, with a digest of every byte."""
    where.mkdir(parents=True, exist_ok=True)
    target = where / f"{ch.name}.raw"
    digest = hashlib.sha256()
    size = ch.config.size
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(out, size)
        for a, b in file_extents(ch.fd, 0, size):
            for at in range(a, b, _CHUNK):
                data = os.pread(ch.fd, min(_CHUNK, b - at), at)
                if data.count(0) != len(data):
                    os.pwrite(out, data, at)
        os.fsync(out)
    finally:
        os.close(out)
    with open(target, "rb") as f:
        while piece := f.read(_CHUNK):
            digest.update(piece)
    return SavedChannel(ch.config, ch.save(), target, digest.hexdigest())


def read(path: Path) -> SystemSnapshot:
    """Read and check a system snapshot (every partition's files, every channel's)."""
    path = Path(path)
    where = path / SYSTEM_FILE
    try:
        doc = json.loads(where.read_bytes())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{where}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise SnapshotError(f"{where}: not a system snapshot")
    version = doc.get("format")
    if not isinstance(version, list) or len(version) != 2 or version[0] != fmt.MAJOR \
            or not isinstance(version[1], int) or version[1] > fmt.MINOR:
        raise SnapshotError(f"{where}: snapshot format {version}; this corevisor reads "
                            f"{fmt.MAJOR}.0 to {fmt.MAJOR}.{fmt.MINOR}")
    names = doc.get("partitions")
    if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n
                                               and n not in ("", ".", "..") for n in names):
        raise SnapshotError(f"{where}: the partition list is corrupt")
    parts = tuple((n, path / "partitions" / n) for n in names)
    for _, p in parts:
        fmt.read(p)  # each checked now: a bad one starts nothing
    channels = tuple(_read_channel(path, c, f"{where}: channels[{i}]")
                     for i, c in enumerate(doc.get("channels", [])))
    return SystemSnapshot(path, parts, channels)


def _read_channel(path: Path, doc: object, where: str) -> SavedChannel:
    if not isinstance(doc, dict) or not isinstance(doc.get("file"), str) \
            or "/" in doc["file"] or not isinstance(doc.get("sha256"), str):
        raise SnapshotError(f"{where}: corrupt")
    spec = _from_json(ChannelSpec, doc.get("spec"), f"{where}.spec")
    state = _from_json(ChannelState, doc.get("state"), f"{where}.state")
    file = path / "channels" / doc["file"]
    digest = hashlib.sha256()
    try:
        if file.stat().st_size != spec.size:
            raise SnapshotError(f"{file}: {file.stat().st_size} bytes, the channel has "
                                f"{spec.size} (truncated?)")
        with open(file, "rb") as f:
            while piece := f.read(_CHUNK):
                digest.update(piece)
    except OSError as e:
        raise SnapshotError(f"{file}: cannot read: {e.strerror or e}") from None
    if digest.hexdigest() != doc["sha256"]:
        raise SnapshotError(f"{file}: corrupt (its checksum does not match)")
    return SavedChannel(spec, state, file, doc["sha256"])


def load_channel(ch: Channel, saved: SavedChannel) -> None:
    """Copy a saved channel's memory into a fresh channel's memfd (its data extents)."""
    fd = os.open(saved.file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for a, b in file_extents(fd, 0, saved.spec.size):
            for at in range(a, b, _CHUNK):
                os.pwrite(ch.fd, os.pread(fd, min(_CHUNK, b - at), at), at)
    finally:
        os.close(fd)

