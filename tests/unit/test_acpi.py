"""ACPI tables: parsed back independently, and disassembled by ACPICA's iasl."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from corevisor.arch.x86_64 import acpi, aml, layout
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
    found[b"FACS"] = table(struct.unpack_from("<I", found[b"FACP"], 36)[0])
    mem.close()
    return rsdp, found


@pytest.mark.parametrize("ncpus", [1, 2, 64])
def test_checksums_and_madt_cpus(ncpus: int) -> None:
    rsdp, tables = _tables(ncpus)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    for sig, t in tables.items():
        assert t[:4] == sig and (sig == b"FACS" or sum(t) % 256 == 0), sig  # FACS: no sum
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


def test_fadt_declares_pm_timer_pm1_blocks_sci_and_facs() -> None:
    """A PM timer needs a FADT that is not hardware-reduced (ACPI 6.5, 5.2.9), and then
    the PM1a blocks, an SCI and a FACS are required; the FACS is 64-byte aligned."""
    _, tables = _tables(2)
    fadt = tables[b"FACP"]
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert not flags & acpi.FADT_HW_REDUCED_ACPI and flags & acpi.FADT_TMR_VAL_EXT
    facs32, facs64 = struct.unpack_from("<I", fadt, 36)[0], struct.unpack_from("<Q", fadt, 132)[0]
    assert facs32 % 64 == 0 and facs32 and facs64 == 0  # one pointer: Linux takes both
    assert struct.unpack_from("<HI", fadt, 46) == (9, 0)  # SCI 9, no SMI_CMD
    assert struct.unpack_from("<III", fadt, 56) == (0x600, 0, 0x604)  # PM1a/b EVT, PM1a CNT
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608
    assert (fadt[88], fadt[89], fadt[91]) == (4, 2, 4)
    for offset, port, bits in ((148, 0x600, 32), (172, 0x604, 16), (208, 0x608, 32)):
        space, width, _, _, address = struct.unpack_from("<BBBBQ", fadt, offset)
        assert (space, width, address) == (1, bits, port)  # system I/O
    facs = tables[b"FACS"]
    assert len(facs) == 64 and facs[32] == 2  # version 2
    # the SCI's interrupt source override in the MADT: IRQ 9 -> GSI 9, level, active high
    madt = tables[b"APIC"]
    assert struct.pack("<BBBBIH", 2, 10, 0, 9, 9, 0x000D) in madt


def _iasl(tmp_path: Path, sig: bytes, data: bytes) -> str:
    name = sig.decode().lower()
    (tmp_path / f"{name}.dat").write_bytes(data)
    r = subprocess.run(["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return (tmp_path / f"{name}.dsl").read_text()


def test_iasl_reads_the_pm_timer_facs_fw_cfg_and_s5(tmp_path: Path) -> None:
    _, tables = _tables(2)
    fadt = _iasl(tmp_path, b"FACP", tables[b"FACP"])
    for field, value in [
        ("SCI Interrupt", "0009"),
        ("PM1A Event Block Address", "00000600"),
        ("PM1A Control Block Address", "00000604"),
        ("PM Timer Block Address", "00000608"),
        ("PM Timer Block Length", "04"),
        ("32-bit PM Timer (V1)", "1"),
        ("Hardware Reduced (V5)", "0"),
    ]:
        assert re.search(rf"{re.escape(field)} : {value}\n", fadt), field
    # the X_PM_TMR_BLK generic address: system I/O, 32 bits, at 0x608
    gas = fadt[fadt.index("PM Timer Block : [Generic Address Structure]") :]
    assert re.search(r"Space ID : 01 \[SystemIO\]", gas)
    assert re.search(r"Bit Width : 20", gas) and re.search(r"Address : 0000000000000608", gas)
    facs = _iasl(tmp_path, b"FACS", tables[b"FACS"])
    assert re.search(r"Signature : \"FACS\"", facs) and re.search(r"Version : 02", facs)
    dsdt = _iasl(tmp_path, b"DSDT", tables[b"DSDT"])
    assert 'Name (_HID, "QEMU0002")' in dsdt and "Device (FWCF)" in dsdt
    assert re.search(r"IO \(Decode16,\s+0x0510,\s+// Range Minimum\s+0x0510,", dsdt), dsdt
    assert re.search(r"Name \(_S5, Package \(0x04\)\s+// _S5_: S5 System State\s+\{\s+0x05,", dsdt)


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
        dsl = _iasl(tmp_path, sig, t)
        assert "Invalid" not in dsl and "**** " not in dsl, dsl


def _pci_host() -> aml.PciHost:
    routes = tuple((s, p, layout.pci_intx_gsi(s, p + 1)) for s in range(1, 32) for p in range(4))
    return aml.PciHost(
        config_port=layout.PCI_CONFIG_PORT,
        io=(layout.PCI_IO_START, layout.PCI_IO_END),
        mmio32=(layout.PCI_MMIO32_START, layout.PCI_MMIO32_END),
        mmio64=layout.pci64_window(64 << 20),
        ecam=(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE),
        routes=routes,
    )


def _pci_tables() -> dict[bytes, bytes]:
    built = acpi.build_acpi_tables(2, (), _pci_host())
    rsdp, blob = built.relocate(0x10000)
    out = {}
    xsdt_at = struct.unpack_from("<Q", rsdp, 24)[0] - 0x10000
    xsdt = blob[xsdt_at : xsdt_at + struct.unpack_from("<I", blob, xsdt_at + 4)[0]]
    for i in range((len(xsdt) - 36) // 8):
        at = struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0] - 0x10000
        t = blob[at : at + struct.unpack_from("<I", blob, at + 4)[0]]
        out[t[:4]] = t
    dsdt_at = struct.unpack_from("<Q", out[b"FACP"], 140)[0] - 0x10000
    out[b"DSDT"] = blob[dsdt_at : dsdt_at + struct.unpack_from("<I", blob, dsdt_at + 4)[0]]
    return out


def test_a_pci_machine_has_mcfg_pci0_prt_and_intx_overrides(tmp_path: Path) -> None:
    tables = _pci_tables()
    for sig, t in tables.items():
        assert sum(t) % 256 == 0, sig
    mcfg = tables[b"MCFG"]
    assert struct.unpack_from("<QHBB", mcfg, 44) == (layout.PCI_ECAM_START, 0, 0, 0)
    assert "Invalid" not in _iasl(tmp_path, b"MCFG", mcfg)
    madt = tables[b"APIC"]
    for irq in (10, 11):  # the INTx lines: level, active low
        assert struct.pack("<BBBBIH", 2, 10, 0, irq, irq, 0x000F) in madt
    dsdt = _iasl(tmp_path, b"DSDT", tables[b"DSDT"])
    assert "Device (PCI0)" in dsdt and 'EisaId ("PNP0A08")' in dsdt
    assert 'EisaId ("PNP0A03")' in dsdt and 'EisaId ("PNP0C02")' in dsdt
    assert re.search(r"WordBusNumber \(ResourceProducer,", dsdt)
    assert re.search(r"0xE0100000,\s+// Range Minimum", dsdt), dsdt  # the 32-bit window
    assert re.search(r"QWordMemory \(ResourceProducer,", dsdt)
    # _PRT: slot 1 INTA on GSI 10 (PIRQA), slot 1 INTB on 10, slot 1 INTC on 11 ...
    prt = dsdt[dsdt.index("Name (_PRT"):]
    first = re.findall(r"Package \(0x04\)\s+\{\s+(0x[0-9A-F]+|Zero|One),\s+"
                       r"(0x[0-9A-F]+|Zero|One),\s+(Zero),\s+(0x[0-9A-F]+)", prt)
    assert first[:3] == [("0x0001FFFF", "Zero", "Zero", "0x0A"),
                         ("0x0001FFFF", "One", "Zero", "0x0A"),
                         ("0x0001FFFF", "0x02", "Zero", "0x0B")], first[:3]
    assert len(first) == 31 * 4
