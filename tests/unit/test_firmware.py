"""The firmware side without KVM: the ACPI table loader run by an interpreter written
from SeaBIOS's description of it (fw/romfile_loader.h), the shadow-RAM slots each PAM
setting asks for, the BIOS's memory map, and the BIOS checks of the config readers."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from corevisor.arch.x86_64 import acpi, aml, layout
from corevisor.config.args import bios_partition_from_args
from corevisor.config.host import HostFacts
from corevisor.errors import ConfigError
from corevisor.firmware import acpi as loader
from corevisor.firmware.bios import Shadow, bios_e820
from corevisor.kvm.bindings import KVM_MEM_READONLY
from corevisor.memory import GuestMemory
from corevisor.pci.host import PAM0, HostBridge
from corevisor.spec import Transport

HOST = HostFacts(cores=2, affinity=frozenset({0, 1}), mem_available=1 << 30)


def _run_loader(files: dict[str, bytes], where: dict[int, int]) -> dict[str, bytearray]:
    """Execute etc/table-loader: allocate each file at the address its zone gets here,
    patch pointers, fix checksums; return the files as placed."""
    placed: dict[str, bytearray] = {}
    at: dict[str, int] = {}
    cmds = files[loader.LOADER_FILE]
    assert len(cmds) % 128 == 0
    for i in range(0, len(cmds), 128):
        c = cmds[i : i + 128]
        kind = struct.unpack_from("<I", c)[0]

        def name(off: int, c: bytes = c) -> str:
            return c[off : off + 56].split(b"\0")[0].decode()

        if kind == 1:
            file, (align, zone) = name(4), struct.unpack_from("<IB", c, 60)
            assert where[zone] % align == 0
            placed[file], at[file] = bytearray(files[file]), where[zone]
        elif kind == 2:
            dest, src = name(4), name(60)
            offset, size = struct.unpack_from("<IB", c, 116)
            value = int.from_bytes(placed[dest][offset : offset + size], "little") + at[src]
            placed[dest][offset : offset + size] = value.to_bytes(size, "little")
        elif kind == 3:
            file = name(4)
            offset, start, length = struct.unpack_from("<III", c, 60)
            region = placed[file][start : start + length]
            placed[file][offset] = (placed[file][offset] - sum(region)) & 0xFF
        else:
            raise AssertionError(f"unknown loader command {kind}")
    return placed


def test_the_table_loader_installs_consistent_tables() -> None:
    host = aml.PciHost(layout.PCI_CONFIG_PORT, (0xC000, 0x10000), (0xE010_0000, 0xFEC0_0000),
                       (1 << 32, 2 << 32), (layout.PCI_ECAM_START, 1 << 20), ((1, 0, 10),))
    files = loader.loader_files(acpi.build_acpi_tables(2, (), host))
    high, fseg = 0x3FF0_0000, 0xF5000
    placed = _run_loader(files, {loader.ZONE_HIGH: high, loader.ZONE_FSEG: fseg})
    rsdp = bytes(placed[loader.RSDP_FILE])
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    blob = bytes(placed[loader.TABLES_FILE])

    def table(addr: int) -> bytes:
        off = addr - high
        assert 0 <= off < len(blob)
        return blob[off : off + struct.unpack_from("<I", blob, off + 4)[0]]

    xsdt = table(struct.unpack_from("<Q", rsdp, 24)[0])
    found = {}
    for i in range((len(xsdt) - 36) // 8):
        t = table(struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0])
        found[t[:4]] = t
    assert set(found) == {b"FACP", b"APIC", b"MCFG"}
    fadt = found[b"FACP"]
    dsdt = table(struct.unpack_from("<I", fadt, 40)[0])
    assert dsdt[:4] == b"DSDT"
    assert struct.unpack_from("<Q", fadt, 140)[0] == struct.unpack_from("<I", fadt, 40)[0]
    facs = struct.unpack_from("<I", fadt, 36)[0]
    assert blob[facs - high : facs - high + 4] == b"FACS" and facs % 64 == 0
    for t in (xsdt, dsdt, *found.values()):
        assert sum(t) % 256 == 0, t[:4]


class _Vm:
    """Records KVM_SET_USER_MEMORY_REGION calls: the one ioctl Shadow makes."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int, int]] = {}

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host: int,
                               flags: int = 0) -> None:
        if size:
            self.slots[slot] = (gpa, size, host, flags)
        else:
            self.slots.pop(slot, None)


class _Rom:
    size = 256 << 10
    host_address = 0x7000_0000


def test_shadow_follows_the_pam_registers() -> None:
    vm = _Vm()
    ram = 0x1000_0000
    shadow = Shadow(vm, _Rom(), ram, list(range(25, 40)))  # type: ignore[arg-type]
    bridge = HostBridge()
    shadow.apply(bridge.pam())  # reset: reads from the ROM alias above 0xE0000 only
    rom_low = _Rom.host_address + _Rom.size - 0x100000
    assert sorted(vm.slots.values()) == [(0xE0000, 0x20000, rom_low + 0xE0000, KVM_MEM_READONLY)]
    bridge.on_pam = shadow.apply
    for i in range(1, 7):  # what SeaBIOS's make_bios_writable does
        bridge.write(PAM0 + i, 1, 0x33)
    bridge.write(PAM0, 1, 0x30)
    assert sorted(vm.slots.values()) == [(0xC0000, 0x40000, ram + 0xC0000, 0)]
    bridge.write(PAM0, 1, 0x10)  # make_bios_readonly: 0xF0000 read-only RAM
    assert sorted(vm.slots.values()) == [(0xC0000, 0x30000, ram + 0xC0000, 0),
                                         (0xF0000, 0x10000, ram + 0xF0000, KVM_MEM_READONLY)]
    assert len(vm.slots) == len(shadow.mapped()) == 2


def test_the_bios_memory_map_is_qemus() -> None:
    mem = GuestMemory.anonymous(layout.ram_layout(5 << 30))
    try:
        e820 = [(e.addr, e.size, e.type) for e in bios_e820(mem, ((0xE000_0000, 1 << 20),))]
    finally:
        mem.close()
    assert e820 == [(0, 3 << 30, 1), (0xE000_0000, 1 << 20, 2), (4 << 30, 2 << 30, 1)]


def test_bios_options_are_checked(tmp_path: Path) -> None:
    bios = tmp_path / "bios.bin"
    bios.write_bytes(bytes(128 << 10))
    part = bios_partition_from_args(str(bios), host=HOST)
    assert part.bios == bios and part.image is None and part.virtio.transport is Transport.PCI
    assert part.pci
    bios.write_bytes(bytes(100))
    with pytest.raises(ConfigError, match="--bios: .* is 100 bytes; a BIOS image is a multiple"):
        bios_partition_from_args(str(bios), host=HOST)
    with pytest.raises(ConfigError, match="--bios: .*nothing.bin does not exist"):
        bios_partition_from_args(str(tmp_path / "nothing.bin"), host=HOST)
    bios.write_bytes(bytes(128 << 10))
    with pytest.raises(ConfigError, match='--transport: a partition with a bios has its devices'):
        bios_partition_from_args(str(bios), transport="mmio", host=HOST)


def test_a_system_file_with_a_bios(tmp_path: Path) -> None:
    from corevisor.config.toml import load_config

    (tmp_path / "bios.bin").write_bytes(bytes(256 << 10))
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    (tmp_path / "s.toml").write_text(
        '[partitions.legacy]\nbios = "bios.bin"\nblk = [{path = "disk.img"}]\n')
    part = load_config(tmp_path / "s.toml", host=HOST).partitions[0]
    assert part.bios == tmp_path / "bios.bin" and part.virtio.transport is Transport.PCI
    (tmp_path / "s.toml").write_text('[partitions.legacy]\nbios = "bios.bin"\ncmdline = "x"\n')
    with pytest.raises(ConfigError, match="partitions.legacy.cmdline: a partition with a bios"):
        load_config(tmp_path / "s.toml", host=HOST)
