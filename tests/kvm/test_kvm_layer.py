"""The KVM layer on real /dev/kvm: errors name the ioctl; kernel-side paths really work."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from corevisor.builder import build
from corevisor.errors import KvmError
from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import Kvm
from corevisor.spec import PartitionSpec, SerialSpec
from tests.kvm.images import exit_with, out_byte, pvh_elf


def _machine_config(tmp_path: Path, code: bytes, cpus: int = 1) -> PartitionSpec:
    img = tmp_path / "t.elf"
    img.write_bytes(pvh_elf(code))
    return PartitionSpec(name="t", image=img, memory=16 << 20, cpus=cpus, serial=SerialSpec.null())


def test_failing_ioctl_names_itself_and_errno() -> None:
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as e:
            vm.create_vcpu(0)  # the same vCPU id twice
        assert e.value.ioctl == "KVM_CREATE_VCPU"
        assert e.value.errno == errno.EEXIST
        assert "KVM_CREATE_VCPU failed: EEXIST" in str(e.value)
    finally:
        vm.close()
        kvm.close()


def test_ioeventfd_port_write_is_handled_in_kernel(tmp_path: Path) -> None:
    # 100 writes of 0x5a to port 0x510, then exit: none of them may reach the VMM
    code = bytes([0xB9, 100, 0, 0, 0])  # mov ecx, 100
    code += bytes([0x66, 0xBA, 0x10, 0x05, 0xB0, 0x5A, 0xEE, 0x49, 0x75, 0xFA])
    code += exit_with(0)
    with build(_machine_config(tmp_path, code)) as m:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        m.vm.ioeventfd(efd, 0x510, 1, pio=True, datamatch=0x5A)
        report = m.run(timeout=60)
        assert report.code == 0
        assert os.eventfd_read(efd) == 100
        assert m.pio.unhandled == 0  # no write to 0x510 came to userspace
        os.close(efd)


def test_vcpu_state_round_trips(tmp_path: Path) -> None:
    with build(_machine_config(tmp_path, exit_with(0), cpus=2)) as m:
        bsp, ap = m.vcpus[0].fd, m.vcpus[1].fd
        assert bsp.get_mp_state() == b.KVM_MP_STATE_RUNNABLE
        assert ap.get_mp_state() == b.KVM_MP_STATE_UNINITIALIZED  # waits for INIT/SIPI
        ev = bsp.get_vcpu_events()
        bsp.set_vcpu_events(ev)
        assert bsp.get_regs().rip == 0x100000
        msrs = bsp.get_msrs([b.MSR_IA32_MISC_ENABLE, b.MSR_MTRR_DEF_TYPE])
        assert msrs[b.MSR_MTRR_DEF_TYPE] == 0x806


def test_i8042_reset_command_stops_machine_as_reset(tmp_path: Path) -> None:
    code = out_byte(0x64, 0xFE) + b"\xeb\xfe"  # pulse reset, then spin
    with build(_machine_config(tmp_path, code)) as m:
        report = m.run(timeout=60)
    assert report.kind == "reset"


def test_irq_line_and_signal_msi_are_accepted(tmp_path: Path) -> None:
    with build(_machine_config(tmp_path, exit_with(0))) as m:
        m.vm.irq_line(4, 1)
        m.vm.irq_line(4, 0)
        m.vm.signal_msi(0xFEE00000, 0x40)  # vector 0x40 to APIC 0: delivered, not an error
        efd = os.eventfd(0)
        m.vm.irqfd(efd, 5)
        m.vm.irqfd(efd, 5, deassign=True)
        os.close(efd)
