"""The port 0x80 POST-code sink: firmware progress codes, and a cheap port-I/O target.

Writes store the value (little-endian, whatever the width) in ``last`` and count in
``writes``; reads return ``last`` truncated to the access size. The write path is two
assignments because this is also the device model behind the port-I/O exit benchmark,
which should measure the exit path rather than the device.

What does not live here: printing POST codes (a caller can poll ``last``).
"""

from __future__ import annotations

from dataclasses import dataclass

from corevisor.errors import DeviceError

__all__ = ["PostCode", "PostCodeState"]


@dataclass(frozen=True)
class PostCodeState:
    """The last value written and how many writes there were."""

    last: int = 0
    writes: int = 0


class PostCode:
    """A one-port sink: every write, at any offset or width, is one POST code."""

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        """Return the last code, as the latch on a POST card would show it."""
        if size <= 0:
            return b""
        return (self.last & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        """Latch and count; deliberately nothing else (see the module docstring)."""
        self.last = int.from_bytes(data, "little")
        self.writes += 1

    def save(self) -> PostCodeState:
        """Capture the latch and the counter."""
        return PostCodeState(last=self.last, writes=self.writes)

    def restore(self, state: PostCodeState) -> None:
        """Load a saved latch and counter after checking them."""
        if not isinstance(state, PostCodeState):
            raise DeviceError(f"postcode: cannot restore from {type(state).__name__}")
        for name in ("last", "writes"):
            value = getattr(state, name)
            if type(value) is not int or value < 0:
                raise DeviceError(f"postcode state: {name}={value!r} is not a non-negative int")
        self.last = state.last
        self.writes = state.writes
