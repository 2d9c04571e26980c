"""Snapshots: the Stateful protocol every part with state satisfies, and its checks.

Convention 5 (DESIGN.md): anything with state has ``save() -> FooState``, a frozen
dataclass of plain values (ints, bools, floats, strings, bytes, tuples, None and other
such dataclasses), and ``restore(state)``, which checks the whole state before it
changes anything. That shape is what lets snapshot/codec.py write a state without
pickle and read it back without running anything, and lets a machine walk its parts
(save_parts, restore_parts) without knowing what each one is.

The small require_* checks here are what those restore methods share: each raises
DeviceError naming the part and the field, so a corrupt or foreign state gives one
line that says what is wrong. What does not live here: the vCPU and VM state
(state.py), the files (format.py), the encoding (codec.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from corevisor.errors import DeviceError

__all__ = [
    "Stateful",
    "save_parts",
    "restore_parts",
    "require_state",
    "require_uint",
    "require_bool",
    "require_bytes",
]

S = TypeVar("S")
_T = TypeVar("_T")


@runtime_checkable
class Stateful(Protocol[S]):
    """A part of a machine whose state can be taken and given back (convention 5)."""

    def save(self) -> S:
        """The part's state as a frozen dataclass of plain values (machine paused)."""
        ...

    def restore(self, state: S) -> None:
        """Take over state after checking all of it; raise before changing anything."""
        ...


def save_parts(parts: Mapping[str, Stateful[Any]]) -> tuple[tuple[str, Any], ...]:
    """Every part's state, keyed by the part's name, in the parts' own order."""
    return tuple((name, part.save()) for name, part in parts.items())


def restore_parts(
    parts: Mapping[str, Stateful[Any]], states: tuple[tuple[str, Any], ...]
) -> None:
    """Give each part its state. The names must match exactly: a machine built from
    another spec (a device more or less) is refused before any part is touched."""
    saved = [name for name, _ in states]
    if len(set(saved)) != len(saved):
        raise DeviceError(f"machine state: a part is named twice in {saved}")
    if set(saved) != set(parts):
        missing = sorted(set(parts) - set(saved))
        extra = sorted(set(saved) - set(parts))
        raise DeviceError(
            f"machine state does not fit this machine: parts without state {missing}, "
            f"states without a part {extra}"
        )
    for name, state in states:
        parts[name].restore(state)


def require_state(where: str, state: object, cls: type[_T]) -> _T:
    """state itself, if it is a cls; DeviceError naming where otherwise."""
    if not isinstance(state, cls):
        raise DeviceError(f"{where}: cannot restore from {type(state).__name__}")
    return state


def require_uint(where: str, name: str, value: object, bits: int = 64) -> int:
    """value, if it is an int (not a bool) in 0 .. 2**bits - 1."""
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise DeviceError(f"{where} state: {name}={value!r} is not a {bits}-bit unsigned int")
    return value


def require_bool(where: str, name: str, value: object) -> bool:
    if type(value) is not bool:
        raise DeviceError(f"{where} state: {name}={value!r} is not a bool")
    return value


def require_bytes(where: str, name: str, value: object, limit: int) -> bytes:
    """value, if it is bytes of at most limit bytes (a bound keeps a corrupt state from
    growing the VMM)."""
    if type(value) is not bytes or len(value) > limit:
        size = len(value) if isinstance(value, bytes) else "?"
        raise DeviceError(f"{where} state: {name} is not bytes of at most {limit} ({size})")
    return value
