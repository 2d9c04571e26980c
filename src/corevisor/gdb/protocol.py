"""GDB remote serial protocol: packet framing, checksums, escaping and argument parsing.

Pure functions and a byte-fed reader; no sockets, no threads, no KVM, so all of it is
unit-testable. A packet on the wire is ``$payload#cs`` where cs is the modulo-256 sum
of the payload bytes as two lowercase hex digits. Binary data (the X packet, qXfer
replies) escapes ``$ # } *`` as ``}`` followed by the byte XOR 0x20. GDB never sends
run-length encoded packets to a stub, and this stub never sends them, so RLE is not
handled. What does not live here: what the packets mean (target.py, server.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

INTERRUPT = 0x03
MAX_PACKET = 0x4000  # advertised as PacketSize; longer packets from a client are refused
_ESCAPED = frozenset(b"$#}*")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class ProtocolError(ValueError):
    """A packet (or its arguments) that does not follow the protocol."""


def checksum(payload: bytes) -> int:
    """The modulo-256 sum of the payload's bytes."""
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape binary data for a packet: $ # } * become } and the byte XOR 0x20."""
    out = bytearray()
    for c in data:
        if c in _ESCAPED:
            out += bytes((0x7D, c ^ 0x20))
        else:
            out.append(c)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo escape(); a trailing lone escape character is a protocol error."""
    out = bytearray()
    it = iter(data)
    for c in it:
        if c == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ProtocolError("binary data ends in an escape character")
            out.append(nxt ^ 0x20)
        else:
            out.append(c)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """Frame a payload as $payload#cs. The payload must already be escaped."""
    if b"$" in payload or b"#" in payload:
        raise ProtocolError("unescaped $ or # in a packet payload")
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


@dataclass(frozen=True)
class Packet:
    """A received packet; ok is False if its checksum did not match."""

    payload: bytes
    ok: bool = True


@dataclass(frozen=True)
class Ack:
    """A received acknowledgement: + (ok) or - (resend)."""

    ok: bool


@dataclass(frozen=True)
class Interrupt:
    """The out-of-band Ctrl-C byte (0x03)."""


Event = Packet | Ack | Interrupt


class PacketReader:
    """Turns a byte stream into events; feed() any split of the stream.

    Bytes outside a packet other than + - and 0x03 are skipped (line noise). A packet
    longer than max_size raises ProtocolError: the caller drops the connection rather
    than buffering without bound.
    """

    def __init__(self, max_size: int = MAX_PACKET + 64) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._in_packet = False
        self._checksum: bytearray | None = None

    @property
    def mid_packet(self) -> bool:
        """True if a packet has started but not ended."""
        return self._in_packet

    def feed(self, data: bytes) -> Iterator[Event]:
        for c in data:
            if not self._in_packet:
                if c == 0x24:  # $
                    self._in_packet = True
                    self._buf.clear()
                    self._checksum = None
                elif c == 0x2B:
                    yield Ack(True)
                elif c == 0x2D:
                    yield Ack(False)
                elif c == INTERRUPT:
                    yield Interrupt()
                continue
            if self._checksum is not None:
                self._checksum.append(c)
                if len(self._checksum) == 2:
                    yield self._finish()
                continue
            if c == 0x23:  # #
                self._checksum = bytearray()
            elif c == 0x24:  # a new $ inside a packet: the old one was cut off
                self._buf.clear()
            else:
                self._buf.append(c)
                if len(self._buf) > self.max_size:
                    self._in_packet = False
                    self._buf.clear()
                    raise ProtocolError(f"packet longer than {self.max_size} bytes")

    def _finish(self) -> Packet:
        payload = bytes(self._buf)
        assert self._checksum is not None
        digits = bytes(self._checksum)
        self._in_packet = False
        self._buf.clear()
        self._checksum = None
        ok = all(c in _HEX_DIGITS for c in digits) and int(digits, 16) == checksum(payload)
        return Packet(payload, ok)


# --- argument parsing ---------------------------------------------------------------
def parse_hex(text: bytes | str, limit_bits: int = 64) -> int:
    """A hex number from a packet argument; at most limit_bits wide."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("non-ASCII number") from None
    if not text or len(text) > (limit_bits + 3) // 4 or text.strip() != text:
        raise ProtocolError(f"bad hex number {text[:32]!r}")
    try:
        value = int(text, 16)
    except ValueError:
        raise ProtocolError(f"bad hex number {text[:32]!r}") from None
    if value < 0:
        raise ProtocolError("negative number")
    return value


def parse_addr_len(args: bytes) -> tuple[int, int]:
    """ADDR,LENGTH (the m packet; the head of M and X)."""
    addr, sep, length = args.partition(b",")
    if not sep:
        raise ProtocolError("expected ADDR,LENGTH")
    return parse_hex(addr), parse_hex(length, 32)


def parse_thread_id(text: bytes) -> int:
    """A thread id: -1 (all), 0 (any) or a positive hex id."""
    if text == b"-1":
        return -1
    return parse_hex(text, 32)


def hex_bytes(data: bytes) -> bytes:
    """Bytes as lowercase hex text."""
    return data.hex().encode("ascii")


def from_hex_bytes(text: bytes) -> bytes:
    """Hex text as bytes; odd lengths and non-hex characters are protocol errors."""
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad hex data") from None


def stop_reply(signal: int, thread: int, swbreak: bool = False, reason: bytes = b"") -> bytes:
    """A T stop reply: signal and thread (and swbreak when a planted int3 was hit, or
    a hardware hit's reason: b"hwbreak:;", b"watch:ADDR;", b"rwatch:..", b"awatch:..")."""
    reply = b"T%02xthread:%x;" % (signal & 0xFF, thread)
    if swbreak:
        reply += b"swbreak:;"
    return reply + reason
