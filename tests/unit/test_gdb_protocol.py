"""The GDB stub's pure parts: packet framing, checksums, escaping, parsing, registers.

No KVM here; the live fuzz test against a stub serving a real guest is in
tests/kvm/test_gdb_fuzz.py.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corevisor.config import parse_host_port, partition_from_args
from corevisor.errors import ConfigError
from corevisor.gdb import protocol as p
from corevisor.gdb import x86_64
from corevisor.kvm import bindings as b
from corevisor.spec import HostPort
from tests.kvm.images import pvh_elf

# --- framing -------------------------------------------------------------------------


def test_checksum_and_frame_match_gdb_examples() -> None:
    assert p.checksum(b"") == 0
    assert p.frame(b"OK") == b"$OK#9a"
    assert p.frame(b"qSupported") == b"$qSupported#37"
    assert p.frame(b"") == b"$#00"


def test_frame_refuses_unescaped_markers() -> None:
    with pytest.raises(p.ProtocolError):
        p.frame(b"a#b")
    with pytest.raises(p.ProtocolError):
        p.frame(b"$")


def test_escape_covers_the_four_special_bytes() -> None:
    assert p.escape(b"$#}*a") == b"}\x04}\x03}]}\x0aa"
    assert p.unescape(b"}\x04}\x03}]}\x0aa") == b"$#}*a"
    with pytest.raises(p.ProtocolError):
        p.unescape(b"abc}")


@given(st.binary(max_size=300))
def test_escape_roundtrip_and_output_is_frameable(data: bytes) -> None:
    escaped = p.escape(data)
    assert p.unescape(escaped) == data
    assert not set(escaped) & set(b"$#*")
    p.frame(escaped)  # never raises


def _events(stream: bytes, cuts: list[int]) -> list[p.Event]:
    reader = p.PacketReader()
    out: list[p.Event] = []
    prev = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        out += reader.feed(stream[prev:cut])
        prev = cut
    return out


@given(
    st.lists(st.binary(max_size=80).map(p.escape), max_size=6),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_reader_gets_every_packet_whatever_the_splits(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"+".join(p.frame(x) for x in payloads)
    events = _events(stream, cuts)
    packets = [e for e in events if isinstance(e, p.Packet)]
    assert [x.payload for x in packets] == payloads
    assert all(x.ok for x in packets)


def test_reader_acks_interrupt_noise_and_bad_checksums() -> None:
    events = list(p.PacketReader().feed(b"+-\x03junk$m0,4#00$g#67$p1#zz$p1#"))
    assert events[:3] == [p.Ack(True), p.Ack(False), p.Interrupt()]
    assert events[3] == p.Packet(b"m0,4", ok=False)
    assert events[4] == p.Packet(b"g", ok=True)
    assert events[5] == p.Packet(b"p1", ok=False)  # non-hex checksum digits
    assert len(events) == 6  # the last packet is incomplete: nothing yet


def test_reader_restarts_on_a_new_dollar_inside_a_packet() -> None:
    events = list(p.PacketReader().feed(b"$m10$g#67"))
    assert events == [p.Packet(b"g", ok=True)]


def test_reader_refuses_endless_packets() -> None:
    reader = p.PacketReader(max_size=100)
    with pytest.raises(p.ProtocolError):
        list(reader.feed(b"$" + b"a" * 101))
    # it resynchronises afterwards
    assert list(reader.feed(b"$g#67")) == [p.Packet(b"g")]


@given(st.binary(max_size=400))
def test_reader_never_fails_on_garbage_except_by_protocol_error(data: bytes) -> None:
    reader = p.PacketReader(max_size=64)
    try:
        for ev in reader.feed(data):
            assert isinstance(ev, p.Packet | p.Ack | p.Interrupt)
    except p.ProtocolError:
        pass


# --- arguments -----------------------------------------------------------------------


def test_parse_helpers() -> None:
    assert p.parse_hex(b"ffff") == 0xFFFF
    assert p.parse_addr_len(b"101000,40") == (0x101000, 0x40)
    assert p.parse_thread_id(b"-1") == -1
    assert p.parse_thread_id(b"2") == 2
    assert p.from_hex_bytes(b"00ff") == b"\x00\xff"
    for bad in (b"", b"xyz", b"-5", b" 1", b"1" * 17):
        with pytest.raises(p.ProtocolError):
            p.parse_hex(bad)
    for bad_pair in (b"10", b"10,", b",4", b"1,fffffffff"):
        with pytest.raises(p.ProtocolError):
            p.parse_addr_len(bad_pair)
    with pytest.raises(p.ProtocolError):
        p.from_hex_bytes(b"abc")
    with pytest.raises(p.ProtocolError):
        p.parse_hex("é".encode())


def test_stop_reply() -> None:
    assert p.stop_reply(5, 1) == b"T05thread:1;"
    assert p.stop_reply(5, 2, swbreak=True) == b"T05thread:2;swbreak:;"
    assert p.stop_reply(2, 0x10) == b"T02thread:10;"
    assert p.stop_reply(5, 1, reason=b"hwbreak:;") == b"T05thread:1;hwbreak:;"
    assert p.stop_reply(5, 2, reason=b"watch:10fce4;") == b"T05thread:2;watch:10fce4;"


# --- registers and the target description -------------------------------------------


def test_target_xml_is_valid_and_numbers_every_register() -> None:
    root = ET.fromstring(x86_64.target_xml())
    assert root.findtext("architecture") == "i386:x86-64"
    features = [f.get("name") for f in root.findall("feature")]
    assert features == [x86_64.CORE, x86_64.SSE, x86_64.SEGMENTS, x86_64.SYS]
    regs = [r for f in root.findall("feature") for r in f.findall("reg")]
    assert [r.get("name") for r in regs] == [r.name for r in x86_64.REGISTERS]
    assert [int(r.get("regnum", "-1")) for r in regs] == list(range(len(regs)))
    # GDB's amd64 numbering for the core and SSE registers
    assert x86_64.BY_NAME["rip"] == 16 and x86_64.BY_NAME["xmm0"] == 40
    sys_regs = [r.get("name") for r in root.findall("feature")[3].findall("reg")]
    assert sys_regs == ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]


def _state() -> x86_64.CpuState:
    rng = random.Random(7)
    regs, sregs, fpu = b.kvm_regs(), b.kvm_sregs(), b.kvm_fpu()
    for name, _ in b.kvm_regs._fields_:
        setattr(regs, name, rng.getrandbits(64))
    sregs.cr3, sregs.efer, sregs.cs.selector, sregs.fs.base = 0x106000, 0x500, 0x8, 0xABC
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    for i in range(16):
        for j in range(16):
            fpu.xmm[i][j] = rng.getrandbits(8)
    return x86_64.CpuState(regs, sregs, fpu)


def test_g_packet_layout() -> None:
    state = _state()
    data = x86_64.read_all(state)
    assert len(data) == sum(r.size for r in x86_64.REGISTERS)
    assert data[:8] == state.regs.rax.to_bytes(8, "little")
    regs = x86_64.REGISTERS
    off = {r.name: sum(x.size for x in regs[:i]) for i, r in enumerate(regs)}
    assert data[off["rip"] : off["rip"] + 8] == state.regs.rip.to_bytes(8, "little")
    assert data[off["eflags"] : off["eflags"] + 4] == (state.regs.rflags & 0xFFFFFFFF).to_bytes(
        4, "little"
    )
    assert data[off["cr3"] : off["cr3"] + 8] == (0x106000).to_bytes(8, "little")
    assert data[off["fs_base"] : off["fs_base"] + 8] == (0xABC).to_bytes(8, "little")
    assert data[off["xmm3"] : off["xmm3"] + 16] == bytes(state.fpu.xmm[3])
    assert data[off["ftag"] : off["ftag"] + 4] == (0xFFFF).to_bytes(4, "little")  # all empty


def test_register_writes_roundtrip_and_report_what_changed() -> None:
    state = _state()
    assert x86_64.write_register(state, x86_64.BY_NAME["rax"], (5).to_bytes(8, "little")) == {
        "regs"
    }
    assert state.regs.rax == 5
    assert x86_64.write_register(state, x86_64.BY_NAME["cr3"], (0x9000).to_bytes(8, "little")) == {
        "sregs"
    }
    assert state.sregs.cr3 == 0x9000
    assert x86_64.write_register(state, x86_64.BY_NAME["xmm1"], bytes(range(16))) == {"fpu"}
    assert bytes(state.fpu.xmm[1]) == bytes(range(16))
    with pytest.raises(ValueError):
        x86_64.write_register(state, x86_64.BY_NAME["cs"], (0x23).to_bytes(4, "little"))
    with pytest.raises(ValueError):
        x86_64.write_register(state, x86_64.BY_NAME["rax"], b"\x00")
    # G with the same bytes changes nothing; a G that stops short is fine
    data = x86_64.read_all(state)
    assert x86_64.write_all(state, data) == set()
    assert x86_64.write_all(state, data[:20]) == set()


def test_x87_tag_word_from_the_abridged_one() -> None:
    state = _state()
    state.fpu.ftwx = 0b1  # physical register 0 in use
    state.fpu.fsw = 0  # top = 0, so ST0 is physical register 0
    one = (1 << 63).to_bytes(8, "little") + (0x3FFF).to_bytes(2, "little")
    for j, c in enumerate(one):
        state.fpu.fpr[0][j] = c
    assert x86_64._full_tag(state) == 0xFFFC  # reg 0 valid (00), the rest empty (11)
    for j in range(10):
        state.fpu.fpr[0][j] = 0
    assert x86_64._full_tag(state) == 0xFFFD  # zero (01)


# --- the gdb address in configs -----------------------------------------------------


def test_gdb_addresses() -> None:
    assert parse_host_port("127.0.0.1:1234") == HostPort("127.0.0.1", 1234)
    assert parse_host_port("[::1]:1234") == HostPort("::1", 1234)
    assert str(parse_host_port("[::1]:1234")) == "[::1]:1234"
    assert parse_host_port("localhost:9") == HostPort("localhost", 9)
    bad_ones = ("1234", ":1234", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "host:1")
    for bad in (*bad_ones, "127.0.0.1:\u00b9\u00b2", "127.0.0.1:\u0661"):  # non-ASCII digits
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_gdb_option_validation(tmp_path: object) -> None:
    from pathlib import Path

    image = Path(str(tmp_path)) / "x.elf"
    image.write_bytes(pvh_elf(b"\xf4"))
    part = partition_from_args(str(image), gdb="127.0.0.1:1234")
    assert part.gdb == HostPort("127.0.0.1", 1234) and not part.gdb_attach
    with pytest.raises(ConfigError, match=r"^--gdb: bad port"):
        partition_from_args(str(image), gdb="127.0.0.1:99999")
    with pytest.raises(ConfigError, match="--gdb-allow-remote"):
        partition_from_args(str(image), gdb="0.0.0.0:1234")
    remote = partition_from_args(str(image), gdb="0.0.0.0:1234", gdb_allow_remote=True)
    assert remote.gdb == HostPort("0.0.0.0", 1234)


def test_gdb_key_in_a_system_file(tmp_path: object) -> None:
    from pathlib import Path

    from corevisor.config import load_config

    d = Path(str(tmp_path))
    (d / "x.elf").write_bytes(pvh_elf(b"\xf4"))
    f = d / "s.toml"
    f.write_text('[partitions.a]\nimage = "x.elf"\ngdb = "127.0.0.1:4444"\n')
    assert load_config(f).partitions[0].gdb == HostPort("127.0.0.1", 4444)
    f.write_text('[partitions.a]\nimage = "x.elf"\ngdb = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"s\.toml: partitions\.a\.gdb: .*HOST:PORT"):
        load_config(f)
    f.write_text('[partitions.a]\nimage = "x.elf"\ngdb = "10.1.2.3:4444"\n')
    with pytest.raises(ConfigError, match=r"partitions\.a\.gdb: 10\.1\.2\.3 is not a loopback"):
        load_config(f)
    assert load_config(f, gdb_allow_remote=True).partitions[0].gdb == HostPort("10.1.2.3", 4444)
    f.write_text('[partitions.a]\nimage = "x.elf"\ngdb = 1234\n')
    with pytest.raises(ConfigError, match=r"partitions\.a\.gdb: expected a string"):
        load_config(f)
