"""`corevisor run IMAGE --cpus ... --memory ...`: the options of one partition, read into a
validated PartitionSpec.

The same readers (parse.py, files.py) and the same checks (validate.py) as a system
file, so an option fails as its key would, only named by the option::

    --memory: 1M is less than the 2M minimum

Paths stay relative to the working directory, as a user typing them expects. What
does not live here: argparse itself and which options go with a system file (cli.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from corevisor.config import files
from corevisor.config.host import HostFacts, gather
from corevisor.config.parse import (
    NAME_RE,
    parse_cpu_list,
    parse_gdb,
    parse_path,
    parse_pci_address,
    parse_serial,
    parse_size,
)
from corevisor.config.validate import CLI_KEYS, validate_partition
from corevisor.errors import ConfigError, quote, show
from corevisor.spec import (
    NAME_PATTERN,
    BlkSpec,
    DeviceSpec,
    NetSpec,
    PartitionSpec,
    PciAddress,
    Transport,
    VirtioSpec,
)
from corevisor.virtio.config import check_image, check_tap

__all__ = ["partition_from_args", "bios_partition_from_args", "name_from_image",
           "virtio_from_args", "devices_from_args"]


def name_from_image(image: str) -> str:
    """A valid partition name derived from an image file name (hello.elf -> hello)."""
    stem = re.sub(r"[^a-z0-9_-]+", "-", Path(image).stem.lower()).strip("-_")
    if not stem or not stem[0].isalpha():
        stem = "vm-" + stem if stem else "vm"
    return stem[:32].rstrip("-_") or "vm"


def virtio_from_args(
    disks: list[str] | None = None,
    nets: list[str] | None = None,
    rng: bool = False,
    transport: str | None = None,
    default: Transport = Transport.MMIO,
) -> VirtioSpec:
    """The devices of `corevisor run --disk PATH[,ro] --net TAP --rng --transport T`."""
    blks = []
    for spec in disks or []:
        text, sep, opt = spec.rpartition(",")
        if not sep or opt not in ("ro", "rw"):
            text, opt = spec, "rw"
        path = parse_path(text, "--disk", None)
        check_image(path, "--disk", show(text))
        blks.append(BlkSpec(path, opt == "ro"))
    taps = tuple(NetSpec(check_tap(t, "--net")) for t in nets or [])
    chosen = default
    if transport is not None:
        try:
            chosen = Transport(transport)
        except ValueError:
            known = " | ".join(str(t) for t in Transport)
            raise ConfigError(f"--transport: {quote(transport)} is not one of {known}") from None
    return VirtioSpec(tuple(blks), taps, rng, False, chosen)


def vfio_from_args(addresses: list[str] | None) -> tuple[PciAddress, ...]:
    """`--vfio DOMAIN:BUS:DEV.FN` (repeatable): the host PCI devices to pass through."""
    out: list[PciAddress] = []
    for text in addresses or []:
        address = parse_pci_address(text, "--vfio")
        if address in out:
            raise ConfigError(f"--vfio: {address} is given twice")
        out.append(address)
    return tuple(out)


def bios_partition_from_args(
    bios: str,
    *,
    cpus: int = 1,
    memory: str = "64M",
    pin: str | None = None,
    serial: str = "stdout",
    name: str | None = None,
    gdb: str | None = None,
    gdb_attach: bool = False,
    gdb_allow_remote: bool = False,
    disks: list[str] | None = None,
    nets: list[str] | None = None,
    rng: bool = False,
    transport: str | None = None,
    devices: list[str] | None = None,
    vfio: list[str] | None = None,
    host: HostFacts | None = None,
) -> PartitionSpec:
    """`corevisor run --bios [PATH] --disk IMG`: a machine that boots its disk through
    its BIOS; errors name the option."""
    if name is not None and NAME_RE.fullmatch(name) is None:
        raise ConfigError(f"--name: bad partition name {quote(name)} (use {NAME_PATTERN})")
    path = parse_path(bios, "--bios", None)
    files.check_bios(path, "--bios", bios)
    virtio = virtio_from_args(disks, nets, rng, transport, default=Transport.PCI)
    part = PartitionSpec(
        name=name if name is not None else "bios",
        bios=path,
        cpus=cpus,
        memory=parse_size(memory, "--memory"),
        pin=parse_cpu_list(pin, "--pin") if pin is not None else (),
        serial=parse_serial(serial, "--serial", None),
        gdb=parse_gdb(gdb, "--gdb") if gdb is not None else None,
        gdb_attach=gdb_attach,
        virtio=virtio,
        devices=devices_from_args(devices),
        vfio=vfio_from_args(vfio),
    )
    validate_partition(
        part, CLI_KEYS, host if host is not None else gather(), gdb_allow_remote=gdb_allow_remote
    )
    return part


def devices_from_args(options: list[str] | None) -> tuple[DeviceSpec, ...]:
    """The user devices of `corevisor run --device CLASS[,KEY=VALUE...]` (userdev/load.py)."""
    if not options:
        return ()
    from corevisor.userdev.load import device_from_option  # only runs that name devices

    return tuple(device_from_option(text) for text in options)


def partition_from_args(
    image: str,
    *,
    cpus: int = 1,
    memory: str = "64M",
    pin: str | None = None,
    cmdline: str = "",
    serial: str = "stdout",
    name: str | None = None,
    initrd: str | None = None,
    gdb: str | None = None,
    gdb_attach: bool = False,
    gdb_allow_remote: bool = False,
    disks: list[str] | None = None,
    nets: list[str] | None = None,
    rng: bool = False,
    modules: list[str] | None = None,
    transport: str | None = None,
    devices: list[str] | None = None,
    vfio: list[str] | None = None,
    host: HostFacts | None = None,
) -> PartitionSpec:
    """Build and validate one partition from `corevisor run` options; errors name the
    option (--memory). host: the host to check against (default: this one, now)."""
    if name is not None and NAME_RE.fullmatch(name) is None:
        raise ConfigError(f"--name: bad partition name {quote(name)} (use {NAME_PATTERN})")
    image_path = parse_path(image, "image", None)
    kind = files.check_guest_image(image_path, "image", image)
    initrd_path, module_specs = files.boot_files(
        kind, initrd, modules or [], ("--initrd", "--module"), None
    )
    part = PartitionSpec(
        name=name if name is not None else name_from_image(image),
        image=image_path,
        cpus=cpus,
        memory=parse_size(memory, "--memory"),
        pin=parse_cpu_list(pin, "--pin") if pin is not None else (),
        cmdline=cmdline,
        serial=parse_serial(serial, "--serial", None),
        initrd=initrd_path,
        modules=module_specs,
        gdb=parse_gdb(gdb, "--gdb") if gdb is not None else None,
        gdb_attach=gdb_attach,
        virtio=virtio_from_args(disks, nets, rng, transport),
        devices=devices_from_args(devices),
        vfio=vfio_from_args(vfio),
    )
    validate_partition(
        part, CLI_KEYS, host if host is not None else gather(), gdb_allow_remote=gdb_allow_remote
    )
    return part
