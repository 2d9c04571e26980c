"""What the fuzz targets share: a cursor over the fuzzer's bytes, small guest RAM, and
the one-device register driver used for the UART, RTC and i8042 targets.

Nothing here imports atheris: the targets run under pytest (corpus replay) as well.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class Cursor:
    """Reads the fuzzer's bytes as small integers; past the end everything is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return max(len(self.data) - self.pos, 0)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def pick(self, choices: Sequence[T]) -> T:
        return choices[self.u(1) % len(choices)]


@functools.cache
def guest_memory(size: int) -> Any:
    """One GuestMemory per size for the whole fuzzing process (memfds are not free)."""
    from corevisor.arch.x86_64 import layout
    from corevisor.memory import GuestMemory

    return GuestMemory.anonymous(layout.ram_layout(size), name=f"fuzz-{size >> 20}M")


def drive_device(
    data: bytes,
    make: Callable[[], Any],
    span: int,
    extra: Callable[[Any, Cursor], None] | None = None,
) -> None:
    """Random reads and writes at offsets 0..span-1 (and a few beyond), then a save /
    restore round trip; the Device contract is that nothing raises and reads return
    exactly the bytes asked for."""
    dev = make()
    c = Cursor(data)
    while c.left:
        op = c.u(1)
        offset = c.u(1) % (span + 2)
        size = (1, 1, 1, 2, 4, 0)[op % 6]
        if op & 0x80:
            dev.write(offset, c.take(size))
        elif op & 0x40 and extra is not None:
            extra(dev, c)
        else:
            got = dev.read(offset, size)
            assert isinstance(got, bytes) and len(got) == size, (offset, size, got)
        if op == 0x3F:  # now and then, mid-sequence: the state survives a round trip
            state = dev.save()
            twin = make()
            twin.restore(state)
            assert twin.save() == state
    state = dev.save()
    twin = make()
    twin.restore(state)
    assert twin.save() == state


def restores_to_itself(state: Any, twin: Any) -> None:
    """The save() contract: a fresh twin restored from state saves the same state (and is
    closed afterwards, whatever happens)."""
    try:
        twin.restore(state)
        assert twin.save() == state
    finally:
        twin.close()
