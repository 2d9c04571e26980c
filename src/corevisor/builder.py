"""build(config): the recipe that turns a PartitionConfig into a ready, unstarted Machine.

Read it top to bottom: create VM -> memory -> irqchip -> exit policy -> vCPUs ->
devices -> hypercalls -> virtio devices -> load the image -> boot tables -> boot
registers -> channels.
Each step is an attach_* function, so a later restore path (and a system restarting a
partition) can reuse the same steps. What a partition gets from the system around it
(its channel ends, a serial backend that outlives restarts, its watchdog) comes in as
PartitionLinks; a lone machine gets the defaults.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corevisor.arch.x86_64 import cpu, layout
from corevisor.arch.x86_64.acpi import write_acpi_tables
from corevisor.arch.x86_64.bootparams import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    write_multiboot_info,
    write_pvh_boot_info,
    write_zero_page,
)
from corevisor.arch.x86_64.mptable import write_mptable
from corevisor.bus import Bus
from corevisor.channel import DOORBELL_PORT, ChannelEnd, DoorbellPort, ReadOnlyGuard
from corevisor.config import PartitionConfig
from corevisor.console import SerialBackend, open_serial
from corevisor.devices import Device
from corevisor.devices.debug_exit import DebugExit
from corevisor.devices.i8042 import I8042
from corevisor.devices.postcode import PostCode
from corevisor.devices.rtc import Rtc
from corevisor.devices.uart16550 import Uart16550
from corevisor.errors import ConfigError, KvmError
from corevisor.hypercall import HYPERCALL_PORT, HypercallHost, Hypercalls, handler_table
from corevisor.kvm.bindings import (
    KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
    KVM_X86_DISABLE_EXITS_HLT,
    KVM_X86_DISABLE_EXITS_PAUSE,
    Cap,
)
from corevisor.kvm.ioctls import Kvm
from corevisor.loader import Initrd, LoadedImage, load_image, load_initrd
from corevisor.machine import Machine
from corevisor.memory import GuestMemory, MemoryRegion
from corevisor.outputs import report_to_stderr
from corevisor.vcpu import Vcpu

if TYPE_CHECKING:  # the virtio stack is imported only by partitions that have devices
    from corevisor.virtio.attach import VirtioSlot

REQUIRED_CAPS = (Cap.IRQCHIP, Cap.USER_MEMORY, Cap.IMMEDIATE_EXIT, Cap.PIT2, Cap.MP_STATE)
# KVM memory slots: RAM takes 0 and 1 (below and above the MMIO hole), channels 16 + index.
CHANNEL_SLOT_BASE = 16


def _no_watchdog(ms: int) -> None:
    """A lone machine's watchdog: nothing watches it."""


@dataclass(frozen=True)
class PartitionLinks:
    """What a partition gets from the system it runs in (defaults: a lone machine)."""

    index: int = 0  # partition id (config order), for HC_PARTITION_INFO
    channels: tuple[ChannelEnd, ...] = ()
    # A serial backend owned by the caller, so it outlives a restart; None opens
    # config.serial for this machine alone.
    serial: SerialBackend | None = None
    watchdog: Callable[[int], None] = field(default=_no_watchdog)  # HC_WATCHDOG's ms
    report: Callable[[str, str], None] = field(default=report_to_stderr)  # (name, event)


def build(
    config: PartitionConfig, kvm_path: str = "/dev/kvm", links: PartitionLinks | None = None
) -> Machine:
    """Assemble a Machine for config; the caller starts it with run()."""
    links = links if links is not None else PartitionLinks()
    kvm = Kvm(kvm_path)
    try:
        _check_host(kvm, config)
        vm = kvm.create_vm()
    except BaseException:
        kvm.close()
        raise
    memory = GuestMemory.anonymous(layout.ram_layout(config.memory), name=f"{config.name}-ram")
    m = Machine(config.name, kvm, vm, memory, Bus("pio", dense=True), Bus("mmio", dense=False))
    try:
        attach_memory(m)
        attach_irqchip(m)
        attach_exit_policy(m, config)
        attach_vcpus(m, config)
        serial = attach_legacy_devices(m, config, links.serial, links.report)
        attach_hypercalls(m, config, links, serial)
        virtio = attach_virtio_devices(m, config, links, serial)
        image = load_image(m.memory, config.image)
        initrd = load_initrd(m.memory, config.initrd, image) if config.initrd else None
        rsdp = attach_boot_tables(m, config, virtio)
        boot_bsp(m, image, _with_virtio_devices(config.cmdline, virtio), rsdp, initrd)
        attach_channels(m, links)
        if config.gdb is not None:
            attach_debugger(m, config, links)
    except BaseException:
        m.close()
        raise
    return m


def attach_debugger(m: Machine, config: PartitionConfig, links: PartitionLinks) -> None:
    """Last step: a GDB stub on config.gdb; the vCPUs stay parked until GDB continues
    (or, with gdb_attach, run until GDB connects). docs/debugging.md shows a session."""
    from corevisor.gdb.server import attach_gdb  # only partitions that ask pay for it

    assert config.gdb is not None
    attach_gdb(
        m, config.gdb, wait=not config.gdb_attach, report=lambda msg: links.report(m.name, msg)
    )


def _check_host(kvm: Kvm, config: PartitionConfig) -> None:
    for cap in REQUIRED_CAPS:
        if not kvm.check_extension(cap):
            raise KvmError(
                "KVM_CHECK_EXTENSION", errno.EOPNOTSUPP, f"this host's KVM lacks KVM_CAP_{cap.name}"
            )
    limit = kvm.max_vcpus()
    if config.cpus > limit:
        raise ConfigError(f"{config.name}: {config.cpus} vCPUs, but this host's KVM allows {limit}")


def attach_memory(m: Machine) -> None:
    """Register every RAM region as a KVM memory slot."""
    for slot, region in enumerate(m.memory.regions):
        m.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address)


def attach_irqchip(m: Machine) -> None:
    """In-kernel PIC/IOAPIC/LAPIC and PIT: interrupts and timers never touch Python."""
    m.vm.set_tss_addr(0xFFFBD000)  # needed by VT-x for real mode; harmless elsewhere
    m.vm.create_irqchip()
    # KVM serves port 0x61 (PIT channel 2 gate and output, which guests calibrate their
    # clocks against) only with KVM_PIT_SPEAKER_DUMMY; without it the port read 0 here
    # and calibration loops spun until their bound.
    m.vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)


def attach_exit_policy(m: Machine, config: PartitionConfig) -> None:
    """HLT/PAUSE handling of a dedicated partition; KVM takes it only before any vCPU exists.

    "disabled": HLT and PAUSE stay in the guest (the vCPU keeps its core busy, wakes
    with no host scheduling); "halt-poll": a halted vCPU polls for config.halt_poll_ns
    before its thread sleeps. docs/partitioning.md measures both.
    """
    where = f"partitions.{config.name}.exits"
    if config.exits == "disabled":
        want = KVM_X86_DISABLE_EXITS_HLT | KVM_X86_DISABLE_EXITS_PAUSE
        have = m.vm.check_extension(Cap.X86_DISABLE_EXITS)
        if have & want != want:
            raise KvmError(
                "KVM_ENABLE_CAP",
                errno.EOPNOTSUPP,
                f'{where} = "disabled": this host\'s KVM cannot keep HLT and PAUSE in the '
                f"guest (KVM_CAP_X86_DISABLE_EXITS = {have:#x})",
            )
        m.vm.enable_cap(Cap.X86_DISABLE_EXITS, want)
    elif config.exits == "halt-poll":
        if not m.vm.check_extension(Cap.HALT_POLL):
            raise KvmError(
                "KVM_ENABLE_CAP",
                errno.EOPNOTSUPP,
                f'{where} = "halt-poll": this host\'s KVM lacks KVM_CAP_HALT_POLL',
            )
        m.vm.enable_cap(Cap.HALT_POLL, config.halt_poll_ns)


def attach_vcpus(m: Machine, config: PartitionConfig) -> None:
    """Create the vCPUs with CPUID, MSRs and FPU state; pin each to its host core."""
    supported = m.kvm.supported_cpuid()
    for i in range(config.cpus):
        fd = m.vm.create_vcpu(i)
        fd.set_cpuid2(cpu.vcpu_cpuid(supported, i, config.cpus, fd.get_tsc_khz()))
        fd.set_msrs(cpu.boot_msrs())
        cpu.setup_fpu(fd)
        core = None
        if config.pin:
            core = config.pin[i] if len(config.pin) > 1 else config.pin[0]
        m.vcpus.append(Vcpu(fd, m.pio, m.mmio, m.finish, host_core=core, memory=m.memory))


def attach_legacy_devices(
    m: Machine,
    config: PartitionConfig,
    serial: SerialBackend | None = None,
    report: Callable[[str, str], None] = report_to_stderr,
) -> SerialBackend:
    """The PC devices every bundled guest (and Linux) expects at their usual ports.

    Returns the serial backend (the hypercall console writes there too); one passed in
    belongs to the caller and is not closed with the machine. ``report`` hears of an
    output target that failed (outputs.py): the guest never does.
    """
    if serial is None:
        serial = open_serial(config.serial, config.name, report)
        m.closers.append(serial.close)
    vm = m.vm

    def com1_irq(level: bool) -> None:
        vm.irq_line(layout.COM1_IRQ, 1 if level else 0)

    uart = Uart16550(serial.write, com1_irq)
    serial.start_input(uart.enqueue_input)
    devices: dict[str, tuple[int, int, Device]] = {
        "com1": (layout.COM1_PORT, 8, uart),
        "i8042": (0x60, 5, I8042(m.guest_reset)),
        "rtc": (0x70, 2, Rtc()),
        "postcode": (0x80, 1, PostCode()),
        "debug-exit": (0xF4, 4, DebugExit(m.guest_exit)),
    }
    for name, (port, size, dev) in devices.items():
        m.pio.attach(port, size, dev, name)
        m.devices[name] = dev
    return serial


def attach_hypercalls(
    m: Machine, config: PartitionConfig, links: PartitionLinks, serial: SerialBackend
) -> None:
    """The paravirtual ports (docs/paravirt-abi.md): hypercalls at 0x500, doorbells at 0x504.

    Doorbells that match a channel never reach userspace (attach_channels wires them in
    the kernel); the DoorbellPort only counts the ones that match nothing.
    """
    host = HypercallHost(
        memory=m.memory,
        console=serial.write,
        partition_id=links.index,
        vcpus=config.cpus,
        channels=links.channels,
        watchdog=links.watchdog,
    )
    paravirt: dict[str, tuple[int, Device]] = {
        "hypercall": (HYPERCALL_PORT, Hypercalls(m.memory, handler_table(host))),
        "doorbell": (DOORBELL_PORT, DoorbellPort()),
    }
    for name, (port, dev) in paravirt.items():
        m.pio.attach(port, 4, dev, name)
        m.devices[name] = dev


def _with_virtio_devices(cmdline: str, slots: list[VirtioSlot]) -> str:
    """The command line plus Linux's virtio_mmio.device= entry for each device."""
    if not slots:
        return cmdline
    from corevisor.virtio.attach import cmdline as virtio_cmdline

    return virtio_cmdline(cmdline, slots)


def attach_virtio_devices(
    m: Machine, config: PartitionConfig, links: PartitionLinks, serial: SerialBackend
) -> list[VirtioSlot]:
    """virtio-mmio devices (virtio/attach.py): windows from 0xC000_0000, GSIs 5, 6, 7, ...,
    kicks by ioeventfd and interrupts by irqfd, each device served by its own I/O thread.
    Closed before the memory they address (closers run in reverse)."""
    if not config.virtio.count:
        return []
    from corevisor.virtio import attach as virtio_attach

    devices = virtio_attach.make_devices(config.virtio, config.name, serial.write)
    slots = virtio_attach.attach(
        m.vm, m.memory, m.mmio.attach, devices, lambda msg: links.report(m.name, msg)
    )
    for slot in slots:
        m.devices[slot.name] = slot.transport
        m.closers.append(slot.close)
    return slots


def attach_boot_tables(
    m: Machine, config: PartitionConfig, virtio: list[VirtioSlot] | None = None
) -> int:
    """Tables a guest reads to find its CPUs: boot GDT, MP table, ACPI; returns the RSDP."""
    cpu.write_boot_gdt(m.memory)
    # KVM's default GSI routing wires the PIT (IRQ0) to IOAPIC pin 0, not pin 2 as on PCs.
    write_mptable(m.memory, config.cpus, irq0_pin=0)
    windows = [(s.base, s.size, s.gsi) for s in virtio or ()]
    return write_acpi_tables(m.memory, config.cpus, windows)


def boot_bsp(
    m: Machine, image: LoadedImage, cmdline: str, rsdp: int, initrd: Initrd | None = None
) -> None:
    """Write the boot-information block for the image's protocol and set vCPU 0's entry.

    A bzImage enters at startup_64 in long mode with rsi = zero page (boot.rst's 64-bit
    protocol); PVH gets the initrd as its first module, which is where Linux looks.
    """
    bsp = m.vcpus[0].fd
    if image.kind == "bzimage":
        ramdisk = (initrd.gpa, initrd.size) if initrd else None
        rsi = write_zero_page(m.memory, image.boot_header, cmdline.encode(), rsdp, ramdisk)
        cpu.setup_long_mode(bsp, m.memory, image.entry, rsi=rsi)
    elif image.kind == "pvh":
        modules = [(initrd.gpa, initrd.size, b"")] if initrd else []
        ebx = write_pvh_boot_info(m.memory, cmdline.encode(), rsdp=rsdp, modules=modules)
        cpu.setup_protected_mode(bsp, m.memory, image.entry, eax=0, ebx=ebx)
    else:
        ebx = write_multiboot_info(m.memory, cmdline.encode())
        cpu.setup_protected_mode(
            bsp, m.memory, image.entry, eax=MULTIBOOT_BOOTLOADER_MAGIC, ebx=ebx
        )


def attach_channels(m: Machine, links: PartitionLinks) -> None:
    """Map each channel as an extra memory slot and wire its doorbells in the kernel.

    Runs after the boot tables on purpose: a channel is not RAM, so it must not be in
    the e820 map, and the image loader must not be able to place bytes in it. The
    reader of a one-way channel maps it KVM_MEM_READONLY (and read-only in GuestMemory,
    so devices acting for the guest cannot write it either); its writes exit as MMIO to
    a ReadOnlyGuard that refuses them.
    """
    if any(end.readonly for end in links.channels) and not m.vm.check_extension(Cap.READONLY_MEM):
        raise KvmError(
            "KVM_CHECK_EXTENSION",
            errno.EOPNOTSUPP,
            "one-way channels need KVM_CAP_READONLY_MEM, which this host's KVM lacks",
        )
    for end in links.channels:
        region = MemoryRegion(end.gpa, end.size, fd=os.dup(end.memfd), readonly=end.readonly)
        m.memory.add_region(region)
        flags = KVM_MEM_READONLY if end.readonly else 0
        slot = CHANNEL_SLOT_BASE + end.index
        m.vm.set_user_memory_region(slot, end.gpa, end.size, region.host_address, flags)
        if end.readonly:
            guard = ReadOnlyGuard(end.name, lambda msg: links.report(m.name, msg))
            m.mmio.attach(end.gpa, end.size, guard, f"channel-{end.name}")
            m.devices[f"channel-{end.name}"] = guard
        if end.ring_fd is not None:
            m.vm.ioeventfd(end.ring_fd, DOORBELL_PORT, 4, pio=True, datamatch=end.index)
        if end.irq_fd is not None:
            m.vm.irqfd(end.irq_fd, end.gsi)
