"""ACPI tables: parsed back independently, and disassembled by ACPICA's iasl."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from corevisor.arch.x86_64 import acpi, layout
from corevisor.memory import GuestMemory


def _tables(ncpus: int) -> tuple[bytes, dict[bytes, bytes]]:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    rsdp_addr = acpi.write_acpi_tables(mem, ncpus)
    assert rsdp_addr == layout.ACPI_ADDR
    rsdp = mem.read(rsdp_addr, 36)

    def table(addr: int) -> bytes:
        return mem.read(addr, struct.unpack_from("<I", mem.read(addr, 8), 4)[0])

    xsdt = table(struct.unpack_from("<Q", rsdp, 24)[0])
    found = {b"XSDT": xsdt}
    for i in range((len(xsdt) - 36) // 8):
        t = table(struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0])
        found[t[:4]] = t
    found[b"DSDT"] = table(struct.unpack_from("<Q", found[b"FACP"], 140)[0])
    mem.close()
    return rsdp, found


@pytest.mark.parametrize("ncpus", [1, 2, 64])
def test_checksums_and_madt_cpus(ncpus: int) -> None:
    rsdp, tables = _tables(ncpus)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    for sig, t in tables.items():
        assert t[:4] == sig and sum(t) % 256 == 0, sig
    madt = tables[b"APIC"]
    assert struct.unpack_from("<I", madt, 36)[0] == layout.LAPIC_ADDR
    apic_ids, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 0:
            assert struct.unpack_from("<I", madt, off + 4)[0] & 1  # enabled
            apic_ids.append(madt[off + 3])
        elif kind == 1:
            assert struct.unpack_from("<I", madt, off + 4)[0] == layout.IOAPIC_ADDR
        off += length
    assert apic_ids == list(range(ncpus))
    assert struct.unpack_from("<I", tables[b"FACP"], 112)[0] & acpi.FADT_HW_REDUCED_ACPI


def _acpidump_text(name: str, addr: int, data: bytes) -> str:
    """One table in acpidump's text format, the form ACPICA's tools take dumps in."""
    lines = [f"{name} @ 0x{addr:016X}"]
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexs = " ".join(f"{b:02X}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"    {off:04X}: {hexs:<47}  {text}")
    return "\n".join(lines) + "\n\n"


def test_acpixtract_finds_every_table_including_the_rsdp(tmp_path: Path) -> None:
    # iasl 20200925 cannot disassemble any standalone RSDP (it reads a length from
    # offset 4, which in an RSDP is "PTR "); acpixtract, from the same ACPICA release,
    # parses it, and the checksums are verified independently above.
    rsdp, tables = _tables(2)
    dump = _acpidump_text("RSDP", layout.ACPI_ADDR, rsdp)
    for sig, t in tables.items():
        dump += _acpidump_text(sig.decode(), 0, t)
    (tmp_path / "acpidump.txt").write_text(dump)
    r = subprocess.run(
        ["acpixtract", "-a", "acpidump.txt"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "rsdp.dat").read_bytes() == rsdp
    for sig, t in tables.items():
        assert (tmp_path / f"{sig.decode().lower()}.dat").read_bytes() == t


def test_iasl_disassembles_every_table(tmp_path: Path) -> None:
    _, tables = _tables(4)
    for sig, t in tables.items():
        name = sig.decode().lower()
        (tmp_path / f"{name}.dat").write_bytes(t)
        r = subprocess.run(
            ["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
        dsl = (tmp_path / f"{name}.dsl").read_text()
        assert "Invalid" not in dsl and "**** " not in dsl, dsl
