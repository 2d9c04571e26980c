"""The GDB stub's packet handling (gdb/server.py Session) against a real machine: the
bundled hello guest built on /dev/kvm, parked before its first instruction, served
over a real loopback TCP connection. Every event the fuzzer's byte stream holds goes
through the same path as a live session (PacketReader → Session._event → reply).

Packets that would let the guest run or end the session (c, C, s, S, vCont, D, k,
vKill) are dropped before they reach the stub, as in tests/kvm/test_gdb_fuzz.py: the
point is the stub's parsing and state handling, not the guest's fate. Anything that
escapes Session._event is a crash (the stub itself turns ProtocolError, ValueError,
KeyError and CorevisorError into an error reply).
"""

from __future__ import annotations

import functools
import socket
import threading
from typing import Any

from corevisor.gdb import protocol as p

_RUNS = (b"c", b"C", b"s", b"S", b"D", b"k")


@functools.cache
def _stub() -> tuple[Any, socket.socket, socket.socket]:
    """(target, server end, client end), built once per fuzzing process (close() ends it:
    a replay inside pytest must not leave a machine and its vCPU thread behind)."""
    from corevisor import bundled
    from corevisor.builder import build
    from corevisor.gdb.target import DEBUGGER, DebugTarget
    from corevisor.spec import PartitionSpec, SerialSpec

    image = bundled.ensure_built("hello")
    spec = PartitionSpec(name="fuzz", image=image, memory=32 << 20, serial=SerialSpec.null())
    machine = build(spec)
    target = DebugTarget(machine, halted=True)
    machine.start()
    for v in machine.vcpus:
        v.hold(DEBUGGER)  # parked: the debugger's all-stop hold, acknowledged
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setblocking(False)
    return target, server, client


def close() -> None:
    """Stop and release the machine behind the stub, if one was built."""
    if _stub.cache_info().currsize:
        target, server, client = _stub()
        _stub.cache_clear()
        client.close()
        server.close()
        target.machine.close()


def _runs(payload: bytes) -> bool:
    return payload[:1] in _RUNS or payload.startswith((b"vCont;", b"vKill"))


def _drain(client: socket.socket) -> None:
    try:
        while client.recv(1 << 16):
            pass
    except BlockingIOError:
        pass


def one_input(data: bytes) -> None:
    from corevisor.gdb.server import Session

    target, server, client = _stub()
    session = Session(server, target, threading.Event(), attach=False)
    try:
        events = list(session.reader.feed(data))
    except p.ProtocolError:
        return  # oversized: the live loop drops the client
    for ev in events:
        if isinstance(ev, p.Packet) and _runs(ev.payload):
            continue
        session._event(ev)
        session._flush()
        _drain(client)
        assert not target.ended, "the guest must stay parked"
