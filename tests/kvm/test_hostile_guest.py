"""A hostile guest: random port I/O and MMIO thrown at every device; the VMM must survive.

Both guests run a xorshift32 generator at CPL0 and, after thousands of random accesses,
restore COM1's line control (the fuzz may have left the divisor latch on), print
"survived" and exit 0. Only the exit port and the i8042 (whose reset command would end
the run early, legitimately) are spared. The assertion is what a user sees: the guest's
own exit status, its output, and no traceback from the VMM.
"""

from __future__ import annotations

from pathlib import Path

from tests.kvm.asm import guest, string
from tests.kvm.conftest import corevisor

RANDOM = r"""
rand:                           # eax = next xorshift32 value
    mov seed, %eax
    mov %eax, %edx
    shl $13, %edx
    xor %edx, %eax
    mov %eax, %edx
    shr $17, %edx
    xor %edx, %eax
    mov %eax, %edx
    shl $5, %edx
    xor %edx, %eax
    mov %eax, seed
    ret
seed: .long 0x2545f491

survive:
    mov $0x3fb, %dx             # LCR: 8N1, divisor latch off
    mov $3, %al
    out %al, %dx
    PRINT msg
    EXIT 0
""" + string("msg", "survived\\n")

PORT_FUZZ = r"""
main:
    mov $4000, %ecx
1:  push %ecx
    call rand
    mov %eax, %ebx              # ebx: what to do
    shr $16, %eax
    mov %ax, %dx                # dx: the port
    cmp $0xf4, %dx              # spare the exit port 0xf4-0xf7 ...
    jb 2f
    cmp $0xf7, %dx
    jbe 9f
2:  cmp $0x60, %dx              # ... and the i8042 (0x60-0x64: reset line)
    jb 3f
    cmp $0x64, %dx
    jbe 9f
3:  mov %ebx, %eax
    and $0x70, %eax
    cmp $0x10, %eax
    je 10f
    cmp $0x20, %eax
    je 11f
    push %edx
    call rand                   # eax: the value
    pop %edx
    test $1, %bl
    jnz 5f
    test $2, %bl
    jnz 4f
    out %al, %dx
    jmp 9f
4:  test $4, %bl
    jnz 6f
    out %ax, %dx
    jmp 9f
6:  out %eax, %dx
    jmp 9f
5:  test $2, %bl
    jnz 7f
    in %dx, %al
    jmp 9f
7:  test $4, %bl
    jnz 8f
    in %dx, %ax
    jmp 9f
8:  in %dx, %eax
    jmp 9f
10: mov %ebx, %ecx              # rep outsb: up to 31 bytes of our own code
    shr $8, %ecx
    and $31, %ecx
    mov $main, %esi
    rep outsb
    jmp 9f
11: mov %ebx, %ecx              # rep insb into a scratch buffer
    shr $8, %ecx
    and $31, %ecx
    mov $0x70000, %edi
    rep insb
9:  pop %ecx
    dec %ecx
    jnz 1b
    jmp survive
""" + RANDOM

MMIO_FUZZ = r"""
.set GARBAGE, 0x200000          # 64 KiB of random bytes the rings will point into
.macro REG off, value
    movl \value, \off(%edi)
.endm

# A hostile driver: negotiate properly, then hand the device rings made of random bytes.
hostile_queue:                  # edi: a virtio-mmio window
    REG 0x70, $0                # reset
    REG 0x70, $3                # ACKNOWLEDGE | DRIVER
    REG 0x24, $1
    REG 0x20, $1                # VERSION_1 (feature bit 32)
    REG 0x24, $0
    REG 0x20, $0
    REG 0x70, $0xb              # | FEATURES_OK
    REG 0x30, $0                # queue 0
    REG 0x38, $8
    call rand
    and $0xfff0, %eax
    add $GARBAGE, %eax
    mov %eax, %ebp              # descriptor table in the garbage ...
    REG 0x80, %eax
    REG 0x84, $0
    mov $8, %ecx
5:  mov %ecx, %esi              # ... made plausible: esi = descriptor ecx-1
    dec %esi
    shl $4, %esi
    add %ebp, %esi
    call rand
    test $0x100, %eax
    jz 6f
    and $0xfffff0, %eax         # half the buffers inside our RAM
6:  mov %eax, (%esi)
    movl $0, 4(%esi)
    call rand
    and $0x3fff, %eax
    mov %eax, 8(%esi)           # length
    call rand
    and $0x00070007, %eax       # flags NEXT|WRITE|INDIRECT at random, next in 0..7
    mov %eax, 12(%esi)
    loop 5b
    call rand
    and $0xfffe, %eax
    add $GARBAGE, %eax
    mov %eax, %ebp              # available ring in the garbage: 1..8 chains pending,
    REG 0x90, %eax              # heads within the queue
    REG 0x94, $0
    movw $0, (%ebp)
    call rand
    and $7, %eax
    inc %eax
    mov %ax, 2(%ebp)
    mov $8, %ecx
7:  call rand
    and $7, %eax
    mov %ax, 2(%ebp,%ecx,2)
    loop 7b
    call rand
    and $0xfffc, %eax
    add $GARBAGE, %eax
    REG 0xa0, %eax              # used ring in the garbage
    REG 0xa4, $0
    REG 0x44, $1                # QueueReady
    REG 0x70, $0xf              # | DRIVER_OK
    REG 0x50, $0                # kick queue 0 (through the ioeventfd)
    ret

main:
    mov $GARBAGE, %edi          # fill the garbage
    mov $0x4000, %ecx
0:  call rand
    stosl
    loop 0b
    mov $50, %ecx
0:  push %ecx
    mov $0xc0000000, %edi
    call hostile_queue
    mov $0xc0001000, %edi
    call hostile_queue
    pop %ecx
    loop 0b
    mov $6000, %ecx
1:  push %ecx
    call rand
    mov %eax, %ebx              # ebx: what to do
    call rand
    mov %eax, %edi              # edi: where
    call rand                   # eax: the value
    test $8, %bl
    jz 2f
    and $0x10fc, %edi           # half the time: a register (0x00-0xfc) of one of the two
    test $16, %bl               # virtio-mmio windows, with a value that means something
    jz 5f                       # there: small (status bits, sizes, queue index to notify)
    and $0x1ff, %eax
    jmp 3f
5:  and $0xfffff8, %eax         # or an address inside our 16 MiB (rings, buffers)
    jmp 3f
2:  and $0x1ffffffc, %edi       # else anywhere in 0xc0000000-0xdfffffff
3:  or $0xc0000000, %edi
    test $1, %bl
    jnz 4f
    mov %eax, (%edi)
    jmp 9f
4:  mov (%edi), %eax
9:  pop %ecx
    dec %ecx
    jnz 1b
    jmp survive
""" + RANDOM


def test_random_port_io_everywhere(tmp_path: Path) -> None:
    img = guest(tmp_path / "ports.elf", PORT_FUZZ)
    log = tmp_path / "serial.log"
    r = corevisor("run", str(img), "--memory", "16M", "--serial", f"file:{log}", timeout=300)
    assert "Traceback" not in r.stderr
    assert r.returncode == 0, r.stderr
    assert log.read_bytes().endswith(b"survived\n")


def test_random_mmio_into_virtio_registers(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * 1024))
    img = guest(tmp_path / "mmio.elf", MMIO_FUZZ)
    log = tmp_path / "serial.log"
    r = corevisor(
        "run", str(img), "--memory", "16M", "--serial", f"file:{log}",
        "--disk", str(disk), "--rng", timeout=300,
    )
    assert "Traceback" not in r.stderr
    assert r.returncode == 0, r.stderr
    assert log.read_text() == "survived\n"
    # the hostile rings reached the devices and were contained there
    assert "device needs reset" in r.stderr, r.stderr
