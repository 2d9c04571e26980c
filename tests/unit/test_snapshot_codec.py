"""The snapshot value encoding: exact round trips, and hostile bytes never build anything
but plain values and registered state records (one SnapshotError, never a traceback)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corevisor
from corevisor.devices.rtc import RtcState
from corevisor.devices.uart16550 import Uart16550State
from corevisor.errors import SnapshotError
from corevisor.snapshot import codec
from corevisor.snapshot.codec import decode, encode, state_types
from corevisor.snapshot.state import Msr, Xcr

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 200), max_value=1 << 200)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5).map(tuple),
    max_leaves=30,
)


# No deadline: a loaded machine (2 cores shared with other work) must not fail a test.
@settings(deadline=None)
@given(plain)
def test_plain_values_round_trip_exactly(value: object) -> None:
    assert decode(encode(value)) == value


def test_records_round_trip_with_their_types() -> None:
    value = (Msr(0x10, 2**64 - 1), Xcr(0, 7), RtcState(offset=-3.25, frozen=(1, 2, 3)))
    back = decode(encode(value))
    assert back == value and type(back[2]) is RtcState and back[2].frozen == (1, 2, 3)


def test_every_registered_type_is_a_frozen_dataclass() -> None:
    types = state_types()
    assert len(types) == len(codec.STATE_TYPES)
    for name, cls in types.items():
        assert cls.__name__ == name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name  # type: ignore[attr-defined]


def _dataclasses_in(hint: object) -> list[type]:
    """The dataclasses a type hint names, and those their fields name, recursively."""
    found: list[type] = []
    todo = [hint]
    while todo:
        h = todo.pop()
        if isinstance(h, type) and dataclasses.is_dataclass(h):
            if h not in found:
                found.append(h)
                todo.extend(typing.get_type_hints(h).values())
        else:
            todo.extend(typing.get_args(h))
    return found


def test_every_saved_state_type_of_the_package_is_registered() -> None:
    # A new device whose save() returns a dataclass missing from STATE_TYPES could not
    # be snapshotted: every save() return type (and the dataclasses in it) is checked.
    registered = set(state_types().values())
    root = Path(corevisor.__file__).parent
    missing = set()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = importlib.import_module(".".join(("corevisor", *parts)).removesuffix(".__init__"))
        for cls in vars(module).values():
            save = getattr(cls, "save", None)
            if not isinstance(cls, type) or cls.__module__ != module.__name__ or save is None:
                continue
            for found in _dataclasses_in(typing.get_type_hints(save).get("return")):
                if found not in registered:
                    missing.add(f"{found.__module__}.{found.__name__}")
    assert sorted(missing) == []


def test_unregistered_types_are_not_encoded() -> None:
    @dataclasses.dataclass(frozen=True)
    class Msr:  # same name as a registered type, but not it
        index: int

    for bad in ([1, 2], {"a": 1}, Msr(1), object()):
        with pytest.raises(TypeError):
            encode(bad)


def _one_line(e: pytest.ExceptionInfo[SnapshotError]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "needs 1 bytes"),
        (b"\x09", "unknown tag"),
        (b"\x03" + b"\xff" * 200, "too long"),
        (b"\x06\x80\x80\x80\x80\x08", "needs"),  # a 2 GiB bytes value in 6 bytes
        (b"\x07\xff\xff\xff\x7f", "cannot fit"),
        (b"\x05\x02\xff\xfe", "not UTF-8"),
        (b"\x04" + b"\x00\x00\x00\x00\x00\x00\xf8\x7f", "NaN"),
        (b"\x00\x00", "after the value"),
        (b"\x07\x01" * 40 + b"\x00", "nested deeper"),
        (b"\x08\x08builtins\x00", "unknown record type 'builtins'"),
        (b"\x08\x03Msr\x01\x03foo\x00", "no field 'foo'"),
        (b"\x08\x03Msr\x01\x05index\x03\x00", "lacks value"),
        (b"\x08\x03Msr\x02\x05index\x03\x00\x05index\x03\x00", "twice"),
    ],
)
def test_hostile_bytes_give_one_clear_error(data: bytes, why: str) -> None:
    with pytest.raises(SnapshotError) as e:
        decode(data, "state.bin section 'vm'")
    assert why in _one_line(e) and "state.bin section 'vm'" in str(e.value)


def test_missing_fields_with_defaults_come_from_the_defaults() -> None:
    # A record written before a field existed (an older minor version) still loads.
    data = b"\x08\x0eUart16550State\x01\x03ier\x03\x06"
    assert decode(data) == Uart16550State(ier=3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_snapshot_error(data: bytes) -> None:
    with contextlib.suppress(SnapshotError):
        decode(data)


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=3000))
def test_every_truncation_of_a_real_state_is_refused(cut: int) -> None:
    data = encode((Uart16550State(rx_fifo=b"abc", pending_input=b"x" * 100), Msr(1, 2)))
    if cut >= len(data):
        return
    with pytest.raises(SnapshotError):
        decode(data[:cut])
