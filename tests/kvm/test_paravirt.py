"""Hypercalls and channels on real KVM, with assembled guests run through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kvm.asm import guest, string
from tests.kvm.conftest import corevisor

HYPERCALLS = (
    r"""
main:
    HC 0                        # HC_VERSION
    PRINT s_version
    mov BLOCK+48, %eax
    call print_hex
    call print_nl
    HC 5                        # HC_PARTITION_INFO
    PRINT s_info
    mov BLOCK+48, %eax
    call print_hex
    mov BLOCK+56, %eax
    call print_hex
    call print_nl
    HC 99                       # unknown: -ENOSYS
    PRINT s_unknown
    mov BLOCK+48, %eax
    call print_hex
    call print_nl
    HC 7, 0                     # HC_CHANNEL_INFO(0) without channels: -ENOENT
    PRINT s_nochan
    mov BLOCK+48, %eax
    call print_hex
    call print_nl
    HC 1, msg                   # HC_CONSOLE_WRITE(msg, len)
    movl $msg_len, BLOCK+16
    mov $BLOCK, %eax
    mov $0x500, %dx
    out %eax, %dx
    mov $0x7ffff000, %eax       # a block outside RAM: ignored, the guest goes on
    out %eax, %dx
    EXIT 0
"""
    + string("s_version", "version ")
    + string("s_info", "info ")
    + string("s_unknown", "unknown ")
    + string("s_nochan", "nochan ")
    + 'msg: .ascii "console write works\\n"\n.set msg_len, . - msg\n'
)


@pytest.mark.portable
def test_hypercalls_answer_per_the_abi(tmp_path: Path) -> None:
    img = guest(tmp_path / "hc.elf", HYPERCALLS)
    r = corevisor("run", str(img), "--memory", "16M", "--cpus", "2", timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "version 00010001" in lines  # ABI 1.1
    assert "info 0000000000000002" in lines  # partition 0, 2 vCPUs
    assert "unknown ffffffda" in lines  # -38
    assert "nochan fffffffe" in lines  # -2
    assert "console write works" in lines


def _ping(me: str, my_off: int, magic: int, peer_off: int, peer_magic: int, ring: str) -> str:
    """Take doorbells, publish magic, wait for the peer's, print it, ring the peer, wait."""
    return (
        rf"""
main:
    call setup_doorbell_irq
    HC 7, 0                     # HC_CHANNEL_INFO(0): gpa, size | flags << 32 | gsi << 40
    PRINT s_info
    mov BLOCK+48, %eax
    call print_hex
    mov BLOCK+60, %eax
    call print_hex
    mov BLOCK+56, %eax
    call print_hex
    call print_nl
    mov BLOCK+48, %edi          # the channel's gpa
    movl ${magic:#x}, {my_off}(%edi)
1:  cmpl ${peer_magic:#x}, {peer_off}(%edi)
    jne 1b
    PRINT s_got
    mov {peer_off}(%edi), %eax
    call print_hex
    call print_nl
    sti
    {ring}
2:  hlt
    jmp 2b
doorbell_irq:
    PRINT s_irq
    EXIT 0
"""
        + string("s_info", f"{me} channel ")
        + string("s_got", f"{me} got ")
        + string("s_irq", f"{me} doorbell irq\\n")
    )


DIRECT_RING = "xor %eax, %eax\n    mov $0x504, %dx\n    out %eax, %dx"
RELAYED_RING = "HC 4, 0"  # HC_CHANNEL_NOTIFY(0)


def system_file(tmp_path: Path, parts: dict[str, tuple[Path, str]], tail: str = "") -> Path:
    """A system TOML: name -> (image, extra keys); logs under tmp_path/logs."""
    text = f'[system]\nlog_dir = "{tmp_path / "logs"}"\n'
    for name, (image, extra) in parts.items():
        text += f'[partitions.{name}]\nimage = "{image}"\nmemory = "16M"\n{extra}\n'
    path = tmp_path / "system.toml"
    path.write_text(text + tail)
    return path


# Not portable yet: in the lab the second partition's doorbell never wakes it from a
# plain hlt (docs/lab.md, "A lab limit: a halted vCPU that is not woken").
def test_channel_both_ways_with_direct_and_relayed_doorbells(tmp_path: Path) -> None:
    a = guest(tmp_path / "a.elf", _ping("a", 0, 0xAAAA0001, 4, 0xBBBB0002, DIRECT_RING))
    b = guest(tmp_path / "b.elf", _ping("b", 4, 0xBBBB0002, 0, 0xAAAA0001, RELAYED_RING))
    toml = system_file(
        tmp_path, {"a": (a, ""), "b": (b, "")}, '[channels.ab]\nbetween = ["a", "b"]\n'
    )
    r = corevisor("run", str(toml), timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    # gpa 0xd0000000, flags 2 (may ring), GSI 16, size 4K
    assert "a | a channel d000000000001002" + "00001000" in out
    assert "b | b channel d000000000001002" + "00001000" in out
    assert "a | a got bbbb0002" in out and "b | b got aaaa0001" in out
    assert "a | a doorbell irq" in out and "b | b doorbell irq" in out
    assert "a doorbell irq\n" in (tmp_path / "logs" / "a.log").read_text()


READER = (
    r"""
main:
    HC 7, 0
    PRINT s_info
    mov BLOCK+60, %eax
    call print_hex
    call print_nl
    mov BLOCK+48, %edi
1:  cmpl $0x11111111, (%edi)
    jne 1b
    movl $0x22222222, (%edi)    # refused: read-only mapping
    movl $0x33333333, 4(%edi)   # refused too, but only counted
    PRINT s_sees
    mov (%edi), %eax
    call print_hex
    mov 4(%edi), %eax
    call print_hex
    call print_nl
    HC 4, 0                     # may not ring: -EPERM
    PRINT s_ring
    mov BLOCK+48, %eax
    call print_hex
    call print_nl
    EXIT 0
doorbell_irq:
    EXIT 9
"""
    + string("s_info", "reader flags ")
    + string("s_sees", "reader sees ")
    + string("s_ring", "reader ring ")
)

WRITER = r"""
main:
    HC 7, 0
    mov BLOCK+48, %edi
    movl $0x11111111, (%edi)
    EXIT 0
doorbell_irq:
    EXIT 9
"""


@pytest.mark.portable
def test_one_way_channel_refuses_the_readers_writes(tmp_path: Path) -> None:
    w = guest(tmp_path / "w.elf", WRITER)
    rd = guest(tmp_path / "r.elf", READER)
    toml = system_file(
        tmp_path,
        {"writer": (w, ""), "reader": (rd, "")},
        '[channels.feed]\nbetween = ["writer", "reader"]\ndirection = "writer->reader"\n',
    )
    r = corevisor("run", str(toml), timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "reader | reader flags 00001001" in out  # GSI 16, flags: read-only, cannot ring
    assert "reader | reader sees 1111111100000000" in out
    assert "reader | reader ring ffffffff" in out  # -EPERM
    refusals = [x for x in r.stderr.splitlines() if "refused a write" in x]
    assert refusals == [
        "corevisor: reader: refused a write to read-only channel feed at offset 0x0 "
        "(4 bytes); further refusals are only counted"
    ]


PHOENIX = (
    r"""
main:
    HC 7, 0
    mov BLOCK+48, %edi
    mov (%edi), %eax
    test %eax, %eax
    jnz again
    movl $0x1234, (%edi)        # first boot: leave a mark in the channel, then crash
    PRINT s_crash
    lidt zero_idtr
    ud2                         # #UD with no IDT -> #DF -> triple fault
again:
    PRINT s_kept
    call print_hex
    call print_nl
    call setup_doorbell_irq
    movl $0xcafe, 4(%edi)       # ready for the peer's doorbell
    sti
1:  hlt
    jmp 1b
doorbell_irq:
    PRINT s_irq
    EXIT 0
zero_idtr: .word 0
           .long 0
"""
    + string("s_crash", "phoenix: crashing\\n")
    + string("s_kept", "phoenix: channel kept ")
    + string("s_irq", "phoenix: doorbell irq after restart\\n")
)

RINGER = r"""
main:
    HC 7, 0
    mov BLOCK+48, %edi
1:  cmpl $0xcafe, 4(%edi)
    jne 1b
    xor %eax, %eax
    mov $0x504, %dx
    out %eax, %dx
    EXIT 0
"""


def test_restart_keeps_channel_memory_and_rewires_doorbells(tmp_path: Path) -> None:
    ph = guest(tmp_path / "phoenix.elf", PHOENIX)
    ringer = guest(tmp_path / "ringer.elf", RINGER)
    toml = system_file(
        tmp_path,
        {"phoenix": (ph, 'restart = "restart"'), "ringer": (ringer, "")},
        '[channels.c]\nbetween = ["phoenix", "ringer"]\n',
    )
    r = corevisor("run", str(toml), timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out.count("phoenix | phoenix: crashing") == 1
    assert "phoenix | phoenix: channel kept 00001234" in out
    assert "phoenix | phoenix: doorbell irq after restart" in out
    assert "restarting (1/3 in 60 s)" in r.stderr
