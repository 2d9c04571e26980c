"""virtio-mmio on real KVM: a tiny guest drives virtio-rng through its registers.

The guest (32-bit PVH entry, hand-assembled) negotiates VERSION_1, configures queue 0
on rings the test laid out in its RAM, sets DRIVER_OK and kicks the queue; then it
polls the used ring and exits with 42 once the device has filled its buffer. The kick
must travel by ioeventfd (the transport never sees a QueueNotify write) and the
completion by irqfd (the interrupt count goes up), with the device's work on its I/O
thread.
"""

from __future__ import annotations

import struct
from pathlib import Path

from corevisor.arch.x86_64 import layout
from corevisor.builder import build
from corevisor.spec import BlkSpec, PartitionSpec, SerialSpec, VirtioSpec
from corevisor.virtio.mmio import REG, VirtioMmio
from tests.kvm.images import pvh_elf

BASE = 0xC000_0000
DESC, AVAIL, USED, BUF = 0x10000, 0x10100, 0x10200, 0x11000


def _mov_mmio(reg: int, value: int) -> bytes:
    return b"\xc7\x05" + struct.pack("<II", BASE + reg, value)  # mov dword [abs], imm32


def _driver_code() -> bytes:
    code = b""
    for reg, value in (
        (REG.STATUS, 0),
        (REG.STATUS, 1),
        (REG.STATUS, 3),
        (REG.DRIVER_FEATURES_SEL, 1),
        (REG.DRIVER_FEATURES, 1),  # VIRTIO_F_VERSION_1 (bit 32)
        (REG.DRIVER_FEATURES_SEL, 0),
        (REG.DRIVER_FEATURES, 0),
        (REG.STATUS, 0xB),
        (REG.QUEUE_SEL, 0),
        (REG.QUEUE_NUM, 4),
        (REG.QUEUE_DESC_LOW, DESC),
        (REG.QUEUE_DRIVER_LOW, AVAIL),
        (REG.QUEUE_DEVICE_LOW, USED),
        (REG.QUEUE_READY, 1),
        (REG.STATUS, 0xF),
        (REG.QUEUE_NOTIFY, 0),
    ):
        code += _mov_mmio(reg, value)
    code += b"\xb9" + struct.pack("<I", 2_000_000)  # mov ecx, bound
    loop = len(code)
    code += b"\x0f\xb7\x05" + struct.pack("<I", USED + 2)  # movzx eax, word [used.idx]
    code += b"\x83\xf8\x01"  # cmp eax, 1
    code += b"\x74\x05"  # je done (skip dec/jnz/jmp: 1 + 2 + 2)
    code += b"\x49"  # dec ecx
    rel = loop - (len(code) + 2)
    code += b"\x75" + struct.pack("<b", rel)  # jnz loop
    code += b"\xeb\x05"  # jmp fail
    code += b"\xb0\x2a\xe6\xf4\xf4"  # done: mov al, 42; out 0xf4, al; hlt
    code += b"\xb0\x01\xe6\xf4\xf4"  # fail: mov al, 1; out 0xf4, al; hlt
    return code


def test_guest_drives_virtio_rng_by_ioeventfd_and_irqfd(tmp_path: Path) -> None:
    img = tmp_path / "rng.elf"
    img.write_bytes(pvh_elf(_driver_code()))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    cfg = PartitionSpec(
        name="vio",
        image=img,
        memory=16 << 20,
        serial=SerialSpec.file(tmp_path / "serial.log"),
        cmdline="console=hvc0",
        virtio=VirtioSpec(blk=(BlkSpec(disk),), rng=True),
    )
    with build(cfg) as m:
        rng = m.devices["virtio-rng"]
        assert isinstance(rng, VirtioMmio)
        # Slot order: blk first (BASE, GSI 5), then rng (BASE + 0x1000, GSI 6).
        assert [mp.base for mp in m.mmio.mappings() if mp.name.startswith("virtio")] == [
            BASE,
            BASE + 0x1000,
        ]
        cmdline = m.memory.read(layout.CMDLINE_ADDR, 200).split(b"\0")[0]
        assert cmdline == (
            b"console=hvc0 virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6"
        )
    # Now a machine with rng alone, at BASE, which the guest drives.
    cfg = PartitionSpec(
        name="vio",
        image=img,
        memory=16 << 20,
        serial=SerialSpec.file(tmp_path / "serial.log"),
        virtio=VirtioSpec(rng=True),
    )
    with build(cfg) as m:
        rng = m.devices["virtio-rng"]
        assert isinstance(rng, VirtioMmio)
        m.memory.write(DESC, struct.pack("<QIHH", BUF, 16, 2, 0))  # one WRITE buffer
        m.memory.write(AVAIL, struct.pack("<HHH", 0, 1, 0))  # flags, idx = 1, ring[0] = 0
        notify_writes: list[bytes] = []
        real_write = rng.write

        def spy(offset: int, data: bytes) -> None:
            if offset == REG.QUEUE_NOTIFY:
                notify_writes.append(data)
            real_write(offset, data)

        rng.write = spy  # type: ignore[method-assign]
        report = m.run(timeout=60)
        assert report.kind == "exit" and report.code == 42, report
        assert m.memory.read_u16(USED + 2) == 1
        assert struct.unpack("<II", m.memory.read(USED + 4, 8)) == (0, 16)
        assert m.memory.read(BUF, 16) != bytes(16)
        assert notify_writes == [], "the kick went through the vCPU, not the ioeventfd"
        assert rng.interrupt.count >= 1
