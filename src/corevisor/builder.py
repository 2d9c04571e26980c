"""build(config) and restore(config, memory, state): the recipe that turns a PartitionSpec
into a ready, unstarted Machine, booting or continuing a saved guest.

Read it top to bottom: create VM -> memory -> irqchip -> exit policy -> vCPUs ->
devices -> ACPI PM devices -> hypercalls -> user devices -> PCI host bridge (if the
machine has PCI) -> virtio devices -> then either load the image (and its initrd or
multiboot modules) -> boot tables -> boot registers -> fw_cfg, or, for a machine with a
BIOS, the firmware (its ROM, shadow RAM, the reset vector, fw_cfg with the ACPI tables
for it) -> channels.
Each step is an attach_* function, so restore (and a system restarting a partition)
reuses the same steps: restore takes RAM that already holds the guest (a snapshot's
memory file mapped copy-on-write, or pages received by a migration), skips what would
overwrite the guest's pages or registers (image loading, boot tables, boot registers,
fw_cfg's boot items, the BIOS's reset vector), and ends by giving every part its saved
state (snapshot/state.restore_machine). Each step hands what it creates to the machine
at once (Machine.own / at_close) and registers its threads with Machine.at_start and
its quiescers with Machine.at_quiesce: a build that fails at any point leaves no fd and
no thread behind, and a built machine runs nothing until start(). What a partition gets
from the system around it (its channel ends, a serial backend that outlives restarts,
its watchdog) comes in as PartitionLinks; a lone machine gets the defaults.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from corevisor.arch.x86_64 import cpu, layout
from corevisor.arch.x86_64.acpi import AcpiTables, build_acpi_tables
from corevisor.arch.x86_64.bootparams import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    e820_map,
    write_multiboot_info,
    write_pvh_boot_info,
    write_zero_page,
)
from corevisor.arch.x86_64.mptable import write_mptable
from corevisor.channel import DOORBELL_PORT, ChannelEnd, DoorbellPort, ReadOnlyGuard
from corevisor.console import Feed, SerialBackend, open_serial
from corevisor.devices import Device
from corevisor.devices.debug_exit import DebugExit
from corevisor.devices.fw_cfg import FwCfg, Item
from corevisor.devices.i8042 import I8042
from corevisor.devices.pm1 import Pm1
from corevisor.devices.pm_timer import PmTimer
from corevisor.devices.pvpanic import PvPanic
from corevisor.devices.rtc import Rtc
from corevisor.devices.uart16550 import Uart16550
from corevisor.errors import ConfigError, KvmError, SnapshotError
from corevisor.hypercall import Generation, GuestClock, HypercallHost, Hypercalls, handler_table
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
from corevisor.sandbox.probe import probe_from_env
from corevisor.spec import ExitMode, PartitionSpec, Transport
from corevisor.vcpu import StopReport

if TYPE_CHECKING:  # the virtio and PCI stacks are imported only by partitions that use them
    from corevisor.arch.x86_64.aml import PciHost
    from corevisor.pci.platform import PciPlatform
    from corevisor.runstats import MachineRun
    from corevisor.snapshot.state import MachineSnapshot
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
    # State the system keeps for the partition, saved and restored with its machine as
    # parts of it (the system's Watchdog as "watchdog"): (name, a Stateful) pairs.
    parts: tuple[tuple[str, Any], ...] = ()


# Parts a snapshot may have and a machine may lack, or the other way round: a lone
# machine's snapshot restored into a system (its watchdog starts as configured), and a
# system partition's restored alone.
OPTIONAL_PARTS = frozenset({"watchdog"})


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
    ram = GuestMemory.anonymous(layout.ram_layout(config.memory), name=f"{config.name}-ram")
    return _assemble(_new_machine(config, kvm_path, ram), config, links, boot=True)


def _assemble(m: Machine, config: PartitionSpec, links: PartitionLinks, boot: bool) -> Machine:
    """Every attach_* step on m, in one order for a boot and a restore; boot: load what
    the guest starts from (a restore must not overwrite the saved guest). On failure m
    is closed, with everything attached so far."""
    res = machine_map(config.name, config.memory, config.pci)  # every GSI, window, port, slot
    try:
        _, virtio = attach_platform(m, config, links, res)
        if config.bios is not None:
            attach_bios(m, config, res, virtio, boot=boot)
        elif boot:
            _boot_image(m, config, res, virtio)
        else:
            attach_fw_cfg(m, config, res, None)  # the machine items only
        attach_system(m, config, links, res)
    except BaseException:
        m.close()
        raise
    return m


def _boot_image(m: Machine, config: PartitionSpec, res: Resources,
                virtio: list[VirtioSlot]) -> None:
    """The image, its initrd or modules, the boot tables and registers, fw_cfg: what a
    machine without firmware gets from the VMM instead."""
    assert config.image is not None, "validation: a partition has an image or a bios"
    image = load_image(m.memory, config.image)
    initrd = load_initrd(m.memory, config.initrd, image) if config.initrd else None
    modules = load_modules(m.memory, config.modules, image)
    rsdp = attach_boot_tables(m, config, virtio)
    cmdline = _guest_cmdline(image, _with_virtio_devices(config.cmdline, virtio))
    boot_bsp(m, image, cmdline, rsdp, initrd, modules, reserved=_reserved(config))
    attach_fw_cfg(m, config, res, (image, cmdline, initrd))


def _reserved(config: PartitionSpec) -> tuple[tuple[int, int], ...]:
    """Ranges of the hole the memory map lists as reserved: the ECAM window."""
    return ((layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE),) if config.pci else ()


def restore(
    config: PartitionSpec,
    memory: GuestMemory,
    state: MachineSnapshot,
    kvm_path: str = "/dev/kvm",
    links: PartitionLinks | None = None,
    new_generation: bool = True,
) -> Machine:
    """A Machine for config around memory, which already holds the saved guest's RAM
    (owned by the machine from this call on, even when the restore fails), with every
    part given its saved state; the caller starts it.

    The same attach_* steps as build, minus what would overwrite the guest: no image,
    boot tables or boot registers; fw_cfg offers its machine items only (a guest reads
    the boot items once, at boot). new_generation: this is a new copy of a saved guest
    (a restore or a clone: HC_GENERATION changes); a migration moves the same guest.
    """
    m = prepare_restore(config, memory, kvm_path, links)
    try:
        restore_state(m, state, new_generation)
    except BaseException:
        m.close()
        raise
    return m


def prepare_restore(
    config: PartitionSpec,
    memory: GuestMemory,
    kvm_path: str = "/dev/kvm",
    links: PartitionLinks | None = None,
) -> Machine:
    """restore's first half: the machine built around memory, its parts not yet given
    their state (a migration's target builds it while the pages still arrive)."""
    links = links if links is not None else PartitionLinks()
    runs = [(r.gpa, r.size) for r in memory.regions]
    if runs != layout.ram_layout(config.memory):
        memory.close()
        raise SnapshotError(
            f"{config.name}: the saved RAM ({sum(n for _, n in runs)} bytes) is not the "
            f"RAM of its spec ({config.memory} bytes)"
        )
    return _assemble(_new_machine(config, kvm_path, memory), config, links, boot=False)


def restore_state(m: Machine, state: MachineSnapshot, new_generation: bool = True) -> None:
    """restore's second half: every part of m (prepare_restore's, never started) given
    its saved state; on failure the caller closes m."""
    from corevisor.snapshot import state as st  # only restores pay for the state code

    m.restore_notes = st.restore_machine(m, _fitted(m, state))
    if new_generation:
        m.devices["hypercall"].generation.advance()


def _fitted(m: Machine, state: MachineSnapshot) -> MachineSnapshot:
    """state without the optional parts this machine lacks (OPTIONAL_PARTS); a part
    the snapshot lacks keeps the state the build gave it."""
    from dataclasses import replace

    saved = {name for name, _ in state.devices}
    for name in OPTIONAL_PARTS & (set(m.devices) - saved):
        del m.devices[name]
    devices = tuple((n, s) for n, s in state.devices if n in m.devices or n not in OPTIONAL_PARTS)
    return replace(state, devices=devices)


def _new_machine(config: PartitionSpec, kvm_path: str, memory: GuestMemory) -> Machine:
    """/dev/kvm, a VM and the RAM, owned by a new Machine (memory is closed on failure)."""
    with ExitStack() as owned:
        owned.callback(memory.close)
        kvm = Kvm(kvm_path)
        owned.callback(kvm.close)
        _check_host(kvm, config)
        vm = kvm.create_vm()
        owned.callback(vm.close)
        m = Machine(config.name, kvm, vm, memory, owned.pop_all())
    m.spec = config
    return m


def attach_platform(
    m: Machine, config: PartitionSpec, links: PartitionLinks, res: Resources
) -> tuple[SerialBackend, list[VirtioSlot]]:
    """The steps boot and restore share: RAM slots, irqchip, exit policy, vCPUs, the
    legacy and ACPI devices, hypercalls, the PCI host bridge, virtio; and the system's
    parts (links.parts)."""
    attach_memory(m, res, firmware=config.bios is not None)
    attach_irqchip(m)
    attach_exit_policy(m, config)
    attach_vcpus(m, config)
    serial = attach_legacy_devices(m, config, links.serial, res, links.report)
    attach_acpi_pm(m, res)
    attach_hypercalls(m, config, links, serial, res)
    pci = attach_pci(m, links, res) if config.pci else None
    attach_user_devices(m, config, res, links.report, pci)
    virtio = attach_virtio_devices(m, config, links, serial, res, pci)
    if config.vfio:
        assert pci is not None, "a machine with --vfio has a host bridge (spec.pci)"
        attach_passthrough(m, config, links, pci)
    m.devices.update(links.parts)
    return serial, virtio


def attach_system(m: Machine, config: PartitionSpec, links: PartitionLinks, res: Resources) -> None:
    """The last steps of boot and restore alike: the channels, a debugger, --stats."""
    attach_channels(m, links, res)
    if config.gdb is not None:
        attach_debugger(m, config, links)
    if links.stats is not None:
        attach_stats(m, links.stats)


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


def attach_memory(m: Machine, res: Resources, firmware: bool = False) -> None:
    """Register every RAM region as a KVM memory slot (the lowest free ones).

    With firmware, 0xA0000-0xFFFFF is left out: the VGA hole stays empty and the BIOS
    area is the firmware's shadow RAM, mapped as its PAM registers say (attach_bios)."""
    hole = (layout.VGA_HOLE_START, layout.HIGH_MEMORY_START) if firmware else None
    for region in m.memory.regions:
        pieces = [(region.gpa, region.end)]
        if hole is not None and region.gpa < hole[1] and hole[0] < region.end:
            pieces = [(region.gpa, hole[0]), (hole[1], region.end)]
        for start, end in pieces:
            if end <= start:
                continue
            slot = res.allocate_from(Space.SLOT, range(CHANNEL_SLOTS[0]), f"RAM at {start:#x}")
            assert slot is not None, "more RAM regions than memory slots below the channels'"
            host = region.host_address + start - region.gpa
            m.vm.set_user_memory_region(slot, start, end - start, host)
            if len(pieces) == 1:  # a region in pieces is not one slot (migrate refuses it)
                m.ram_slots.append((slot, region))


def attach_irqchip(m: Machine) -> None:
    """In-kernel PIC/IOAPIC/LAPIC and PIT: interrupts and timers never touch Python."""
    m.vm.set_tss_addr(layout.VTX_TSS_ADDR)  # needed by VT-x for real mode; harmless elsewhere
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
    """The PC devices every bundled guest (and Linux) expects at their usual ports,
    and pvpanic, through which a guest kernel reports its panic.

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
    gate = InputGate(uart.enqueue_input)
    m.at_start(lambda: serial.start_input(gate.feed))
    m.at_quiesce(gate.park, gate.unpark)
    devices: dict[str, Device] = {
        "com1": uart,
        "i8042": I8042(m.guest_reset),
        "rtc": Rtc(),
        "postcode": probe_from_env(),  # a PostCode unless a sandbox test asks
        "debug-exit": DebugExit(m.guest_exit),
        "pvpanic": PvPanic(m.guest_panic),
    }
    _attach_ports(m, devices, res)
    return serial


class InputGate:
    """Host input on its way to a device, held back while the machine is frozen: input
    raises the UART's interrupt from the input thread, which must not change the
    interrupt controllers while their state is being taken. Held bytes are delivered,
    in order, when the gate opens again."""

    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self._lock = threading.Lock()
        self._held: list[bytes] | None = None

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(data)
                return
            self._feed(data)

    def park(self) -> None:
        with self._lock:
            self._held = []

    def unpark(self) -> None:
        with self._lock:
            held, self._held = self._held or [], None
            for data in held:
                self._feed(data)


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
    res: Resources,
    boot: tuple[LoadedImage, str, Initrd | None] | None,
) -> None:
    """QEMU's fw_cfg at 0x510 (devices/fw_cfg.py), with the items of firmware/fw_cfg.py:
    CPUs, RAM, e820, boot order, and the kernel/command-line/initrd the guest was given
    (boot: the image, command line and initrd placed; None for a restored guest, which
    read them when it booted). After the boot tables, so the items describe what was
    actually placed."""
    from corevisor.firmware import fw_cfg as items

    boot_items: dict[int, Item] = {}
    if boot is not None:
        image, cmdline, initrd = boot
        ramdisk = (initrd, config.initrd) if initrd is not None and config.initrd else None
        found, opened = items.boot_items(image, cmdline.encode(), ramdisk)
        for f in opened:
            m.own(f)
        boot_items = dict(found)
    e820 = e820_map(m.memory, _reserved(config))
    dev = FwCfg(
        m.memory,
        {**items.machine_items(config.cpus, m.memory, e820), **boot_items},
        items.machine_files(m.memory, e820),
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
        clock=GuestClock(),
        generation=Generation(),
    )
    paravirt: dict[str, Device] = {
        "hypercall": Hypercalls(m.memory, handler_table(host), host.clock, host.generation),
        "doorbell": DoorbellPort(),
    }
    _attach_ports(m, paravirt, res)


def attach_user_devices(
    m: Machine,
    config: PartitionSpec,
    res: Resources,
    report: Callable[[str, str], None] = report_to_stderr,
    pci: PciPlatform | None = None,
) -> None:
    """Device models written in Python (userdev/, docs/devices.md) at the ranges and lines
    their specs name, PCI functions on pci's bus (before the virtio functions: slot
    order is device order). Before the virtio devices: a user device's line is fixed
    (its guest driver knows it), so virtio's allocation steps around it. Their timers
    run on one thread the machine starts with the vCPUs; a device that fails is
    reported through report and answers as absent, the machine runs on."""
    if not config.devices:
        return
    from corevisor.userdev import attach as userdev  # only partitions with user devices

    userdev.attach(m, config.devices, res, lambda msg: report(m.name, msg), pci,
                   place=config.bios is None)


def attach_pci(m: Machine, links: PartitionLinks, res: Resources) -> PciPlatform:
    """The PCI host bridge (pci/): bus 0 with the host bridge in slot 0, configuration
    mechanism #1 at 0xCF8 and ECAM at layout.PCI_ECAM_START; the machine's GSI routing
    for MSI/MSI-X lives in the platform it returns."""
    from corevisor.pci.host import ConfigPorts, Ecam, HostBridge, PciRoot
    from corevisor.pci.platform import PciPlatform

    bridge = HostBridge()
    root = PciRoot(bridge)
    ports = ConfigPorts(root, m.guest_reset)
    m.pio.attach(layout.PCI_CONFIG_PORT, 8, ports, "pci-config")
    m.mmio.attach(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, Ecam(root), "pci-ecam")
    m.devices["pci-config"] = ports
    m.devices["host-bridge"] = bridge
    return PciPlatform(root, m.vm, res, m.pio, m.mmio, lambda msg: links.report(m.name, msg))


def attach_passthrough(m: Machine, config: PartitionSpec, links: PartitionLinks,
                       pci: PciPlatform) -> None:
    """Host PCI devices through VFIO (vfio/attach.py): all of the guest's RAM mapped in
    the IOMMU at iova = guest-physical, so the devices' DMA reaches that RAM and nothing
    else; each device a function on bus 0 after the virtio ones."""
    from corevisor.vfio.attach import attach_vfio

    functions = attach_vfio(pci, m.memory, config.vfio, m,
                            lambda msg: links.report(m.name, msg),
                            where=f"partition {config.name}: vfio device",
                            place=config.bios is None)
    for function in functions:
        m.devices[function.name.replace(" ", "-")] = function


def attach_bios(m: Machine, config: PartitionSpec, res: Resources,
                virtio: list[VirtioSlot], boot: bool = True) -> None:
    """The machine's firmware (firmware/bios.py): the ROM below 4 GiB as a read-only
    slot, 0xC0000-0xFFFFF as the host bridge's PAM registers say, two CMOS bytes, fw_cfg
    with the memory map and the ACPI tables for the firmware to install, and (boot: not
    for a restored guest) vCPU 0 at the reset vector. Nothing is written into guest RAM."""
    from corevisor.firmware import bios
    from corevisor.firmware.acpi import loader_files
    from corevisor.firmware.fw_cfg import machine_files, machine_items
    from corevisor.pci.host import HostBridge
    from corevisor.resources import FIRMWARE_SLOTS

    assert config.bios is not None
    if not m.vm.check_extension(Cap.READONLY_MEM):
        raise KvmError("KVM_CHECK_EXTENSION", errno.EOPNOTSUPP,
                       "a BIOS needs KVM_CAP_READONLY_MEM (its ROM), which this host's KVM lacks")
    rom = m.own(bios.BiosRom(config.bios))
    slots = [res.claim(Space.SLOT, s, 1, "the BIOS") for s in FIRMWARE_SLOTS]
    m.vm.set_user_memory_region(slots[0], rom.base, rom.size, rom.host_address, KVM_MEM_READONLY)
    shadow = bios.Shadow(m.vm, rom, m.memory.regions[0].host_address, slots[1:])
    bridge = m.devices["host-bridge"]
    assert isinstance(bridge, HostBridge)
    bridge.on_pam = shadow.apply
    shadow.apply(bridge.pam())
    bios.preset_cmos(m.devices["rtc"], bios.CMOS_DEFAULTS)
    if boot:
        cpu.setup_reset_vector(m.vcpus[0].fd)
    e820 = bios.bios_e820(m.memory, _reserved(config))
    files = {**machine_files(m.memory, e820), **loader_files(_acpi(config, virtio))}
    _attach_ports(m, {"fw-cfg": FwCfg(m.memory, machine_items(config.cpus, m.memory, e820),
                                      files)}, res)


def _pci_host() -> PciHost:
    """What ACPI says about the host bridge."""
    from corevisor.arch.x86_64.aml import PciHost
    from corevisor.pci.host import SLOTS

    routes = tuple((slot, pin, layout.pci_intx_gsi(slot, pin + 1))
                   for slot in range(1, SLOTS) for pin in range(4))
    host = PciHost(
        config_port=layout.PCI_CONFIG_PORT,
        io=(layout.PCI_IO_START, layout.PCI_IO_END),
        mmio32=(layout.PCI_MMIO32_START, layout.PCI_MMIO32_END),
        mmio64=layout.pci64_window(0),
        ecam=(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE),
        routes=routes,
    )
    return host


def _pci_intx(m: Machine) -> list[tuple[int, int, int]]:
    """The MP table's interrupt entries: (slot, pin - 1, GSI) of each function on bus 0
    with an interrupt pin (virtio-pci, user devices, passed-through devices alike)."""
    from corevisor.pci.config import INTERRUPT_PIN
    from corevisor.pci.host import ConfigPorts

    ports = m.devices.get("pci-config")
    if not isinstance(ports, ConfigPorts):
        return []
    out = []
    for slot, function in sorted(ports.root.slots.items()):
        pin = function.get(INTERRUPT_PIN, 1)
        if slot and 1 <= pin <= 4:
            out.append((slot, pin - 1, layout.pci_intx_gsi(slot, pin)))
    return out


def _acpi(config: PartitionSpec, virtio: list[VirtioSlot]) -> AcpiTables:
    """The machine's ACPI tables (acpi.py), for the VMM to place or for firmware."""
    windows = [(s.base, s.size, s.gsi) for s in virtio if s.mmio]
    pci = None
    if config.pci:
        pci = _pci_host()
        pci = replace(pci, mmio64=layout.pci64_window(config.memory))
    return build_acpi_tables(config.cpus, windows, pci)


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
    pci: PciPlatform | None = None,
) -> list[VirtioSlot]:
    """virtio devices (virtio/attach.py) on the partition's transport: virtio-mmio
    windows and GSIs from the machine's map (resources.py), or virtio-pci functions on
    the PCI bus; kicks by ioeventfd and interrupts by irqfd, each device served by its
    own I/O thread (started with the machine). Owned by the machine as each is made, so
    they close before the memory they address (newest first)."""
    if not config.virtio.count:
        return []
    from corevisor.virtio import attach as virtio_attach

    devices = virtio_attach.make_devices(config.virtio, config.name, serial.write, m)
    report = lambda msg: links.report(m.name, msg)  # noqa: E731 - one short closure
    if config.virtio.transport is Transport.PCI:
        assert pci is not None, "a PCI transport has a host bridge"
        slots = virtio_attach.attach_pci(pci, m.vm, m.memory, devices, report, m,
                                         place=config.bios is None)
    else:
        slots = virtio_attach.attach(m.vm, m.memory, m.mmio.attach, devices, report, m, res)
    for slot in slots:
        m.devices[slot.name] = slot.transport
        m.at_quiesce(slot.worker.park, slot.worker.unpark)
    return slots


def attach_boot_tables(
    m: Machine, config: PartitionSpec, virtio: list[VirtioSlot] | None = None
) -> int:
    """Tables a guest reads to find its CPUs and buses: boot GDT, MP table, ACPI; returns
    the RSDP."""
    cpu.write_boot_gdt(m.memory)
    slots = virtio or []
    # KVM's default GSI routing wires the PIT (IRQ0) to IOAPIC pin 0, not pin 2 as on PCs
    # (pci/routing.py keeps it so).
    pci_routes = _pci_intx(m) if config.pci else None
    write_mptable(m.memory, config.cpus, irq0_pin=FIXED_GSIS["the PIT"], pci_routes=pci_routes)
    table_rsdp, tables = _acpi(config, slots).relocate(layout.ACPI_ADDR + 64)
    m.memory.write(layout.ACPI_ADDR, table_rsdp)
    m.memory.write(layout.ACPI_ADDR + 64, tables)
    return layout.ACPI_ADDR


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
    reserved: tuple[tuple[int, int], ...] = (),
) -> None:
    """Write the boot-information block for the image's protocol and set vCPU 0's entry.

    A bzImage enters at startup_64 in long mode with rsi = zero page (boot.rst's 64-bit
    protocol); PVH gets the initrd as its first module, which is where Linux looks; a
    multiboot image gets its modules in the multiboot information.
    """
    bsp = m.vcpus[0].fd
    if image.kind == "bzimage":
        ramdisk = (initrd.gpa, initrd.size) if initrd else None
        rsi = write_zero_page(m.memory, image.boot_header, cmdline.encode(), rsdp, ramdisk,
                              reserved)
        cpu.setup_long_mode(bsp, m.memory, image.entry, rsi=rsi)
    elif image.kind == "pvh":
        ramdisk_module = [(initrd.gpa, initrd.size, b"")] if initrd else []
        ebx = write_pvh_boot_info(m.memory, cmdline.encode(), rsdp=rsdp, modules=ramdisk_module,
                                  reserved=reserved)
        cpu.setup_protected_mode(bsp, m.memory, image.entry, eax=0, ebx=ebx)
    else:
        mods = [(mod.gpa, mod.size, mod.string) for mod in modules or ()]
        ebx = write_multiboot_info(m.memory, cmdline.encode(), mods, reserved)
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
            m.at_quiesce(*_irqfd_switch(m, end.irq_fd, end.gsi))
        m.devices[f"channel-end-{end.name}"] = end


def _irqfd_switch(m: Machine, fd: int, gsi: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Detach a doorbell's irqfd while the machine is frozen (a running peer's rings then
    wait in the eventfd instead of changing the interrupt controllers being saved) and
    attach it again after, which delivers a ring that came meanwhile."""
    return (lambda: m.vm.irqfd(fd, gsi, deassign=True)), (lambda: m.vm.irqfd(fd, gsi))
