"""Hostile GDB clients against a live stub serving a real guest: the guest and VMM survive.

A raw TCP client sends malformed packets, bad checksums, huge lengths, unknown packets,
random payloads and garbage, and finally disconnects mid-packet. The stub must answer
each packet (error, empty, or a "-" for a bad checksum) or drop the connection, and the
guest must then run to its normal end, with the breakpoint planted during the session
removed. Random inputs come from a seeded generator, so a failure reproduces.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from corevisor.gdb import protocol as p
from tests.kvm.test_gdb import TIMEOUT, _symbol, free_port, vm

# Packets that would resume, step, detach, kill or write state are never generated at
# random (a fuzzer that legitimately changes the guest proves nothing).
_SAFE_HEADS = b"?gmpqQHTzZvxyB0123456789"
_ALPHABET = b"0123456789abcdefABCDEF,;-xyzqQ.vgGmMpPTHZcs "


class RawClient:
    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = p.PacketReader(max_size=1 << 20)
        self.pending: list[p.Event] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self) -> p.Event:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def request(self, payload: bytes) -> bytes:
        """Send one packet; return the reply's payload (acks skipped)."""
        self.send(p.frame(payload))
        while True:
            ev = self.next_event()
            if isinstance(ev, p.Packet):
                assert ev.ok
                self.send(b"+")
                return ev.payload

    def alive(self) -> None:
        assert self.request(b"?").startswith(b"T05thread:1;")
        assert len(self.request(b"g")) > 1000

    def close(self) -> None:
        self.sock.close()


MALFORMED = [
    b"m", b"m1", b"mxyz,4", b"m0,ffffffffffff", b"m,", b"m-1,4", b"M0,4:zz", b"M100000,2:00",
    b"M100000", b"X100000,1:}", b"X100000,2:a", b"G0", b"Gzz", b"P", b"Pffff=00", b"P0=zz",
    b"P0=00", b"p", b"pzz", b"p1000", b"p" + b"f" * 40, b"H", b"Hx", b"Hg99", b"Hgzz", b"Hq1",
    b"T99", b"Tzz", b"Z0", b"Z0,zz", b"Z0,fffffffff000,1", b"z0,zz", b"Z9,0,1", b"Z1,zz,1",
    b"Z2,10fce5,4", b"Z2,10fce4,3", b"z3,10fce4", b"vCont;x", b"vCont;s:99", b"vCont;c:zz",
    b"vCont", b"vFoo", b"qFoo",
    b"qXfer:features:read:foo:0,10", b"qXfer:features:read:target.xml:zz",
    b"qXfer:features:read:target.xml:0,ffffffffff", b"qXfer:features:read:target.xml:ffff,10",
    b"qThreadExtraInfo,99", b"qThreadExtraInfo,zz", b"qSupported:" + b"x" * 3000, b"\x00\xff",
]


def test_fuzzed_session_then_disconnect_mid_packet(guests: dict[str, Path]) -> None:
    elf = guests["hello"]
    main = _symbol(elf, "main")
    rng = random.Random(20240601)
    with vm(str(elf), "--cmdline", "exit=0") as v:
        c = RawClient(v.address)
        c.alive()
        # a bad checksum gets "-" and nothing else
        c.send(b"$g#00")
        assert c.next_event() == p.Ack(False)
        c.alive()
        for pkt in MALFORMED:
            reply = c.request(pkt)
            assert reply == b"" or reply.startswith((b"E", b"l", b"PacketSize=")), (pkt, reply)
        c.alive()
        # huge m length: answered, capped, never more than the packet size
        assert 0 < len(c.request(b"m0,ffffffff")) <= p.MAX_PACKET
        # random payloads with valid checksums
        for _ in range(400):
            head = bytes([rng.choice(_SAFE_HEADS)])
            body = bytes(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 40)))
            pkt = p.escape(head + body)
            if pkt.startswith((b"vCont", b"vKill", b"vRun", b"vAttach", b"Z", b"QStartNoAck")):
                continue
            c.request(pkt)
        c.alive()
        # garbage between packets, stray interrupts (the guest is already stopped),
        # truncated packets cut off by a new one
        c.send(b"garbage\x03\x03}}##++")
        c.send(b"$m1010")
        assert c.request(b"qC") == b"QC1"
        c.alive()
        # plant a breakpoint and a hardware one, then vanish in the middle of a packet
        assert c.request(b"Z0,%x,1" % main) == b"OK"
        assert c.request(b"Z1,%x,1" % _symbol(elf, "printf")) == b"OK"
        assert c.request(b"m%x,1" % main) != b"cc"  # the int3 is hidden from reads
        c.send(b"$m101000,")
        c.close()
        status = v.finish()
    # the guest ran to its end: no int3 and no debug register left (either would be
    # a fault at CPL0 once the debugger is gone)
    assert "hello: exit 0" in v.stdout, v.stderr
    assert "GDB disconnected: guest continues, breakpoints removed" in v.stderr
    assert status == 0, v.stderr


def test_oversized_packet_drops_the_client_and_the_next_one_attaches(
    guests: dict[str, Path],
) -> None:
    with vm("pio", "--cmdline", "count=40000") as v:
        c = RawClient(v.address)
        c.alive()
        c.send(b"$" + b"a" * (p.MAX_PACKET + 1000))
        c.sock.settimeout(10)
        assert c.sock.recv(100) in (b"", b"+")  # dropped (maybe after nothing at all)
        c.close()
        time.sleep(0.5)  # the guest runs on
        c2 = RawClient(v.address)  # attaching stops it again
        assert c2.request(b"?").startswith(b"T02thread:1;")
        assert c2.request(b"D") == b"OK"
        c2.close()
        status = v.finish()
    assert "pio: 40000 writes" in v.stdout
    assert status == 0, v.stderr


def test_stub_refuses_a_second_simultaneous_client_without_harm(
    guests: dict[str, Path],
) -> None:
    """One client at a time: a second connection waits in the backlog until the first
    leaves, then becomes the session."""
    with vm("pio", "--cmdline", "count=40000") as v:
        c1 = RawClient(v.address)
        c1.alive()
        c2 = RawClient(v.address)
        c2.send(p.frame(b"?"))
        c1.alive()
        assert c1.request(b"D") == b"OK"
        c1.close()
        c2.sock.settimeout(10)
        reply = c2.next_event()
        while not isinstance(reply, p.Packet):
            reply = c2.next_event()
        assert reply.payload.startswith(b"T02thread:")
        assert c2.request(b"D") == b"OK"
        c2.close()
        status = v.finish()
    assert status == 0, v.stderr


def test_cli_gdb_with_timeout_still_ends(guests: dict[str, Path]) -> None:
    """Halted for a debugger that never comes: --timeout still ends the run."""
    r = subprocess.run(
        [sys.executable, "-m", "corevisor.cli", "run", str(guests["hello"]),
         "--gdb", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert "timed out" in r.stderr
    assert r.returncode == 1


def test_gdb_server_fuzz_corpus_replays_clean() -> None:
    """The gdb_server fuzz target's corpus (fuzz/corpus/gdb_server) on a real parked
    machine: a crash the coverage-guided fuzzer found stays fixed."""
    from fuzz.run import CORPUS
    from fuzz.targets import gdb_server

    files = sorted((CORPUS / "gdb_server").glob("*"))
    assert files
    try:
        for path in files:
            gdb_server.one_input(path.read_bytes())
    finally:
        gdb_server.close()  # no machine (nor its vCPU thread) outlives the test
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu")]
