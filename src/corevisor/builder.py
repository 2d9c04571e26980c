"""build(config): the recipe that turns a PartitionSpec into a ready, unstarted Machine.

Read it top to bottom: create VM -> memory -> irqchip -> exit policy -> vCPUs ->
devices -> ACPI PM devices -> hypercalls -> user devices -> virtio devices -> load the
image (and its initrd or multiboot modules) -> boot tables -> boot registers -> fw_cfg
-> channels.
Each step is an attach_* function, so a later restore path (and a system restarting a
partition) can reuse the same steps. Each step hands what it creates to the machine at
once (Machine.own / at_close) and registers its threads with Machine.at_start: a
build that fails at any point leaves no fd and no thread behind, and a built machine
runs nothing until start(). What a partition gets from the system around it
(its channel ends, a serial backend that outlives restarts, its watchdog) comes in as
PartitionLinks; a lone machine gets the defaults.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from contextlib import ExitStack
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
from corevisor.channel import DOORBELL_PORT, ChannelEnd, DoorbellPort, ReadOnlyGuard
from corevisor.console import SerialBackend, open_serial
from corevisor.devices import Device
from corevisor.devices.debug_exit import DebugExit
from corevisor.devices.fw_cfg import FwCfg
from corevisor.devices.i8042 import I8042
from corevisor.devices.pm1 import Pm1
from corevisor.devices.pm_timer import PmTimer
from corevisor.devices.postcode import PostCode
from corevisor.devices.rtc import Rtc
from corevisor.devices.uart16550 import Uart16550
from corevisor.errors import ConfigError, KvmError
from corevisor.hypercall import HypercallHost, Hypercalls, handler_table
from corevisor.kvm.bindings import (
    KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
    KVM_X86_DISABLE_EXITS_HLT,
    KVM_X86_DISABLE_EXITS_PAUSE,
    Cap,
)
from corevisor.kvm.host import REQUIRED as REQUIRED_CAPS
from corevisor.kvm.ioctls import Kvm
from corevisor.loader import (
    Initrd,
    LoadedImage,
    LoadedModule,
    load_image,
    load_initrd,
    load_modules,
)
from corevisor.machine import Machine
from corevisor.memory import GuestMemory, MemoryRegion
from corevisor.outputs import report_to_stderr
from corevisor.resources import CHANNEL_SLOTS, FIXED_GSIS, Resources, Space, machine_map
from corevisor.spec import ExitMode, PartitionSpec
from corevisor.vcpu import StopReport

if TYPE_CHECKING:  # the virtio stack is imported only by partitions that have devices
    from corevisor.runstats import MachineRun
    from corevisor.virtio.attach import VirtioSlot



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
    # --stats: receives the machine's statistics as it closes; None collects nothing
    stats: Callable[[MachineRun], None] | None = None


def build(
    config: PartitionSpec, kvm_path: str = "/dev/kvm", links: PartitionLinks | None = None
) -> Machine:
    """Assemble a Machine for config; the caller starts it with start() or run().

    Every resource is owned by the machine (or, before it exists, by the ExitStack that
    becomes its own) from the moment it is created, so a failure at any step releases
    every fd and mapping made so far. No thread starts here: each step registers what
    start() must start.
    """
    links = links if links is not None else PartitionLinks()
    with ExitStack() as owned:
        kvm = Kvm(kvm_path)
        owned.callback(kvm.close)
        _check_host(kvm, config)
        vm = kvm.create_vm()
        owned.callback(vm.close)
        memory = GuestMemory.anonymous(layout.ram_layout(config.memory), name=f"{config.name}-ram")
        owned.callback(memory.close)
        m = Machine(config.name, kvm, vm, memory, owned.pop_all())
    res = machine_map(config.name, config.memory)  # every GSI, window, port and slot
    try:
        attach_memory(m, res)
        attach_irqchip(m)
        attach_exit_policy(m, config)
        attach_vcpus(m, config)
        serial = attach_legacy_devices(m, config, links.serial, res, links.report)
        attach_acpi_pm(m, res)
        attach_hypercalls(m, config, links, serial, res)
        attach_user_devices(m, config, res, links.report)
        virtio = attach_virtio_devices(m, config, links, serial, res)
        image = load_image(m.memory, config.image)
        initrd = load_initrd(m.memory, config.initrd, image) if config.initrd else None
        modules = load_modules(m.memory, config.modules, image)
        rsdp = attach_boot_tables(m, config, virtio)
        cmdline = _guest_cmdline(image, _with_virtio_devices(config.cmdline, virtio))
        boot_bsp(m, image, cmdline, rsdp, initrd, modules)
        attach_fw_cfg(m, config, image, cmdline, initrd, res)
        attach_channels(m, links, res)
        if config.gdb is not None:
            attach_debugger(m, config, links)
        if links.stats is not None:
            attach_stats(m, links.stats)
    except BaseException:
        m.close()
        raise
    return m


def attach_debugger(m: Machine, config: PartitionSpec, links: PartitionLinks) -> None:
    """Last step: a GDB stub on config.gdb; the vCPUs stay parked until GDB continues
    (or, with gdb_attach, run until GDB connects). docs/debugging.md shows a session."""
    from corevisor.gdb.server import attach_gdb  # only partitions that ask pay for it

    assert config.gdb is not None
    attach_gdb(
        m, config.gdb, wait=not config.gdb_attach, report=lambda msg: links.report(m.name, msg)
    )


def attach_stats(m: Machine, sink: Callable[[MachineRun], None]) -> None:
    """Last step: open the VM's and vCPUs' statistics fds now, before any vCPU runs (the
    vCPU ioctl takes the mutex KVM_RUN holds), and read them when the machine closes:
    registered last, it runs first, after the vCPU threads ended and before their fds
    close."""
    from corevisor.runstats import StatsCollector  # only runs that ask for --stats

    collector = StatsCollector(m, sink)
    m.stats = collector
    m.at_close(collector.close)


def _check_host(kvm: Kvm, config: PartitionSpec) -> None:
    for cap in REQUIRED_CAPS:
        if not kvm.check_extension(cap):
            raise KvmError(
                "KVM_CHECK_EXTENSION", errno.EOPNOTSUPP, f"this host's KVM lacks KVM_CAP_{cap.name}"
            )
    limit = kvm.max_vcpus()
    if config.cpus > limit:
        raise ConfigError(f"{config.name}: {config.cpus} vCPUs, but this host's KVM allows {limit}")


def attach_memory(m: Machine, res: Resources) -> None:
    """Register every RAM region as a KVM memory slot (the lowest free ones)."""
    for region in m.memory.regions:
        slot = res.allocate_from(Space.SLOT, range(CHANNEL_SLOTS[0]), f"RAM at {region.gpa:#x}")
        assert slot is not None, "more RAM regions than memory slots below the channels'"
        m.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address)


def attach_irqchip(m: Machine) -> None:
    """In-kernel PIC/IOAPIC/LAPIC and PIT: interrupts and timers never touch Python."""
    m.vm.set_tss_addr(0xFFFBD000)  # needed by VT-x for real mode; harmless elsewhere
    m.vm.create_irqchip()
    # KVM serves port 0x61 (PIT channel 2 gate and output, which guests calibrate their
    # clocks against) only with KVM_PIT_SPEAKER_DUMMY; without it the port read 0 here
    # and calibration loops spun until their bound.
    m.vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)


def attach_exit_policy(m: Machine, config: PartitionSpec) -> None:
    """HLT/PAUSE handling of a dedicated partition; KVM takes it only before any vCPU exists.

    "disabled": HLT and PAUSE stay in the guest (the vCPU keeps its core busy, wakes
    with no host scheduling); "halt-poll": a halted vCPU polls for config.halt_poll_ns
    before its thread sleeps. docs/partitioning.md measures both.
    """
    where = f"partitions.{config.name}.exits"
    if config.exits is ExitMode.DISABLED:
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
    elif config.exits is ExitMode.HALT_POLL:
        if not m.vm.check_extension(Cap.HALT_POLL):
            raise KvmError(
                "KVM_ENABLE_CAP",
                errno.EOPNOTSUPP,
                f'{where} = "halt-poll": this host\'s KVM lacks KVM_CAP_HALT_POLL',
            )
        m.vm.enable_cap(Cap.HALT_POLL, config.halt_poll_ns)


def attach_vcpus(m: Machine, config: PartitionSpec) -> None:
    """Create the vCPUs with CPUID, MSRs and FPU state; pin each to its host core."""
    supported = m.kvm.supported_cpuid()
    for i in range(config.cpus):
        core = None
        if config.pin:
            core = config.pin[i] if len(config.pin) > 1 else config.pin[0]
        fd = m.add_vcpu(m.vm.create_vcpu(i), host_core=core).fd
        fd.set_cpuid2(cpu.vcpu_cpuid(supported, i, config.cpus, fd.get_tsc_khz()))
        fd.set_msrs(cpu.boot_msrs())
        cpu.setup_fpu(fd)


def attach_legacy_devices(
    m: Machine,
    config: PartitionSpec,
    serial: SerialBackend | None,
    res: Resources,
    report: Callable[[str, str], None] = report_to_stderr,
) -> SerialBackend:
    """The PC devices every bundled guest (and Linux) expects at their usual ports.

    Returns the serial backend (the hypercall console writes there too); one passed in
    belongs to the caller and is not closed with the machine. Host input starts with
    the machine (a terminal goes raw only then). ``report`` hears of an output target
    that failed (outputs.py): the guest never does.
    """
    if serial is None:
        serial = m.own(open_serial(config.serial, config.name, report))
    vm = m.vm

    def com1_irq(level: bool) -> None:
        vm.irq_line(layout.COM1_IRQ, 1 if level else 0)

    uart = Uart16550(serial.write, com1_irq)
    m.at_start(lambda: serial.start_input(uart.enqueue_input))
    devices: dict[str, Device] = {
        "com1": uart,
        "i8042": I8042(m.guest_reset),
        "rtc": Rtc(),
        "postcode": PostCode(),
        "debug-exit": DebugExit(m.guest_exit),
    }
    _attach_ports(m, devices, res)
    return serial


def _attach_ports(m: Machine, devices: dict[str, Device], res: Resources) -> None:
    """Put devices on the PIO bus at the ports the machine's map gives them."""
    for name, dev in devices.items():
        claim = res.owner_of(Space.PIO, name)
        m.pio.attach(claim.start, claim.end - claim.start, dev, name)
        m.devices[name] = dev


def attach_acpi_pm(m: Machine, res: Resources) -> None:
    """The ACPI fixed hardware the FADT declares (acpi.py): PM1a event and control blocks
    (SCI_EN set; S5 powers the machine off, exit status 0) and the 3.58 MHz PM timer."""

    def poweroff() -> None:
        m.finish(StopReport("exit", "guest powered off (ACPI S5)", code=0))

    _attach_ports(m, {"pm1": Pm1(poweroff), "pm-timer": PmTimer()}, res)


def attach_fw_cfg(
    m: Machine,
    config: PartitionSpec,
    image: LoadedImage,
    cmdline: str,
    initrd: Initrd | None,
    res: Resources,
) -> None:
    """QEMU's fw_cfg at 0x510 (devices/fw_cfg.py), with the items of firmware/fw_cfg.py:
    CPUs, RAM, e820, boot order, and the kernel/command-line/initrd the guest was given.
    After the boot tables, so the items describe what was actually placed."""
    from corevisor.firmware import fw_cfg as items

    ramdisk = (initrd, config.initrd) if initrd is not None and config.initrd else None
    boot, opened = items.boot_items(image, cmdline.encode(), ramdisk)
    for f in opened:
        m.own(f)
    dev = FwCfg(
        m.memory,
        {**items.machine_items(config.cpus, m.memory), **boot},
        items.machine_files(m.memory),
    )
    _attach_ports(m, {"fw-cfg": dev}, res)


def attach_hypercalls(
    m: Machine,
    config: PartitionSpec,
    links: PartitionLinks,
    serial: SerialBackend,
    res: Resources,
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
    paravirt: dict[str, Device] = {
        "hypercall": Hypercalls(m.memory, handler_table(host)),
        "doorbell": DoorbellPort(),
    }
    _attach_ports(m, paravirt, res)


def attach_user_devices(
    m: Machine,
    config: PartitionSpec,
    res: Resources,
    report: Callable[[str, str], None] = report_to_stderr,
) -> None:
    """Device models written in Python (userdev/, docs/devices.md) at the ranges and lines
    their specs name. Before the virtio devices: a user device's line is fixed (its
    guest driver knows it), so virtio's allocation steps around it. Their timers run on
    one thread the machine starts with the vCPUs; a device that fails is reported
    through report and answers as absent, the machine runs on."""
    if not config.devices:
        return
    from corevisor.userdev import attach as userdev  # only partitions with user devices

    userdev.attach(m, config.devices, res, lambda msg: report(m.name, msg))


def _with_virtio_devices(cmdline: str, slots: list[VirtioSlot]) -> str:
    """The command line plus Linux's virtio_mmio.device= entry for each device."""
    if not slots:
        return cmdline
    from corevisor.virtio.attach import cmdline as virtio_cmdline

    return virtio_cmdline(cmdline, slots)


def attach_virtio_devices(
    m: Machine,
    config: PartitionSpec,
    links: PartitionLinks,
    serial: SerialBackend,
    res: Resources,
) -> list[VirtioSlot]:
    """virtio-mmio devices (virtio/attach.py): windows and GSIs from the machine's map
    (resources.py), kicks by ioeventfd and interrupts by irqfd, each device served by its
    own I/O thread (started with the machine). Owned by the machine as each is made, so
    they close before the memory they address (newest first)."""
    if not config.virtio.count:
        return []
    from corevisor.virtio import attach as virtio_attach

    devices = virtio_attach.make_devices(config.virtio, config.name, serial.write, m)
    slots = virtio_attach.attach(
        m.vm, m.memory, m.mmio.attach, devices, lambda msg: links.report(m.name, msg), m, res
    )
    for slot in slots:
        m.devices[slot.name] = slot.transport
    return slots


def attach_boot_tables(
    m: Machine, config: PartitionSpec, virtio: list[VirtioSlot] | None = None
) -> int:
    """Tables a guest reads to find its CPUs: boot GDT, MP table, ACPI; returns the RSDP."""
    cpu.write_boot_gdt(m.memory)
    # KVM's default GSI routing wires the PIT (IRQ0) to IOAPIC pin 0, not pin 2 as on PCs.
    write_mptable(m.memory, config.cpus, irq0_pin=FIXED_GSIS["the PIT"])
    windows = [(s.base, s.size, s.gsi) for s in virtio or ()]
    return write_acpi_tables(m.memory, config.cpus, windows)


def _guest_cmdline(image: LoadedImage, cmdline: str) -> str:
    """The command line as the guest gets it: a multiboot kernel's starts with the
    kernel's own name, as GRUB and QEMU pass it (programs take it as argv[0])."""
    if image.kind != "multiboot":
        return cmdline
    return " ".join(part for part in (str(image.path), cmdline) if part)


def boot_bsp(
    m: Machine,
    image: LoadedImage,
    cmdline: str,
    rsdp: int,
    initrd: Initrd | None = None,
    modules: list[LoadedModule] | None = None,
) -> None:
    """Write the boot-information block for the image's protocol and set vCPU 0's entry.

    A bzImage enters at startup_64 in long mode with rsi = zero page (boot.rst's 64-bit
    protocol); PVH gets the initrd as its first module, which is where Linux looks; a
    multiboot image gets its modules in the multiboot information.
    """
    bsp = m.vcpus[0].fd
    if image.kind == "bzimage":
        ramdisk = (initrd.gpa, initrd.size) if initrd else None
        rsi = write_zero_page(m.memory, image.boot_header, cmdline.encode(), rsdp, ramdisk)
        cpu.setup_long_mode(bsp, m.memory, image.entry, rsi=rsi)
    elif image.kind == "pvh":
        ramdisk_module = [(initrd.gpa, initrd.size, b"")] if initrd else []
        ebx = write_pvh_boot_info(m.memory, cmdline.encode(), rsdp=rsdp, modules=ramdisk_module)
        cpu.setup_protected_mode(bsp, m.memory, image.entry, eax=0, ebx=ebx)
    else:
        mods = [(mod.gpa, mod.size, mod.string) for mod in modules or ()]
        ebx = write_multiboot_info(m.memory, cmdline.encode(), mods)
        cpu.setup_protected_mode(
            bsp, m.memory, image.entry, eax=MULTIBOOT_BOOTLOADER_MAGIC, ebx=ebx
        )


def attach_channels(m: Machine, links: PartitionLinks, res: Resources) -> None:
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
        owner = f"channel {end.name}"
        res.claim(Space.GPA, end.gpa, end.size, owner)
        res.claim(Space.GSI, end.gsi, 1, owner)
        slot = res.allocate_from(Space.SLOT, CHANNEL_SLOTS, owner)
        assert slot is not None, "validation caps the channels of a partition"
        region = MemoryRegion.shared(end.gpa, end.size, end.memfd, end.readonly)
        m.memory.add_region(region)  # owned by the memory from here on
        flags = KVM_MEM_READONLY if end.readonly else 0
        m.vm.set_user_memory_region(slot, end.gpa, end.size, region.host_address, flags)
        if end.readonly:
            guard = ReadOnlyGuard(end.name, lambda msg: links.report(m.name, msg))
            m.mmio.attach(end.gpa, end.size, guard, f"channel-{end.name}")
            m.devices[f"channel-{end.name}"] = guard
        if end.ring_fd is not None:
            m.vm.ioeventfd(end.ring_fd, DOORBELL_PORT, 4, pio=True, datamatch=end.index)
        if end.irq_fd is not None:
            m.vm.irqfd(end.irq_fd, end.gsi)
