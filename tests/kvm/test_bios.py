"""Legacy boot through a real BIOS on real KVM: Debian's SeaBIOS as the machine's
firmware, booting the bundled boot sector (guests/bootsect.asm) from virtio-blk-pci.

The CPU starts at the reset vector in real mode; SeaBIOS runs from its ROM below 4 GiB
and from shadow RAM at 0xF0000 (the host bridge's PAM registers), finds the disk on
PCI, loads sector 0 and jumps to it; the boot sector prints through int 10h (SeaBIOS's
serial console on COM1), loads its second stage with int 13h and exits through 0xF4.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kvm.conftest import corevisor

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
BOOT_LINES = [
    "boot: stage 1 from drive 0x80",
    "boot: stage 2: 4 sectors by int 13h AH=42h, magic ok",
    "boot: int 13h AH=02h read of sector 1 matches",
]
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")


def lines(out: str) -> list[str]:
    """The serial output as lines, without the BIOS console's terminal escapes."""
    return [x.strip() for x in _ESCAPES.sub("", out).replace("\r", "").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def bootsect(guests: dict[str, Path]) -> Path:
    path = Path(__file__).parents[2] / "guests" / "build" / "bootsect.img"
    assert path.exists(), "guests/build/bootsect.img: install nasm (scripts/install-system-deps)"
    assert SEABIOS.exists(), "install Debian's seabios (scripts/install-system-deps)"
    return path


def test_seabios_boots_the_boot_sector_from_virtio_blk_pci(bootsect: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bootsect.read_bytes())  # the BIOS may write to its boot disk
    r = corevisor("run", "--bios", "--disk", str(disk), "--timeout", "150", timeout=200)
    out = lines(r.stdout)
    assert out[0].startswith("SeaBIOS (version "), r.stdout
    assert "Booting from Hard Disk..." in out
    start = out.index(BOOT_LINES[0])
    assert out[start : start + 3] == BOOT_LINES, out
    found = re.fullmatch(r"boot: int 12h: (\d+) KiB, int 15h E820: (\d+) entries", out[start + 3])
    assert found, out
    assert int(found.group(1)) >= 600  # conventional memory below the EBDA
    assert int(found.group(2)) >= 3  # low RAM, the BIOS's reservations, RAM above 1 MiB
    assert out[start + 4] == "boot: exit 0"
    assert r.returncode == 0, r.stderr
    assert "bios: guest exited with status 0" in r.stderr


def test_an_explicit_bios_path_and_two_cpus(bootsect: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bootsect.read_bytes())
    r = corevisor("run", "--bios", str(SEABIOS), "--disk", str(disk), "--cpus", "2",
                  "--memory", "128M", "--timeout", "150", timeout=200)
    assert "boot: exit 0" in lines(r.stdout) and r.returncode == 0, (r.stdout, r.stderr)


def test_a_disk_without_a_boot_signature_is_refused_by_the_bios(tmp_path: Path) -> None:
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(1 << 20))
    r = corevisor("run", "--bios", "--disk", str(disk), "--timeout", "20", timeout=90)
    assert "Boot failed: not a bootable disk" in lines(r.stdout), r.stdout
    assert r.returncode == 1 and "timed out" in r.stderr  # SeaBIOS waits 60 s to retry


def test_bad_bios_input_is_one_line(tmp_path: Path) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(1000))
    r = corevisor("run", "--bios", str(small), "--disk", str(small))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("corevisor: --bios: ") and "multiple of 64 KiB" in r.stderr
    r = corevisor("run", "--bios", "--disk", str(small), "--cmdline", "x")
    assert r.returncode == 2 and "--cmdline cannot be combined with --bios" in r.stderr
    r = corevisor("run", "--bios", "--transport", "mmio")
    assert r.returncode == 2 and r.stderr.startswith("corevisor: --transport: a partition with")
