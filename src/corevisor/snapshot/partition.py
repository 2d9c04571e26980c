"""A partition's snapshot as the lifecycle takes and restores it: freeze, capture, write;
read, check, build, restore. And the spec file that goes with it.

    take(machine, DIR)          refuse early (movable) what cannot be saved, then, with the
                                machine frozen (machine.py: paused, I/O threads parked,
                                doorbells held, disks synced), capture its state and write
                                the snapshot; the machine then runs on as it was
    restore(snap, overrides)    the spec from spec.json with the overrides applied (what
                                must differ: name, serial, TAPs, disks, cores), checked as
                                a system file's partition would be, RAM from the memory
                                file (mapped copy-on-write, or copied on request), then
                                builder.restore: an unstarted machine that continues the
                                saved guest where it was

spec.json is the PartitionSpec field by field (spec_to_json / spec_from_json): lossless,
every path absolute, read back with the types of spec.py and every value checked, so a
crafted file gives one SnapshotError naming the key. It is not the system file's written
form (that one resolves images and checks them; a restore needs no image).

What does not live here: the file format (format.py), the vCPU/VM state (state.py),
partitions in a system (system.py), migration (migrate.py).
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from corevisor.arch.x86_64 import layout
from corevisor.errors import ConfigError, SnapshotError
from corevisor.machine import Machine
from corevisor.snapshot import format as fmt
from corevisor.snapshot import save_parts
from corevisor.snapshot import state as st
from corevisor.spec import BlkSpec, NetSpec, PartitionSpec, SerialSpec

__all__ = [
    "Overrides",
    "spec_to_json",
    "spec_from_json",
    "movable",
    "take",
    "snapshot_spec",
    "restore",
    "restored_spec",
    "spec_for_restore",
    "read",
    "ram_runs",
]

KIND = "partition"  # spec.json's "kind" for a partition snapshot


@dataclass(frozen=True)
class Overrides:
    """What a restored partition (a clone) gets instead of what was saved. None keeps
    the saved value; taps and disks, when given, replace every device's, in order."""

    name: str | None = None
    serial: SerialSpec | None = None
    taps: tuple[str, ...] | None = None
    disks: tuple[Path, ...] | None = None
    pin: tuple[int, ...] | None = None
    copy_memory: bool = False  # copy the memory file into fresh RAM (else map it)


# --- spec.json ----------------------------------------------------------------------


def spec_to_json(spec: PartitionSpec) -> dict[str, Any]:
    """spec as JSON values, field by field; paths made absolute (a restore may run in
    another directory)."""
    return {"kind": KIND, "partition": _to_json(spec)}


def _to_json(value: object) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def spec_from_json(doc: object, where: str) -> PartitionSpec:
    """The PartitionSpec of a spec.json document; SnapshotError naming the key."""
    if not isinstance(doc, dict) or doc.get("kind") != KIND or "partition" not in doc:
        raise SnapshotError(f"{where}: not the spec of a partition snapshot")
    spec = _from_json(PartitionSpec, doc["partition"], f"{where}: partition")
    assert isinstance(spec, PartitionSpec)
    return spec


def _from_json(hint: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _from_json(inner, value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise SnapshotError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SnapshotError(f"{where}: expected {len(args)} values")
        return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in
                     enumerate(zip(args, value, strict=True)))
    if is_dataclass(hint):
        return _record(typing.cast(type, hint), value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise SnapshotError(f"{where}: {value!r} is not a {hint.__name__}") from None
    if hint is Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise SnapshotError(f"{where}: expected a path")
        return Path(value)
    if hint in (int, str, bool):
        if type(value) is not hint:
            raise SnapshotError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    if hint is Any:  # a user device's parameter (DeviceSpec.params): plain values
        return _plain(value, where)
    raise SnapshotError(f"{where}: cannot read a {hint!r}")  # pragma: no cover - spec.py grew


def _plain(value: object, where: str) -> Any:
    """A JSON scalar as it is, an array as a tuple of them: what a device's parameters
    are (userdev/load.py), so a restored spec equals the saved one."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, list):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise SnapshotError(f"{where}: expected a plain value, got {type(value).__name__}")


def _record(cls: type, value: object, where: str) -> Any:
    if not isinstance(value, dict):
        raise SnapshotError(f"{where}: expected an object")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise SnapshotError(f"{where}: unknown key {unknown[0]!r}")
    kwargs = {k: _from_json(hints[k], v, f"{where}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"{where}: {e}") from None


# --- taking one ---------------------------------------------------------------------


def ram_runs(m: Machine) -> list[tuple[int, int]]:
    """The machine's RAM, (gpa, size) runs: what a snapshot or a migration moves (its
    channels are the system's)."""
    return layout.ram_layout(m.spec.memory)


def movable(m: Machine) -> None:
    """Refuse, before anything is paused, a machine whose state corevisor cannot save:
    a dry run of every part's save() (a part that cannot be saved says why), and a GDB
    session (its breakpoints and single-step state live in the debugger)."""
    if any(v.debug_handler is not None for v in m.vcpus):
        raise SnapshotError(
            f"{m.name}: a GDB stub is attached, and its breakpoints and stepping are not "
            "state a snapshot can hold (run it without --gdb)"
        )
    try:
        save_parts(m.devices)
    except SnapshotError as e:
        raise SnapshotError(f"{m.name}: cannot be saved: {e}") from None


def snapshot_spec(m: Machine) -> dict[str, Any]:
    """What spec.json holds for m."""
    if m.spec is None:
        raise SnapshotError(f"{m.name}: built without a spec, cannot be saved")
    return spec_to_json(m.spec)


def take(m: Machine, path: Path, name: str = "") -> fmt.Snapshot:
    """A snapshot of m (running, paused or created) in the directory path; m runs on as
    before. On a write failure the partial files are gone and m runs on."""
    movable(m)
    spec = snapshot_spec(m)
    with m.frozen():
        sync_disks(m)
        machine = st.capture_machine(m)
        return fmt.write(path, spec, machine, m.memory, ram_runs(m), name=name or m.name)


def sync_disks(m: Machine) -> None:
    """Make every write the guest's disks completed durable (the snapshot's RAM believes
    them done)."""
    for part in m.devices.values():
        device: Any = getattr(part, "device", None)  # a virtio transport's back end
        if device is None or not hasattr(device, "sync"):
            continue
        try:
            device.sync()
        except OSError as e:
            raise SnapshotError(f"{m.name}: cannot sync {device.name}: {e.strerror or e}") from None


# --- restoring one ------------------------------------------------------------------


def restored_spec(snap: fmt.Snapshot, overrides: Overrides) -> PartitionSpec:
    """The snapshot's spec with the overrides applied, checked against this host."""
    return spec_for_restore(snap.spec, str(snap.path / fmt.SPEC_FILE), overrides)


def spec_for_restore(doc: object, where: str, overrides: Overrides) -> PartitionSpec:
    """A saved spec document (spec.json, a migration's HELLO) with the overrides
    applied, checked against this host as a partition of a system file would be."""
    spec = apply(spec_from_json(doc, where), overrides, where)
    from corevisor.config.host import gather
    from corevisor.config.validate import Keys, validate_partition

    try:
        validate_partition(spec, Keys(prefix=f"{where}: "), gather(), gdb_allow_remote=True)
    except ConfigError as e:
        raise SnapshotError(str(e)) from None
    return spec


def apply(spec: PartitionSpec, o: Overrides, where: str) -> PartitionSpec:
    """spec with what o gives instead; a device count that does not match is refused."""
    changes: dict[str, Any] = {}
    if o.name is not None:
        changes["name"] = o.name
    if o.serial is not None:
        changes["serial"] = o.serial
    if o.pin is not None:
        changes["pin"] = o.pin
    virtio = spec.virtio
    if o.taps is not None:
        _same_count("TAP", len(o.taps), len(virtio.net), where)
        virtio = replace(virtio, net=tuple(NetSpec(t) for t in o.taps))
    if o.disks is not None:
        _same_count("disk", len(o.disks), len(virtio.blk), where)
        virtio = replace(virtio, blk=tuple(
            BlkSpec(Path(p), b.readonly) for p, b in zip(o.disks, virtio.blk, strict=True)
        ))
    if virtio is not spec.virtio:
        changes["virtio"] = virtio
    return replace(spec, **changes) if changes else spec


def _same_count(what: str, given: int, saved: int, where: str) -> None:
    if given != saved:
        raise SnapshotError(
            f"{where}: the saved guest has {saved} {what}{'s' if saved != 1 else ''}; "
            f"{given} given instead"
        )


def restore(
    snap: fmt.Snapshot,
    overrides: Overrides | None = None,
    kvm_path: str = "/dev/kvm",
    links: Any = None,
    spec: PartitionSpec | None = None,
) -> Machine:
    """An unstarted machine continuing the saved guest (builder.restore); spec: the
    already checked restored_spec, if the caller has it."""
    from corevisor.builder import restore as build_restored

    o = overrides if overrides is not None else Overrides()
    spec = spec if spec is not None else restored_spec(snap, o)
    memory = fmt.open_memory(snap, private=not o.copy_memory)
    return build_restored(spec, memory, snap.machine, kvm_path, links)


def read(path: Path) -> fmt.Snapshot:
    """Read and check a partition snapshot directory (format.read, and its kind)."""
    snap = fmt.read(Path(path))
    if not isinstance(snap.spec, Mapping) or snap.spec.get("kind") != KIND:
        raise SnapshotError(f"{path}: not a partition snapshot")
    return snap
