"""The fuzz targets by name: each module has ``one_input(data: bytes) -> None``.

``KVM`` names the targets that need /dev/kvm (a real machine behind them).
"""

TARGETS = (
    "elf",
    "bzimage",
    "system_file",
    "gdb_protocol",
    "gdb_server",
    "virtqueue",
    "virtio_mmio",
    "virtio_pci",
    "uart",
    "rtc",
    "i8042",
    "ports",
    "fw_cfg",
)
KVM = ("gdb_server",)
