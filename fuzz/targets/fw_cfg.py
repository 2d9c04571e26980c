"""QEMU's fw_cfg device (devices/fw_cfg.py) as a guest drives it: selector writes, data
reads, and DMA transfers whose FWCfgDmaAccess descriptors and buffers live in 2 MiB of
guest RAM the fuzzer writes (descriptors at the edge of RAM, lengths up to 4 GiB,
select/read/skip/write control bits), over the items a machine offers plus a file item
read on demand (firmware/fw_cfg.py's FileSlice on a real file).

Nothing may raise; reads return the size asked for; the state survives save/restore.
"""

from __future__ import annotations

import functools
import struct
import tempfile
from pathlib import Path
from typing import Any

from corevisor.devices.fw_cfg import FwCfg
from fuzz.common import Cursor, guest_memory

RAM = 2 << 20
_DESC = 0x1000
_DESCS = (_DESC, _DESC + 16, RAM - 16, RAM - 8, RAM, 0, 0xFFFFFFFFFFFFFFF0)
_KEYS = (0x00, 0x01, 0x03, 0x05, 0x19, 0x20, 0x21, 0x8000, 0x8003, 0xFFFF, 0x4021)


@functools.cache
def _device() -> tuple[FwCfg, Any]:
    from corevisor.firmware.fw_cfg import FileSlice, machine_files, machine_items

    mem = guest_memory(RAM)
    path = Path(tempfile.mkdtemp(prefix="corevisor-fuzz-fwcfg-")) / "kernel"
    path.write_bytes(bytes(range(256)) * 40)
    blob = FileSlice(path, 100, 5000)
    dev = FwCfg(mem, machine_items(2, mem), {**machine_files(mem), "opt/kernel": blob})
    return dev, blob


def one_input(data: bytes) -> None:
    dev, _ = _device()
    mem = guest_memory(RAM)
    c = Cursor(data)
    mem.fill(0, 0x3000)
    mem.write(_DESC, c.take(c.u(1) % 65))  # up to four descriptors, a little beyond
    while c.left:
        op = c.u(1) % 6
        if op == 0:
            dev.write(0, struct.pack("<H", c.pick(_KEYS) if c.u(1) & 1 else c.u(2)))
        elif op == 1:
            got = dev.read(c.u(1) % 13, c.pick((1, 1, 2, 4, 8)))
            assert isinstance(got, bytes)
        elif op == 2:
            desc = c.pick(_DESCS)
            dev.write(4, struct.pack(">I", desc >> 32))
            dev.write(8, struct.pack(">I", desc & 0xFFFFFFFF))
        elif op == 3:
            dev.write(4, struct.pack(">Q", c.pick(_DESCS)))
        elif op == 4:
            control = c.u(4)
            length = c.pick((0, 1, 16, 4096, 0x10000, 0xFFFFFFFF, c.u(4)))
            address = c.pick((0x2000, RAM - 4, RAM, 0x1008, c.u(8)))
            mem.write(_DESC, struct.pack(">IIQ", control, length, address))
            dev.write(4, struct.pack(">Q", _DESC))
        else:
            dev.write(c.u(1) % 13, c.take(c.pick((1, 2, 4, 8))))
        for offset, size in ((0, 1), (4, 4), (11, 1), (12, 1)):
            assert len(dev.read(offset, size)) == size
    state = dev.save()
    dev.restore(state)
    assert dev.save() == state
