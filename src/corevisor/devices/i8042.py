"""The i8042 PS/2 controller, kept to what guests need from it: probing and reset.

Ports 0x60-0x64 (offset 0 is the data port 0x60, offset 4 the status/command port
0x64; offsets 1-3 are other chips' ports on a PC and read as 0 here, as Firecracker's
model does). The controller commands firmware and Linux use while probing are answered
(command byte read/write, self tests, port enable/disable, output port) and the two
ways a PC resets through this chip, command 0xFE and clearing output-port bit 0 with
0xD1, call ``on_reset``.

No keyboard or mouse is attached: bytes written to the data port as device commands get
no answer, so a guest's keyboard probe times out and it carries on without one. There is
no interrupt line either: every answer is polled through status bit 0 (OBF), which is how
firmware and Linux's i8042 core read command results anyway.

What does not live here: the port addresses (bus.py) and what a reset does (machine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corevisor.errors import DeviceError

__all__ = ["I8042", "I8042State", "OUTPUT_QUEUE_LIMIT"]

_DATA = 0
_COMMAND = 4

# Status register bits.
STATUS_OBF = 0x01  # output buffer full: the guest can read port 0x60
STATUS_IBF = 0x02  # input buffer full: never set, commands complete instantly
STATUS_SYS = 0x04  # system flag, mirrors command-byte bit 2
STATUS_CMD = 0x08  # last write went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited
STATUS_AUX_OBF = 0x20  # the byte in the output buffer came from the aux port

# Command-byte (controller configuration) bits.
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40

# Controller commands.
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

# Commands that take a parameter byte on the data port.
_WITH_PARAMETER = frozenset(
    {
        CMD_WRITE_CTR,
        CMD_WRITE_OUTPUT_PORT,
        CMD_WRITE_KBD_OUTBUF,
        CMD_WRITE_AUX_OUTBUF,
        CMD_WRITE_AUX,
    }
)

OUTPUT_PORT_RESET = 0x01  # 0 = CPU held in reset
OUTPUT_PORT_A20 = 0x02
_DEFAULT_OUTPUT_PORT = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
# Keyboard interrupt on, system flag set (POST passed), scancode translation on: what a
# PC BIOS leaves behind.
_DEFAULT_CTR = CTR_KBD_INT | CTR_SYS | CTR_XLATE

# Answers queue up; a guest spamming self tests without reading gets the oldest ones,
# and memory stays bounded.
OUTPUT_QUEUE_LIMIT = 16


@dataclass(frozen=True)
class I8042State:
    """The controller's guest-visible state as plain values."""

    ctr: int = _DEFAULT_CTR
    output_port: int = _DEFAULT_OUTPUT_PORT
    pending_command: int = 0  # a command waiting for its parameter byte, or 0
    last_write_command: bool = False
    output: bytes = b""  # answers not yet read, oldest first
    output_aux: tuple[bool, ...] = ()  # per byte of ``output``: came from the aux port
    last_read: int = 0


class I8042:
    """The i8042 controller model (see the module docstring)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._ctr = _DEFAULT_CTR
        self._output_port = _DEFAULT_OUTPUT_PORT
        self._pending_command = 0
        self._last_write_command = False
        self._output: list[tuple[int, bool]] = []
        self._last_read = 0

    # ------------------------------------------------------------------ bus interface

    def read(self, offset: int, size: int) -> bytes:
        """Read ports; a wide access reads consecutive ports."""
        return bytes([self._read_port(offset + i) for i in range(max(size, 0))])

    def write(self, offset: int, data: bytes) -> None:
        """Write ports; a wide access writes consecutive ports."""
        for i, value in enumerate(data):
            self._write_port(offset + i, value)

    # ------------------------------------------------------------------ snapshot

    def save(self) -> I8042State:
        """Capture the controller state."""
        return I8042State(
            ctr=self._ctr,
            output_port=self._output_port,
            pending_command=self._pending_command,
            last_write_command=self._last_write_command,
            output=bytes(value for value, _ in self._output),
            output_aux=tuple(aux for _, aux in self._output),
            last_read=self._last_read,
        )

    def restore(self, state: I8042State) -> None:
        """Load a saved state after checking it."""
        if not isinstance(state, I8042State):
            raise DeviceError(f"i8042: cannot restore from {type(state).__name__}")
        for name in ("ctr", "output_port", "last_read"):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise DeviceError(f"i8042 state: {name}={value!r} is not a byte")
        if state.pending_command != 0 and state.pending_command not in _WITH_PARAMETER:
            raise DeviceError(
                f"i8042 state: pending_command={state.pending_command!r} takes no parameter"
            )
        if type(state.last_write_command) is not bool:
            raise DeviceError("i8042 state: last_write_command is not a bool")
        if type(state.output) is not bytes or type(state.output_aux) is not tuple:
            raise DeviceError("i8042 state: output must be bytes and output_aux a tuple")
        if len(state.output) != len(state.output_aux):
            raise DeviceError(
                f"i8042 state: output has {len(state.output)} bytes but output_aux "
                f"{len(state.output_aux)} flags"
            )
        if len(state.output) > OUTPUT_QUEUE_LIMIT:
            raise DeviceError(
                f"i8042 state: output holds {len(state.output)} bytes "
                f"(at most {OUTPUT_QUEUE_LIMIT})"
            )
        if any(type(aux) is not bool for aux in state.output_aux):
            raise DeviceError("i8042 state: output_aux holds a non-bool")
        self._ctr = state.ctr
        self._output_port = state.output_port
        self._pending_command = state.pending_command
        self._last_write_command = state.last_write_command
        self._output = list(zip(state.output, state.output_aux, strict=True))
        self._last_read = state.last_read

    # ------------------------------------------------------------------ ports

    def _status(self) -> int:
        status = STATUS_UNLOCKED
        if self._output:
            status |= STATUS_OBF
            if self._output[0][1]:
                status |= STATUS_AUX_OBF
        if self._ctr & CTR_SYS:
            status |= STATUS_SYS
        if self._last_write_command:
            status |= STATUS_CMD
        return status

    def _read_port(self, offset: int) -> int:
        if offset == _DATA:
            if self._output:
                self._last_read = self._output.pop(0)[0]
            return self._last_read  # an empty buffer re-reads the stale byte
        if offset == _COMMAND:
            return self._status()
        if 0 < offset < _COMMAND:
            return 0
        return 0xFF

    def _write_port(self, offset: int, value: int) -> None:
        if offset == _DATA:
            self._last_write_command = False
            self._write_data(value)
        elif offset == _COMMAND:
            self._last_write_command = True
            self._command(value)

    def _push(self, value: int, aux: bool = False) -> None:
        if len(self._output) < OUTPUT_QUEUE_LIMIT:
            self._output.append((value, aux))

    def _command(self, cmd: int) -> None:
        self._pending_command = 0  # a new command abandons one waiting for its parameter
        if cmd in _WITH_PARAMETER:
            self._pending_command = cmd
        elif cmd == CMD_READ_CTR:
            self._push(self._ctr)
        elif cmd == CMD_SELF_TEST:
            self._ctr |= CTR_SYS  # a passed self test sets the system flag
            self._push(0x55)
        elif cmd in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._push(0x00)  # interface OK
        elif cmd == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBD_DISABLE
        elif cmd == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUX_DISABLE
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._push(self._output_port)
        elif cmd >= 0xF0 and not cmd & 0x01:
            # 0xF0-0xFF pulse the output-port lines whose bit is 0; bit 0 is CPU reset.
            # 0xFE is the one everyone uses.
            self._on_reset()
        # Other commands are accepted and ignored.

    def _write_data(self, value: int) -> None:
        cmd = self._pending_command
        self._pending_command = 0
        if cmd == CMD_WRITE_CTR:
            self._ctr = value
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            if not value & OUTPUT_PORT_RESET:
                self._output_port |= OUTPUT_PORT_RESET  # the reset line comes back up
                self._on_reset()
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            self._push(value)
        elif cmd == CMD_WRITE_AUX_OUTBUF:
            self._push(value, aux=True)
        # CMD_WRITE_AUX and plain data bytes are for a device: none is attached.
