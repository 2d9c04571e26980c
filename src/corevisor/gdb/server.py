"""The GDB server: a TCP listener thread serving one GDB client at a time.

attach_gdb(machine, ...) is the builder's step: it wraps the machine in a DebugTarget
(halted before the first instruction, or running with --gdb-attach), binds the address
and registers the server thread, which starts with the machine. A session speaks the
remote serial protocol (all-stop, threads = vCPUs) until GDB detaches (the guest runs
on, breakpoints removed), kills (the machine ends), disconnects (treated as a detach)
or the machine ends (GDB gets W/X). Any malformed input gets an error reply or drops
the connection; neither the guest nor the VMM is affected. Nothing here touches KVM or
guest memory directly: that is target.py.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import traceback
from collections.abc import Callable

from corevisor import sandbox
from corevisor.errors import CorevisorError
from corevisor.gdb import protocol as p
from corevisor.gdb import x86_64
from corevisor.gdb.target import SIGINT, SIGTRAP, DebugTarget, StopEvent
from corevisor.machine import Machine
from corevisor.signals import start_thread
from corevisor.spec import HostPort

MAX_READ = 0x1000  # bytes per m reply (hex doubles it; PacketSize is 0x4000)
POLL = 0.2  # seconds between checks for close() and the machine's end while idle
SUPPORTED = (
    b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+;QStartNoAckMode+"
    % p.MAX_PACKET
)
_SIGNALS = {"exit": 0, "reset": 0, "stopped": 9, "fault": 11}  # X: SIGKILL, SIGSEGV


class GdbServer:
    """Serves a DebugTarget on one TCP address, one client at a time."""

    def __init__(
        self,
        target: DebugTarget,
        address: HostPort,
        report: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self.target = target
        self.report = report
        host, port = address.host, address.port
        family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            raise CorevisorError(f"gdb: cannot listen on {address}: {e.strerror or e}") from None
        self._listener.settimeout(POLL)
        self.address = address
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start serving (the machine's start() calls this; a client connecting before
        waits in the listen backlog)."""
        if self._thread is None and not self._closing.is_set():
            self._thread = start_thread(self._serve, "gdb-server", sandbox.GDB)

    def close(self) -> None:
        """Stop serving; a connected client gets the machine's end (W or X) first."""
        self._closing.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        first = True
        while not self._closing.is_set() and not self.target.ended:
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.report(f"GDB connected from {peer[0]}:{peer[1]}")
            session: Session | None = None
            try:
                session = Session(conn, self.target, self._closing, attach=not first)
                first = False
                session.run()
            except Exception:  # noqa: BLE001 - a stub bug must not take the guest down
                _internal_error()
            finally:
                try:
                    if session is not None:
                        session.finish()
                    else:
                        conn.close()
                except Exception:  # noqa: BLE001
                    _internal_error()
            if session is None:
                continue
            self.report(f"GDB {session.outcome}")


def _internal_error() -> None:
    """A bug in the stub: show it, drop the client, keep the VMM and guest going."""
    print(
        "corevisor: gdb: internal error, dropping the client:\n" + traceback.format_exc(),
        file=sys.stderr,
        flush=True,
    )


class Session:
    """One connected GDB client: the packet loop and what each packet does."""

    def __init__(
        self, conn: socket.socket, target: DebugTarget, closing: threading.Event, attach: bool
    ) -> None:
        self.conn = conn
        self.target = target
        self.closing = closing
        self.reader = p.PacketReader()
        self.ack = True
        self.running = False
        self.done = False
        self.outcome = "disconnected: guest continues, breakpoints removed"
        self._last_sent = b""
        self._out = bytearray()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if attach or not target.attached:
            target.attach()
        self.gthread = target.last_stop.vcpu + 1  # registers and memory (Hg)
        self.cthread = self.gthread  # stepping (Hc)

    # --- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        while not self.done:
            if self.target.ended:
                if self.running:  # GDB waits for a stop reply: the end is the reply
                    self._send_end()
                else:
                    self.outcome = "closed: the guest has ended"
                return
            if self.closing.is_set():
                return
            if self.running:
                event = self.target.wait_stop(0.02)
                if event is not None:
                    self._stopped(event)
                timeout = 0.0
            else:
                timeout = POLL
            ready, _, _ = select.select([self.conn], [], [], timeout)
            if not ready:
                continue
            try:
                data = self.conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            try:
                events = list(self.reader.feed(data))
            except p.ProtocolError:
                self.outcome = "sent an oversized packet: dropped; guest continues"
                return
            for ev in events:
                self._event(ev)
                self._flush()
                if self.done:
                    return

    def finish(self) -> None:
        """Leave the guest as the session's end says: running without breakpoints."""
        try:
            if not self.target.ended and self.target.attached:
                self.target.detach()
        finally:
            try:
                self.conn.close()
            except OSError:
                pass

    def _event(self, ev: p.Event) -> None:
        if isinstance(ev, p.Interrupt):
            if self.running:
                self._stopped(self.target.halt(SIGINT, self.gthread))
            return
        if isinstance(ev, p.Ack):
            if not ev.ok and self.ack and self._last_sent:
                self._write(self._last_sent)
            return
        if not ev.ok:
            if self.ack:
                self._write(b"-")
            return
        if self.ack:
            self._write(b"+")
        try:
            reply = self.handle(ev.payload)
        except (p.ProtocolError, ValueError, KeyError, CorevisorError):
            reply = b"E01"
        if reply is not None:
            self.send(reply)

    def _stopped(self, event: StopEvent) -> None:
        self.running = False
        self.gthread = self.cthread = event.vcpu + 1
        self.send(p.stop_reply(event.signal, event.vcpu + 1, event.swbreak, event.reason))
        self._flush()

    def _send_end(self) -> None:
        report = self.target.machine.report
        assert report is not None
        if report.kind == "exit":
            self.send(b"W%02x" % ((report.code or 0) & 0xFF))
        else:
            self.send(b"X%02x" % _SIGNALS.get(report.kind, 9))
        self._flush()
        self.outcome = f"session ended with the guest ({report.message})"

    def send(self, payload: bytes) -> None:
        self._last_sent = p.frame(payload)
        self._write(self._last_sent)

    def _write(self, data: bytes) -> None:
        """Queue bytes for the client; _flush sends them (an ack and its reply in one
        segment: a lone "+" followed by the reply would wait for a delayed ACK)."""
        self._out += data

    def _flush(self) -> None:
        if not self._out:
            return
        try:
            self.conn.sendall(self._out)
        except OSError:
            self.done = True
        self._out.clear()

    # --- packets ----------------------------------------------------------------------
    def handle(self, pkt: bytes) -> bytes | None:
        """The reply to one packet (None: no reply now, e.g. after c or s)."""
        t = self.target
        if not pkt:
            return b""
        head, rest = pkt[:1], pkt[1:]
        if pkt == b"?":
            last = t.last_stop
            return p.stop_reply(last.signal, last.vcpu + 1, last.swbreak, last.reason)
        if head == b"q" or head == b"Q":
            return self._query(pkt)
        if head == b"H":
            thread = p.parse_thread_id(rest[1:])
            if thread > 0:
                t.vcpu(thread)
            chosen = thread if thread > 0 else self.gthread
            if rest[:1] == b"g":
                self.gthread = chosen
            elif rest[:1] == b"c":
                self.cthread = chosen
            else:
                return b"E01"
            return b"OK"
        if head == b"T":
            t.vcpu(p.parse_thread_id(rest))
            return b"OK"
        if head == b"g":
            return p.hex_bytes(x86_64.read_all(t.cpu_state(self.gthread)))
        if head == b"G":
            state = t.cpu_state(self.gthread)
            t.set_cpu_state(self.gthread, state, x86_64.write_all(state, p.from_hex_bytes(rest)))
            return b"OK"
        if head == b"p":
            num = p.parse_hex(rest, 16)
            if num >= len(x86_64.REGISTERS):
                return b"E00"
            return p.hex_bytes(x86_64.read_register(t.cpu_state(self.gthread), num))
        if head == b"P":
            num_text, sep, value = rest.partition(b"=")
            num = p.parse_hex(num_text, 16)
            if not sep or num >= len(x86_64.REGISTERS):
                return b"E00"
            state = t.cpu_state(self.gthread)
            changed = x86_64.write_register(state, num, p.from_hex_bytes(value))
            t.set_cpu_state(self.gthread, state, changed)
            return b"OK"
        if head == b"m":
            addr, length = p.parse_addr_len(rest)
            data = t.read_memory(self.gthread, addr, min(length, MAX_READ))
            return p.hex_bytes(data) if data or not length else b"E14"
        if head in (b"M", b"X"):
            args, sep, payload = rest.partition(b":")
            if not sep:
                raise p.ProtocolError("expected ADDR,LENGTH:DATA")
            addr, length = p.parse_addr_len(args)
            data = p.from_hex_bytes(payload) if head == b"M" else p.unescape(payload)
            if len(data) != length:
                return b"E01"
            if not data:
                return b"OK"
            return b"OK" if t.write_memory(self.gthread, addr, data) else b"E14"
        if head in (b"c", b"C", b"s", b"S"):
            self._resume_addr(head, rest)
            return self._resume(self.cthread if head in (b"s", b"S") else None)
        if head == b"v":
            return self._v(pkt)
        if head in (b"Z", b"z"):
            return self._breakpoint(head == b"Z", rest)
        if head == b"D":
            self.outcome = "detached: guest continues, breakpoints removed"
            self.send(b"OK")
            t.detach()
            self.done = True
            return None
        if head == b"k":
            self._kill()
            return None
        return b""

    def _query(self, pkt: bytes) -> bytes | None:
        t = self.target
        name, _, args = pkt.partition(b":")
        if name == b"qSupported":
            return SUPPORTED
        if pkt == b"QStartNoAckMode":
            self.send(b"OK")
            self.ack = False
            return None  # already answered, with the ack still on
        if pkt == b"qAttached":
            return b"1"
        if pkt == b"qC":
            return b"QC%x" % self.gthread
        if pkt == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % i for i in t.thread_ids())
        if pkt == b"qsThreadInfo":
            return b"l"
        if pkt.startswith(b"qThreadExtraInfo,"):
            thread = p.parse_thread_id(pkt.split(b",", 1)[1])
            return p.hex_bytes(t.thread_info(thread).encode())
        if name == b"qXfer" and args.startswith(b"features:read:"):
            annex, _, span = args[len(b"features:read:") :].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            offset, length = p.parse_addr_len(span)
            xml = x86_64.target_xml()
            chunk = xml[offset : offset + min(length, p.MAX_PACKET // 2)]
            more = offset + len(chunk) < len(xml)
            return (b"m" if more else b"l") + p.escape(chunk)
        return b""

    def _resume_addr(self, head: bytes, rest: bytes) -> None:
        """c ADDR / s ADDR / C SIG;ADDR / S SIG;ADDR: resume at ADDR if given."""
        if head in (b"C", b"S"):
            rest = rest.partition(b";")[2]
        if rest:
            t = self.target
            state = t.cpu_state(self.gthread)
            state.regs.rip = p.parse_hex(rest)
            t.set_cpu_state(self.gthread, state, {"regs"})

    def _resume(self, step: int | None) -> bytes | None:
        if step is not None and step <= 0:
            step = self.gthread
        event = self.target.resume(step)
        if event is not None:
            self._stopped(event)
        else:
            self.running = True
        return None

    def _v(self, pkt: bytes) -> bytes | None:
        if pkt == b"vCont?":
            return b"vCont;c;C;s;S"
        if pkt.startswith(b"vCont;"):
            step: int | None = None
            go = False
            for action in pkt[len(b"vCont;") :].split(b";"):
                verb, _, thread_text = action.partition(b":")
                thread = p.parse_thread_id(thread_text) if thread_text else -1
                if verb[:1] in (b"s", b"S"):
                    if step is None:
                        step = thread if thread > 0 else self.gthread
                elif verb[:1] in (b"c", b"C"):
                    go = True
                elif verb[:1] != b"t":
                    raise p.ProtocolError("bad vCont action")
            if step is None and not go:
                return b"E01"
            if step is not None:
                self.target.vcpu(step)
            return self._resume(step)
        if pkt.startswith(b"vKill"):
            self._kill(reply=True)
            return None
        return b""

    def _breakpoint(self, insert: bool, rest: bytes) -> bytes:
        kind, _, args = rest.partition(b",")
        addr_text, _, length_text = args.partition(b",")
        if kind in (b"1", b"2", b"3", b"4"):
            # Hardware breakpoints and watchpoints: the four debug registers, where KVM
            # takes them (KVM_CAP_SET_GUEST_DEBUG2 lists USE_HW_BP); an empty reply
            # tells GDB "unsupported", E.. (all four slots in use) "cannot insert".
            if not self.target.hw_supported:
                return b""
            if kind != b"1" and not self.target.hw_watch_supported:
                return b""
            addr, length = p.parse_hex(addr_text), p.parse_hex(length_text.partition(b";")[0])
            if not insert:
                self.target.remove_hw_point(int(kind), addr, length)
                return b"OK"
            return b"OK" if self.target.insert_hw_point(int(kind), addr, length) else b"E28"
        if kind != b"0":
            return b""
        addr = p.parse_hex(addr_text)
        if insert:
            return b"OK" if self.target.insert_breakpoint(self.gthread, addr) else b"E14"
        self.target.remove_breakpoint(addr)
        return b"OK"

    def _kill(self, reply: bool = False) -> None:
        self.outcome = "killed the guest"
        if reply:
            self.send(b"OK")
        self.target.kill()
        self.done = True


def attach_gdb(
    machine: Machine,
    address: HostPort,
    wait: bool = True,
    report: Callable[[str], None] = lambda msg: None,
) -> GdbServer:
    """The builder's step: serve GDB for machine on address (already validated).

    With wait, the vCPUs are parked before they run a single instruction until GDB
    says continue or step; without, the guest runs and stops when GDB connects.
    """
    target = DebugTarget(machine, halted=wait)
    server = machine.own(GdbServer(target, address, report))
    machine.at_start(server.start)
    how = "halted before its first instruction" if wait else "running"
    report(f"GDB server on {address} ({how}): gdb -ex 'target remote {address}'")
    return server


__all__ = ["GdbServer", "Session", "attach_gdb", "SIGTRAP"]
