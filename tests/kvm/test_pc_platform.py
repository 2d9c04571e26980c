"""The PC platform pieces images made for QEMU expect, judged by what real guests print.

* fw_cfg: the bundled `fwcfg` guest reads it by port and by DMA (and its multiboot-only
  ELF32 copy, the kind of image that waits for 0xffff CPUs when fw_cfg is missing);
* the ACPI PM timer, measured by the same guest against the TSC rate of CPUID 0x40000010
  (coarse: the rate is printed, and only sanity is asserted);
* a raw (non-ELF) multiboot a.out-kludge image linked below 1 MiB, given modules both
  the corevisor way (--module) and the QEMU way (--initrd "F ARGS,F"), that powers off
  through ACPI S5; and the same image linked over the VMM's boot data, refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kvm.asm import assemble, string
from tests.kvm.conftest import corevisor


@pytest.mark.portable
def test_fwcfg_guest_reads_cpus_ram_and_e820_by_port_and_dma(guests: dict[str, Path]) -> None:
    r = corevisor("run", "fwcfg", "--cpus", "2", "--memory", "96M")
    out = r.stdout
    assert 'fwcfg: signature "QEMU" id 0x3 dma register "QEMU CFG"' in out, out + r.stderr
    assert "fwcfg: cpus=2 (io) cpus=2 (dma) max_cpus=2" in out
    assert "fwcfg: ram=100663296 bytes (io) ram=100663296 bytes (dma) = 96 MiB" in out
    assert "fwcfg: file etc/e820 key 0x21, 3 entries" in out  # bootorder 0x20, etc/e820 0x21
    assert "fwcfg: e820 0x0-0x9fbff usable" in out
    assert "fwcfg: e820 0x9fc00-0xfffff reserved" in out
    assert "fwcfg: e820 0x100000-0x5ffffff usable" in out
    assert "fwcfg: dma outside RAM: control 0x1 (error bit set)" in out
    assert "fwcfg: ok" in out
    assert r.returncode == 0, r.stderr


def test_pm_timer_ticks_at_about_3_58_mhz_against_the_published_tsc_rate(
    guests: dict[str, Path],
) -> None:
    r = corevisor("run", "fwcfg")
    assert "pmtimer: FADT PM_TMR_BLK 0x608" in r.stdout, r.stdout + r.stderr
    pattern = r"pmtimer: (\d+) Hz \((\d+) ticks in (\d+) us; tsc (\d+) kHz from cpuid 0x40000010"
    m = re.search(pattern, r.stdout)
    assert m, r.stdout + r.stderr
    hz, ticks, us, tsc_khz = map(int, m.groups())
    print(f"PM timer measured by the guest: {hz} Hz over {us} us (TSC {tsc_khz} kHz)")
    assert tsc_khz > 0 and ticks > 0
    # coarse sanity only: both clocks are read at the ends of a 200 ms window, and an
    # exit between the reads on a loaded host shifts the ratio by a few per cent
    assert 2_500_000 < hz < 5_000_000
    assert r.returncode == 0, r.stderr


@pytest.mark.portable
def test_multiboot_image_finds_its_cpus_in_fw_cfg(guests: dict[str, Path]) -> None:
    r = corevisor("run", "fwcfg-mb", "--cpus", "2", "--cmdline", "x=1")
    assert "fwcfg: cpus=2 (io) cpus=2 (dma) max_cpus=2" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0, r.stderr


LOW = 0x10000
# A legacy guest (asm.PRELUDE gives _start, a stack, PRINT and print_hex) in the manner
# of kvm-unit-tests' real-mode image: a flat binary whose multiboot header carries its
# load addresses (flag 16), linked at 64 KiB. It prints its
# command line, each module (start, size, string, contents), the CPU count from fw_cfg,
# then powers off through the FADT's PM1a control block (SLP_TYP = 5 from \_S5, SLP_EN).
AOUT_GUEST = r"""
.set MB_FLAGS, 0x00010003
    .balign 4
mb_header:
    .long 0x1BADB002
    .long MB_FLAGS
    .long -(0x1BADB002 + MB_FLAGS)
    .long mb_header             # header_addr
    .long _start                # load_addr: the file's first byte
    .long 0                     # load_end_addr: the whole file
    .long 0                     # bss_end_addr: no bss
    .long _start                # entry_addr
main:
    cld
    cmp $0x2BADB002, %eax
    jne bad
    mov %ebx, %ebp
    PRINT s_cmdline
    mov 16(%ebp), %esi
    call print_str
    call print_nl
    PRINT s_mods
    mov 20(%ebp), %eax
    call print_hex
    call print_nl
    mov 20(%ebp), %ecx
    mov 24(%ebp), %edi
1:  test %ecx, %ecx
    jz 2f
    PRINT s_mod
    mov (%edi), %eax
    call print_hex
    PRINT s_sp
    mov 4(%edi), %eax
    sub (%edi), %eax
    call print_hex
    PRINT s_sp
    mov 8(%edi), %esi
    call print_str
    PRINT s_bar
    push %ecx
    mov (%edi), %esi
    mov 4(%edi), %ecx
    sub %esi, %ecx
    mov $COM1, %dx
3:  jecxz 4f
    lodsb
    out %al, %dx
    dec %ecx
    jmp 3b
4:  pop %ecx
    PRINT s_bar
    call print_nl
    add $16, %edi
    dec %ecx
    jmp 1b
2:  mov $0x510, %dx             # fw_cfg: select NB_CPUS, read two bytes
    mov $5, %ax
    out %ax, %dx
    mov $0x511, %dx
    in %dx, %al
    movzbl %al, %ebx
    in %dx, %al
    movzbl %al, %eax
    shl $8, %eax
    or %ebx, %eax
    PRINT s_cpus
    call print_hex
    call print_nl
    mov $0x604, %dx             # PM1a_CNT: SLP_TYP = 5 (S5), SLP_EN
    mov $(5 << 10 | 1 << 13), %ax
    out %ax, %dx
    hlt
bad:
    EXIT 3
""" + "".join(
    string(label, text)
    for label, text in [
        ("s_cmdline", "low: cmdline "),
        ("s_mods", "low: mods_count "),
        ("s_mod", "low: module "),
        ("s_sp", " "),
        ("s_bar", "|"),
        ("s_cpus", "low: fw_cfg cpus "),
    ]
)


def _aout_image(tmp_path: Path, load: int = LOW) -> Path:
    image = tmp_path / f"low-{load:x}.bin"
    data = assemble(AOUT_GUEST, load_addr=load)
    assert data[:4] != b"\x7fELF" and len(data) < 0x1000
    image.write_bytes(data)
    return image


def test_raw_aout_multiboot_image_below_1mib_with_modules(tmp_path: Path) -> None:
    image = _aout_image(tmp_path)
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("bravo!")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    r = corevisor(
        "run", str(image), "--cpus", "2", "--cmdline", "one two",
        "--module", f"{a},a-string x=1", "--module", str(b),
    )
    out = r.stdout
    assert f"low: cmdline {image} one two" in out, out + r.stderr
    assert "low: mods_count 00000002" in out
    # page-aligned, one after the other, above the image (which ends below 0x11000)
    assert "low: module 00011000 00000005 a-string x=1|alpha|" in out
    assert f"low: module 00012000 00000006 {b}|bravo!|" in out
    assert "low: fw_cfg cpus 00000002" in out
    assert r.returncode == 0, r.stderr
    assert "guest powered off (ACPI S5)" in r.stderr


def test_qemu_style_initrd_is_the_module_list_of_a_multiboot_image(tmp_path: Path) -> None:
    image = _aout_image(tmp_path)
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("bravo!")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    r = corevisor("run", str(image), "--initrd", f"{a} arg1 x,,y,{b}")
    out = r.stdout
    assert f"low: module 00011000 00000005 {a} arg1 x,y|alpha|" in out, out + r.stderr
    assert f"low: module 00012000 00000006 {b}|bravo!|" in out
    assert r.returncode == 0, r.stderr


def test_system_file_modules_key(tmp_path: Path) -> None:
    image = _aout_image(tmp_path)
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sys.toml").write_text(
        f'[partitions.low]\nimage = "{image.name}"\nmodules = ["a.txt,first module"]\n'
    )
    r = corevisor("run", str(tmp_path / "sys.toml"))
    assert "low: module 00011000 00000005 first module|alpha|" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0, r.stderr


def test_image_over_the_boot_information_is_refused_naming_both_ranges(tmp_path: Path) -> None:
    image = _aout_image(tmp_path, load=0x99F00)
    r = corevisor("run", str(image))
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip()
    assert re.fullmatch(
        rf"corevisor: {re.escape(str(image))}: multiboot load range \(0x99f00-0x9a[0-9a-f]+\) "
        r"overlaps the boot information \(0x9a000-0x9c000\)",
        line,
    ), line
