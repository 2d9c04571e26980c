"""Hand-assembled AML: virtio-mmio devices in the DSDT, checked by ACPICA's own disassembler."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from corevisor.arch.x86_64 import acpi, aml, layout
from corevisor.memory import GuestMemory


def _dsdt(windows: list[tuple[int, int, int]]) -> bytes:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        rsdp = mem.read(acpi.write_acpi_tables(mem, 1, windows), 36)
        xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
        fadt_addr = struct.unpack_from("<Q", mem.read(xsdt_addr + 36, 8))[0]
        dsdt_addr = struct.unpack_from("<Q", mem.read(fadt_addr + 140, 8))[0]
        length = struct.unpack_from("<I", mem.read(dsdt_addr + 4, 4))[0]
        return mem.read(dsdt_addr, length)
    finally:
        mem.close()


@pytest.mark.parametrize("n", [0, 30, 1000])
def test_pkg_length_round_trip(n: int) -> None:
    enc = aml.pkg_length(n)
    lead = enc[0] >> 6
    assert len(enc) == lead + 1
    total = enc[0] & (0x3F if lead == 0 else 0xF)
    for i, byte in enumerate(enc[1:]):
        total |= byte << (4 + 8 * i)
    assert total == n + len(enc)


def test_no_virtio_devices_leaves_only_the_uart() -> None:
    assert aml.virtio_mmio_devices([]) == b""
    assert aml.eisa_id("PNP0501") == 0x0105D041  # the value ACPI tables carry for COM ports
    assert b"COM1" in _dsdt([]) and b"LNRO0005" not in _dsdt([])


def test_iasl_disassembles_virtio_devices(tmp_path: Path) -> None:
    windows = [(0xC000_0000 + i * 0x1000, 0x1000, gsi) for i, gsi in enumerate((5, 6, 7, 9))]
    dsdt = _dsdt(windows)
    assert sum(dsdt) % 256 == 0
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    proc = subprocess.run(
        ["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert dsl.count('Name (_HID, "LNRO0005")') == 4
    for i, (base, _, gsi) in enumerate(windows):
        assert f"Device (VR{i:02X})" in dsl
        assert f"0x{base:08X},         // Address Base" in dsl
        assert f"0x{gsi:08X}," in dsl
    assert "Memory32Fixed (ReadWrite," in dsl
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in dsl
    assert 'Name (_HID, EisaId ("PNP0501")' in dsl
    assert "IO (Decode16,\n" in dsl and "0x03F8," in dsl
    assert "IRQNoFlags ()\n" in dsl and "{4}" in dsl
    # pvpanic on its one port: what Linux's pvpanic-mmio driver binds
    assert "Device (PEVT)" in dsl and 'Name (_HID, "QEMU0001")' in dsl
    assert f"0x{layout.PVPANIC_PORT:04X},             // Range Minimum" in dsl
    # And it compiles back: the AML is well-formed, not just disassemblable.
    back = subprocess.run(
        ["iasl", "-p", "re", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert back.returncode == 0, back.stdout + back.stderr
