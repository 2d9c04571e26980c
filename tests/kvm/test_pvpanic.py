"""A guest kernel's panic through pvpanic is a crash: a report and exit status 1.

An assembled guest reads the capabilities and writes PANICKED, as Linux's pvpanic
driver does from its panic notifier (the same with Debian's kernel, in the lab:
tests/lab/test_linux.py).
"""

from __future__ import annotations

from pathlib import Path

from corevisor.arch.x86_64 import layout
from tests.kvm.asm import guest, string
from tests.kvm.conftest import corevisor


def test_pvpanic_is_a_crash_with_status_1(tmp_path: Path) -> None:
    img = guest(
        tmp_path / "panic.elf",
        rf"""
main:
    PRINT s_caps
    mov ${layout.PVPANIC_PORT:#x}, %dx
    xor %eax, %eax
    in %dx, %al
    call print_hex
    call print_nl
    mov $1, %al
    out %al, %dx
    EXIT 0
"""
        + string("s_caps", "pvpanic caps "),
    )
    r = corevisor("run", str(img), "--memory", "16M", timeout=60)
    assert "pvpanic caps 00000001" in r.stdout.splitlines()
    assert r.returncode == 1, r.stderr
    assert "guest stopped: guest kernel panicked (pvpanic)" in r.stderr
