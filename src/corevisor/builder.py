"""build(config): the recipe that turns a PartitionConfig into a ready, unstarted Machine.

Read it top to bottom: create VM -> memory -> irqchip -> vCPUs -> devices -> load the
image -> boot tables -> boot registers. Each step is an attach_* function, so a later
restore path can reuse the same steps with saved state instead of fresh state.
"""

from __future__ import annotations

from corevisor.arch.x86_64 import cpu, layout
from corevisor.arch.x86_64.acpi import write_acpi_tables
from corevisor.arch.x86_64.bootparams import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    write_multiboot_info,
    write_pvh_boot_info,
)
from corevisor.arch.x86_64.mptable import write_mptable
from corevisor.bus import Bus
from corevisor.config import PartitionConfig
from corevisor.console import open_serial
from corevisor.devices import Device
from corevisor.devices.debug_exit import DebugExit
from corevisor.devices.i8042 import I8042
from corevisor.devices.postcode import PostCode
from corevisor.devices.rtc import Rtc
from corevisor.devices.uart16550 import Uart16550
from corevisor.errors import ConfigError, KvmError
from corevisor.kvm.bindings import KVM_PIT_SPEAKER_DUMMY, Cap
from corevisor.kvm.ioctls import Kvm
from corevisor.loader import LoadedImage, load_image
from corevisor.machine import Machine
from corevisor.memory import GuestMemory
from corevisor.vcpu import Vcpu

COM1_PORT, COM1_IRQ = 0x3F8, 4
REQUIRED_CAPS = (Cap.IRQCHIP, Cap.USER_MEMORY, Cap.IMMEDIATE_EXIT, Cap.PIT2, Cap.MP_STATE)


def build(config: PartitionConfig, kvm_path: str = "/dev/kvm") -> Machine:
    """Assemble a Machine for config; the caller starts it with run()."""
    kvm = Kvm(kvm_path)
    _check_host(kvm, config)
    vm = kvm.create_vm()
    memory = GuestMemory.anonymous(layout.ram_layout(config.memory), name=f"{config.name}-ram")
    m = Machine(config.name, kvm, vm, memory, Bus("pio", dense=True), Bus("mmio", dense=False))
    try:
        attach_memory(m)
        attach_irqchip(m)
        attach_vcpus(m, config)
        attach_legacy_devices(m, config)
        image = load_image(m.memory, config.image)
        rsdp = attach_boot_tables(m, config)
        boot_bsp(m, image, config.cmdline, rsdp)
    except BaseException:
        m.close()
        raise
    return m


def _check_host(kvm: Kvm, config: PartitionConfig) -> None:
    for cap in REQUIRED_CAPS:
        if not kvm.check_extension(cap):
            raise KvmError("KVM_CHECK_EXTENSION", 95, f"this host's KVM lacks KVM_CAP_{cap.name}")
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


def attach_vcpus(m: Machine, config: PartitionConfig) -> None:
    """Create the vCPUs with CPUID, MSRs and FPU state; pin each to its host core."""
    supported = m.kvm.supported_cpuid()
    for i in range(config.cpus):
        fd = m.vm.create_vcpu(i)
        fd.set_cpuid2(cpu.vcpu_cpuid(supported, i, config.cpus))
        fd.set_msrs(cpu.boot_msrs())
        cpu.setup_fpu(fd)
        core = None
        if config.pin:
            core = config.pin[i] if len(config.pin) > 1 else config.pin[0]
        m.vcpus.append(Vcpu(fd, m.pio, m.mmio, m.finish, host_core=core, memory=m.memory))


def attach_legacy_devices(m: Machine, config: PartitionConfig) -> None:
    """The PC devices every bundled guest (and Linux) expects at their usual ports."""
    serial = open_serial(config.serial, config.name)
    m.closers.append(serial.close)
    vm = m.vm

    def com1_irq(level: bool) -> None:
        vm.irq_line(COM1_IRQ, 1 if level else 0)

    uart = Uart16550(serial.write, com1_irq)
    serial.start_input(uart.enqueue_input)
    devices: dict[str, tuple[int, int, Device]] = {
        "com1": (COM1_PORT, 8, uart),
        "i8042": (0x60, 5, I8042(m.guest_reset)),
        "rtc": (0x70, 2, Rtc()),
        "postcode": (0x80, 1, PostCode()),
        "debug-exit": (0xF4, 4, DebugExit(m.guest_exit)),
    }
    for name, (port, size, dev) in devices.items():
        m.pio.attach(port, size, dev, name)
        m.devices[name] = dev


def attach_boot_tables(m: Machine, config: PartitionConfig) -> int:
    """Tables a guest reads to find its CPUs: boot GDT, MP table, ACPI; returns the RSDP."""
    cpu.write_boot_gdt(m.memory)
    # KVM's default GSI routing wires the PIT (IRQ0) to IOAPIC pin 0, not pin 2 as on PCs.
    write_mptable(m.memory, config.cpus, irq0_pin=0)
    return write_acpi_tables(m.memory, config.cpus)


def boot_bsp(m: Machine, image: LoadedImage, cmdline: str, rsdp: int) -> None:
    """Write the boot-information block for the image's protocol and set vCPU 0's entry."""
    bsp = m.vcpus[0].fd
    if image.kind == "pvh":
        ebx = write_pvh_boot_info(m.memory, cmdline.encode(), rsdp=rsdp)
        cpu.setup_protected_mode(bsp, m.memory, image.entry, eax=0, ebx=ebx)
    else:
        ebx = write_multiboot_info(m.memory, cmdline.encode())
        cpu.setup_protected_mode(
            bsp, m.memory, image.entry, eax=MULTIBOOT_BOOTLOADER_MAGIC, ebx=ebx
        )
