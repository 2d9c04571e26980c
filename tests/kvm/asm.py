"""Paravirtual test guests written in GNU assembler, assembled at test time (binutils).

Each guest is 32-bit flat protected-mode code entered through PVH (images.pvh_elf), so
it needs no runtime: a prelude gives it a stack, COM1 output, a hypercall macro, and
optionally an IDT entry plus IOAPIC/LAPIC set-up to take a channel doorbell on GSI 16.
Everything runs at CPL0, which the test host emulates (~3 M instructions/s): keep
loops short. Fixed guest-physical addresses used here, all inside the 16M of RAM the
tests give a partition and clear of the VMM's boot data: the call block at 0x60000,
the IDT at 0x61000, the stack below 0x80000.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from tests.kvm.images import LOAD_ADDR, pvh_elf

CHANNEL0 = 0xD000_0000  # where config/validate.py places the first channel

PRELUDE = r"""
.code32
.set BLOCK, 0x60000
.set IDT, 0x61000
.set COM1, 0x3f8

.macro HC nr, a0=0
    movl $\nr, BLOCK
    movl $0, BLOCK+4
    movl $\a0, BLOCK+8
    movl $0, BLOCK+12
    mov $BLOCK, %eax
    mov $0x500, %dx
    out %eax, %dx
.endm

.macro PRINT label
    mov $\label, %esi
    call print_str
.endm

.macro EXIT status
    mov $\status, %al
    out %al, $0xf4
    hlt
.endm

.globl _start
.weak doorbell_irq
_start:
    mov $0x80000, %esp
    jmp main

print_str:                      # esi: NUL-terminated string
    push %eax
    push %edx
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  pop %edx
    pop %eax
    ret

print_hex:                      # eax: printed as 8 hex digits
    push %eax
    push %ebx
    push %ecx
    push %edx
    mov $8, %ecx
    mov $COM1, %dx
1:  rol $4, %eax
    mov %eax, %ebx
    and $0xf, %ebx
    push %eax
    movb hexdigits(%ebx), %al
    out %al, %dx
    pop %eax
    loop 1b
    pop %edx
    pop %ecx
    pop %ebx
    pop %eax
    ret

print_nl:
    push %eax
    push %edx
    mov $COM1, %dx
    mov $10, %al
    out %al, %dx
    pop %edx
    pop %eax
    ret

# Take channel doorbells: IDT vector 0x30 -> doorbell_irq (the guest defines it), local
# APIC on, IOAPIC pin 16 (the first channel's GSI) -> vector 0x30, edge, to APIC 0.
setup_doorbell_irq:
    mov $doorbell_irq, %eax
    mov %ax, IDT + 0x30 * 8
    mov %cs, %bx
    mov %bx, IDT + 0x30 * 8 + 2
    movw $0x8e00, IDT + 0x30 * 8 + 4
    shr $16, %eax
    mov %ax, IDT + 0x30 * 8 + 6
    lidt idtr
    movl $0x1ff, 0xfee000f0
    movl $0x30, 0xfec00000
    movl $0x30, 0xfec00010
    movl $0x31, 0xfec00000
    movl $0, 0xfec00010
    ret

hexdigits: .ascii "0123456789abcdef"
idtr: .word 256 * 8 - 1
      .long IDT
"""


def assemble(source: str, load_addr: int = LOAD_ADDR) -> bytes:
    """Assemble PRELUDE + source into flat code linked at load_addr (default: the PVH
    load address)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "g.s").write_text(PRELUDE + source)
        for cmd in (
            ["as", "--32", "-o", "g.o", "g.s"],
            [
                "ld",
                "-m",
                "elf_i386",
                f"-Ttext={load_addr:#x}",
                "--oformat=binary",
                "-o",
                "g.bin",
                "g.o",
            ],
        ):
            proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr}")
        return (d / "g.bin").read_bytes()


def guest(path: Path, source: str) -> Path:
    """Write a PVH image of the assembled source to path and return path."""
    path.write_bytes(pvh_elf(assemble(source)))
    return path


def string(label: str, text: str) -> str:
    """A NUL-terminated string constant (with \\n escapes) for PRINT."""
    return f'{label}: .asciz "{text}"\n'
