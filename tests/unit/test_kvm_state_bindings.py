"""The state structures and ioctl numbers of kvm/bindings.py against the kernel's own
headers (linux-libc-dev): a C program prints sizeof/offsetof and the ioctl numbers, and
every one must equal what the Python bindings compute."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from corevisor.kvm import bindings as b

STRUCTS = {
    "kvm_xsave": b.kvm_xsave,
    "kvm_xcr": b.kvm_xcr,
    "kvm_xcrs": b.kvm_xcrs,
    "kvm_debugregs": b.kvm_debugregs,
    "kvm_clock_data": b.kvm_clock_data,
    "kvm_pic_state": b.kvm_pic_state,
    "kvm_ioapic_state": b.kvm_ioapic_state,
    "kvm_irqchip": b.kvm_irqchip,
    "kvm_pit_channel_state": b.kvm_pit_channel_state,
    "kvm_pit_state2": b.kvm_pit_state2,
    "kvm_vcpu_events": b.kvm_vcpu_events,
    "kvm_lapic_state": b.kvm_lapic_state,
    "kvm_regs": b.kvm_regs,
    "kvm_sregs": b.kvm_sregs,
}
IOCTLS = (
    "KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XSAVE2 KVM_GET_XCRS KVM_SET_XCRS KVM_GET_DEBUGREGS "
    "KVM_SET_DEBUGREGS KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK "
    "KVM_SET_CLOCK KVM_SET_TSC_KHZ KVM_GET_TSC_KHZ KVM_GET_CPUID2 KVM_GET_MSR_INDEX_LIST "
    "KVM_GET_MSR_FEATURE_INDEX_LIST KVM_KVMCLOCK_CTRL KVM_GET_MP_STATE KVM_SET_MP_STATE "
    "KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_LAPIC KVM_SET_LAPIC"
).split()
# Python names of fields the C header nests one level deeper.
C_FIELD = {"triple_fault_pending": "triple_fault.pending"}
CAPS = ("PIT_STATE2", "ADJUST_CLOCK", "DEBUGREGS", "XSAVE", "XCRS", "GET_TSC_KHZ", "XSAVE2")


def _program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>"]
    lines.append("int main(void){")
    for name, cls in STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field, *_ in cls._fields_:
            if field != "chip":  # a union: its members are checked as structs above
                c_field = C_FIELD.get(field, field)
                lines.append(
                    f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {c_field}));'
                )
    for name in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    for cap in CAPS:
        lines.append(f'printf("KVM_CAP_{cap} %d\\n", KVM_CAP_{cap});')
    lines.append("return 0;}")
    return "\n".join(lines)


def _c_values(tmp_path: Path) -> dict[str, int]:
    src = tmp_path / "sizes.c"
    src.write_text(_program())
    exe = tmp_path / "sizes"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_state_bindings_match_the_kernel_headers(tmp_path: Path) -> None:
    c = _c_values(tmp_path)
    for name, cls in STRUCTS.items():
        assert ctypes.sizeof(cls) == c[name], name
        for field, *_ in cls._fields_:
            if field != "chip":
                assert getattr(cls, field).offset == c[f"{name}.{field}"], f"{name}.{field}"
    for name in IOCTLS:
        assert getattr(b, name) == c[name], name
    for cap in CAPS:
        assert b.Cap[cap] == c[f"KVM_CAP_{cap}"], cap
