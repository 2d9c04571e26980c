"""A BIOS as the machine's firmware: its ROM, the shadow RAM under it, what it is told.

A PC's BIOS is a ROM at the top of the 32-bit address space, where the CPU's reset vector
(0xFFFFFFF0) is; its last 128 KiB also appear at 0xE0000-0xFFFFF, where real-mode code
and the BIOS's own tables live (layout.BIOS_LOW_START). Everything here serves one
BIOS, Debian's SeaBIOS (package seabios), booting as it does under QEMU's ``-M pc``:

- BiosRom: the image in a private host mapping, given to KVM as a read-only memory slot
  at 4 GiB - size (KVM_MEM_READONLY: a guest write exits as MMIO to no device, and is
  dropped as a ROM drops it).
- Shadow: 0xC0000-0xFFFFF, whose every 16 KiB (64 KiB at 0xF0000) the host bridge's PAM
  registers (pci/host.py) switch between the ROM side and the RAM underneath: reads
  from RAM or not, writes to RAM or not. SeaBIOS starts on the ROM, turns the RAM on
  (copying itself there: fw/shadow.c), runs from RAM and write-protects it at the end of
  POST. Each PAM change maps the segments again as KVM slots: RAM read-write, RAM
  read-only, the ROM alias (only 0xE0000 up has one) or nothing (reads as all ones). A
  write-only segment (mode 2, unused by SeaBIOS) is approximated as read-write RAM.
  The shadow RAM is the guest's RAM at those addresses, so snapshots carry it.
- what it reads through fw_cfg (fw_cfg_files): the memory map as QEMU gives it (RAM from
  0 to the hole, the rest above 4 GiB, the ECAM window reserved), the ACPI tables as
  table-loader files (acpi.py), and an empty boot order; and two CMOS bytes a QEMU PC
  has, "hard disk first" and "no floppy signature check" (fw/boot.c).

SeaBIOS prints to COM1 through its serial console (fw_cfg NOGRAPHIC=1 and no VGA ROM:
fw/paravirt.c turns on ``etc/sercon-port``), builds its own MP and SMBIOS tables, and
boots the first virtio-blk-pci disk. The CPU starts at the reset vector in real mode
(cpu.setup_reset_vector); the VMM writes nothing into guest RAM.

What does not live here: the PAM registers (pci/host.py), the fw_cfg device
(devices/fw_cfg.py), the ACPI tables (arch/x86_64/acpi.py), the memory map constants
(layout.py).
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Sequence
from pathlib import Path

from corevisor.arch.x86_64 import layout
from corevisor.arch.x86_64.bootparams import E820_RAM, E820_RESERVED, E820Entry
from corevisor.devices import Device
from corevisor.errors import ConfigError
from corevisor.kvm.bindings import KVM_MEM_READONLY
from corevisor.kvm.ioctls import VmFd
from corevisor.memory import GuestMemory
from corevisor.pci.host import pam_segments

__all__ = ["BiosRom", "Shadow", "bios_e820", "preset_cmos", "CMOS_DEFAULTS"]

# CMOS bytes of a QEMU PC booting from its disk (hw/i386/pc.c): 0x3D boot devices (2 =
# hard disk first), 0x38 bit 0 (no floppy boot-signature check).
CMOS_DEFAULTS = {0x3D: 0x02, 0x38: 0x01}
_PAM_READ, _PAM_WRITE = 1, 2


class BiosRom:
    """A BIOS image held in host memory for a read-only memory slot below 4 GiB."""

    def __init__(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"bios: cannot read {path}: {e.strerror or e}") from None
        if len(data) % layout.BIOS_MIN_SIZE or not len(data) <= layout.BIOS_MAX_SIZE:
            raise ConfigError(f"bios: {path} is {len(data)} bytes, not a BIOS image")
        self.path = path
        self.size = len(data)
        self.base = layout.MMIO_HOLE_END - self.size
        self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map[:] = data
        buf = (ctypes.c_char * self.size).from_buffer(self._map)
        self.host_address = ctypes.addressof(buf)
        del buf  # the address stays valid as long as the mapping does

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._map[offset : offset + size])

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()


class Shadow:
    """0xC0000-0xFFFFF of a machine with a BIOS, mapped as its PAM bytes say.

    slots: the KVM memory slots it may use (resources.FIRMWARE_SLOTS, less the ROM's);
    ram_host: the host address of guest-physical 0 (the low RAM region).
    """

    def __init__(self, vm: VmFd, rom: BiosRom, ram_host: int, slots: Sequence[int]) -> None:
        self._vm = vm
        self._rom = rom
        self._ram_host = ram_host
        self._free = list(slots)
        self._mapped: dict[tuple[int, int, int, int], int] = {}  # (gpa, size, host, flags)
        self._lock = threading.Lock()

    def _source(self, start: int, mode: int) -> tuple[int, int] | None:
        """(host address, flags) of what a segment in mode shows at start, or None."""
        if mode & _PAM_WRITE:
            return self._ram_host + start, 0  # read-write RAM (mode 2 approximated)
        if mode & _PAM_READ:
            return self._ram_host + start, KVM_MEM_READONLY
        if start >= layout.BIOS_LOW_START:  # the ROM's last 128 KiB end at 1 MiB too
            offset = self._rom.size - layout.HIGH_MEMORY_START + start
            return self._rom.host_address + offset, KVM_MEM_READONLY
        return None

    def runs(self, pam: bytes) -> list[tuple[int, int, int, int]]:
        """The slots the PAM bytes ask for: (gpa, size, host address, flags), merged."""
        out: list[tuple[int, int, int, int]] = []
        for start, end, mode in pam_segments(pam):
            src = self._source(start, mode)
            if src is None:
                continue
            host, flags = src
            if out:
                gpa, size, h, f = out[-1]
                if gpa + size == start and h + size == host and f == flags:
                    out[-1] = (gpa, size + end - start, h, f)
                    continue
            out.append((start, end - start, host, flags))
        return out

    def apply(self, pam: bytes) -> None:
        """Map 0xC0000-0xFFFFF as pam says: drop the slots that changed, add the new ones."""
        want = set(self.runs(pam))
        with self._lock:
            for key in [k for k in self._mapped if k not in want]:
                slot = self._mapped.pop(key)
                self._vm.set_user_memory_region(slot, key[0], 0, key[2], key[3])
                self._free.append(slot)
            for key in sorted(want - set(self._mapped)):
                slot = self._free.pop(0)
                gpa, size, host, flags = key
                self._vm.set_user_memory_region(slot, gpa, size, host, flags)
                self._mapped[key] = slot

    def mapped(self) -> list[tuple[int, int, int, int]]:
        with self._lock:
            return sorted(self._mapped)


def bios_e820(mem: GuestMemory, reserved: Sequence[tuple[int, int]] = ()) -> list[E820Entry]:
    """The memory map a BIOS gets (etc/e820), as QEMU gives it: all RAM below the hole as
    one range from 0 (the BIOS reserves its own areas in what it gives the OS), RAM above
    4 GiB, and the reserved ranges (the ECAM window)."""
    entries = [E820Entry(r.gpa, r.size, E820_RAM) for r in mem.regions
               if r.gpa == 0 or r.gpa >= layout.MMIO_HOLE_END]
    entries += [E820Entry(addr, size, E820_RESERVED) for addr, size in reserved]
    return sorted(entries, key=lambda e: e.addr)


def preset_cmos(rtc: Device, values: dict[int, int]) -> None:
    """Write CMOS bytes through the RTC's index/data ports, as firmware setup would."""
    for index, value in values.items():
        rtc.write(0, bytes([index]))
        rtc.write(1, bytes([value]))
