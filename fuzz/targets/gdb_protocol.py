"""GDB remote-protocol framing and argument parsing (gdb/protocol.py): the byte stream a
client sends, cut into packets, acks and Ctrl-C, then every packet's arguments through
the parsers the server uses. Allowed: ProtocolError (a ValueError) from a parser.

Invariants: framing round-trips (frame → feed gives the payload back, checksum good),
escape/unescape and hex round-trip.
"""

from __future__ import annotations

from corevisor.gdb import protocol as p


def _parse_all(payload: bytes) -> None:
    for parse in (p.parse_hex, p.parse_addr_len, p.parse_thread_id, p.from_hex_bytes):
        try:
            parse(payload[1:])
        except ValueError:
            pass
    args, _, data = payload[1:].partition(b":")
    for parse in (p.parse_addr_len, p.unescape):
        try:
            parse(args if parse is p.parse_addr_len else data)
        except ValueError:
            pass


def one_input(data: bytes) -> None:
    reader = p.PacketReader(max_size=4096)
    try:
        events = list(reader.feed(data))
    except p.ProtocolError:
        return
    for ev in events:
        if isinstance(ev, p.Packet):
            _parse_all(ev.payload)
    assert p.unescape(p.escape(data)) == data
    assert p.from_hex_bytes(p.hex_bytes(data)) == data
    if len(data) <= 1024:
        (again,) = list(p.PacketReader(max_size=4096).feed(p.frame(p.escape(data))))
        assert isinstance(again, p.Packet) and again.ok and p.unescape(again.payload) == data
