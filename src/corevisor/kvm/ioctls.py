"""Kvm, VmFd and VcpuFd: one typed method per ioctl, and the only reader of kvm_run.

Every failing ioctl raises KvmError naming the ioctl and the errno. The vCPU run loop's
hot path (KVM_RUN, then reading an I/O or MMIO exit) is kept to a struct unpack on the
shared kvm_run mapping; rarer exits are decoded into frozen dataclasses for reporting.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from corevisor.errors import KvmError
from corevisor.kvm import bindings as b

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: Any, name: str) -> int:
    """Issue one ioctl; translate OSError into KvmError naming the ioctl."""
    try:
        if isinstance(arg, int):
            if arg > 0x7FFFFFFF:  # fcntl.ioctl takes a C int; go through libc for the rest
                ret = _libc.ioctl(fd, request, arg)
                if ret < 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
                return int(ret)
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as e:
        raise KvmError(name, e.errno or 0) from None


# --- exit decoding ------------------------------------------------------------------
# exit_reason (offset 8) and the I/O exit fields (offset 32) in one unpack, for the hot path
_RUN_IO = struct.Struct("<8xI20xBBHIQ")
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")
_U64 = struct.Struct("<Q")
_DEBUG = struct.Struct("<IIQQQ")  # kvm_debug_exit_arch: exception, pad, pc, dr6, dr7


@dataclass(frozen=True)
class ExitInfo:
    """A decoded, rare vCPU exit, for reports (not for the hot path)."""

    reason: int
    name: str
    detail: str


@dataclass(frozen=True)
class DebugExit:
    """A decoded KVM_EXIT_DEBUG: exception 1 (#DB: single-step, hardware breakpoint)
    or 3 (#BP: int3), the guest's rip, and DR6/DR7 at the exit."""

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True)
class SupportedCpuid:
    """One KVM_GET_SUPPORTED_CPUID entry as plain values."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _cpuid_list(fd: int, request: int, name: str) -> list[SupportedCpuid]:
    """A kvm_cpuid2 answer (supported or per-vCPU), growing the buffer until it fits."""
    n = 64
    while True:
        buf = b.kvm_cpuid2(n)()
        buf.nent = n
        try:
            fcntl.ioctl(fd, request, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise KvmError(name, e.errno or 0) from None
        return [
            SupportedCpuid(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in buf.entries[: buf.nent]
        ]


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open({path})", e.errno or 0) from None
        try:
            version = _ioctl(self.fd, b.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != b.KVM_API_VERSION:
                raise KvmError(
                    "KVM_GET_API_VERSION", errno.EINVAL, f"API version {version} != 12"
                )
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: b.Cap) -> int:
        """Return KVM_CHECK_EXTENSION's answer (0 means absent)."""
        return _ioctl(self.fd, b.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, b.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def max_vcpus(self) -> int:
        """The most vCPUs one VM may have (KVM_CAP_MAX_VCPUS, else NR_VCPUS)."""
        return self.check_extension(b.Cap.MAX_VCPUS) or self.check_extension(b.Cap.NR_VCPUS) or 4

    def supported_cpuid(self) -> list[SupportedCpuid]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits."""
        return _cpuid_list(self.fd, b.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    # --- state: what the host can save and restore (snapshot/state.py) --------------
    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: every MSR this KVM can save and restore for a vCPU,
        KVM's own paravirtual ones included."""
        return self._msr_list(b.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: the read-only feature MSRs (ARCH_CAPABILITIES,
        microcode revision, ...) this KVM describes; [] where the ioctl is missing."""
        try:
            return self._msr_list(
                b.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST"
            )
        except KvmError as e:
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                return []
            raise

    def _msr_list(self, request: int, name: str) -> list[int]:
        """Ask with an empty list first: the kernel answers E2BIG with the count."""
        probe = b.kvm_msr_list(0)()
        try:
            fcntl.ioctl(self.fd, request, probe, True)
            return []
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise KvmError(name, e.errno or 0) from None
        buf = b.kvm_msr_list(probe.nmsrs)()
        buf.nmsrs = probe.nmsrs
        _ioctl(self.fd, request, buf, name)
        return list(buf.indices[: buf.nmsrs])

    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE image: KVM_CAP_XSAVE2's answer, else the 4 KiB of
        KVM_GET_XSAVE (a KVM without XSAVE2 has no larger state to give)."""
        return max(self.check_extension(b.Cap.XSAVE2), ctypes.sizeof(b.kvm_xsave))

    def create_vm(self) -> VmFd:
        fd = _ioctl(self.fd, b.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return VmFd(fd, self)

    def close(self) -> None:
        """Close the fd; a second call does nothing."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    """A VM file descriptor."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm

    def check_extension(self, cap: b.Cap) -> int:
        return _ioctl(self.fd, b.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = b.kvm_userspace_memory_region(slot, flags, gpa, size, host_addr)
        _ioctl(self.fd, b.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array[ctypes.c_uint64]) -> None:
        """Fill bitmap (one bit per page of slot, 64 pages a word) with the pages written
        since the last call (or, with manual protection, since they were cleared)."""
        log = b.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap))
        _ioctl(self.fd, b.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: ctypes.Array[ctypes.c_uint64]
    ) -> None:
        """Write-protect again the pages set in bitmap (pages first_page on), so their
        next write is logged (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)."""
        log = b.kvm_clear_dirty_log(slot, num_pages, first_page, ctypes.addressof(bitmap))
        _ioctl(self.fd, b.KVM_CLEAR_DIRTY_LOG, log, "KVM_CLEAR_DIRTY_LOG")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, b.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        buf = ctypes.c_uint64(addr)
        _ioctl(self.fd, b.KVM_SET_IDENTITY_MAP_ADDR, buf, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, b.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, b.KVM_CREATE_PIT2, b.kvm_pit_config(flags), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, b.KVM_IRQ_LINE, b.kvm_irq_level(irq, level), "KVM_IRQ_LINE")

    def irqfd(
        self, fd: int, gsi: int, deassign: bool = False, resample_fd: int | None = None
    ) -> None:
        """Let a write to eventfd fd raise gsi in the kernel. With resample_fd the line
        is level-triggered: the write asserts it, the guest's EOI de-asserts it and
        signals resample_fd, so the device can assert it again if it is still pending."""
        flags = b.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None and not deassign:
            flags |= b.KVM_IRQFD_FLAG_RESAMPLE
        req = b.kvm_irqfd(fd, gsi, flags, resample_fd if resample_fd is not None else 0)
        _ioctl(self.fd, b.KVM_IRQFD, req, "KVM_IRQFD")

    def set_gsi_routing(self, routes: list[tuple[int, int, int, int, int]]) -> None:
        """Replace the whole GSI routing table. Each route is (gsi, type, a, b, c):
        KVM_IRQ_ROUTING_IRQCHIP with a = chip, b = pin; KVM_IRQ_ROUTING_MSI with
        a = address low, b = address high, c = data."""
        buf = b.irq_routing(len(routes))()
        buf.nr = len(routes)
        for e, (gsi, kind, x, y, z) in zip(buf.entries, routes, strict=True):
            e.gsi, e.type = gsi, kind
            if kind == b.KVM_IRQ_ROUTING_MSI:
                e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = x, y, z
            else:
                e.u.irqchip.irqchip, e.u.irqchip.pin = x, y
        _ioctl(self.fd, b.KVM_SET_GSI_ROUTING, buf, "KVM_SET_GSI_ROUTING")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        pio: bool,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        """Wire guest writes to addr (port or MMIO) to an eventfd, handled in the kernel."""
        flags = b.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= b.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= b.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = b.kvm_ioeventfd(datamatch or 0, addr, length, fd, flags)
        _ioctl(self.fd, b.KVM_IOEVENTFD, req, "KVM_IOEVENTFD")

    def signal_msi(self, address: int, data: int) -> int:
        msi = b.kvm_msi(address & 0xFFFFFFFF, address >> 32, data, 0, 0)
        return _ioctl(self.fd, b.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    # --- state of the in-kernel devices (snapshot/state.py) -------------------------
    def get_irqchip(self, chip_id: int) -> b.kvm_irqchip:
        """KVM_GET_IRQCHIP of one chip: KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC."""
        chip = b.kvm_irqchip(chip_id)
        _ioctl(self.fd, b.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: b.kvm_irqchip) -> None:
        _ioctl(self.fd, b.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> b.kvm_pit_state2:
        st = b.kvm_pit_state2()
        _ioctl(self.fd, b.KVM_GET_PIT2, st, "KVM_GET_PIT2")
        return st

    def set_pit2(self, st: b.kvm_pit_state2) -> None:
        _ioctl(self.fd, b.KVM_SET_PIT2, st, "KVM_SET_PIT2")

    def get_clock(self) -> b.kvm_clock_data:
        """KVM_GET_CLOCK: the VM's kvmclock in ns (plus host realtime/TSC where flagged)."""
        data = b.kvm_clock_data()
        _ioctl(self.fd, b.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data

    def set_clock(self, data: b.kvm_clock_data) -> None:
        _ioctl(self.fd, b.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    def enable_cap(self, cap: b.Cap, *args: int) -> None:
        req = b.kvm_enable_cap(int(cap), 0)
        for i, a in enumerate(args):
            req.args[i] = a
        _ioctl(self.fd, b.KVM_ENABLE_CAP, req, "KVM_ENABLE_CAP")

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a new fd of the VM's binary statistics (kvm/stats.py reads it)."""
        return _ioctl(self.fd, b.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    def ioapic_redirections(self) -> tuple[int, ...]:
        """The in-kernel IOAPIC's 24 redirection entries (KVM_GET_IRQCHIP, chip 2)."""
        return tuple(self.get_irqchip(b.KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl)

    def create_vcpu(self, index: int) -> VcpuFd:
        """A new vCPU; its fd is closed again if mapping its kvm_run page fails."""
        fd = _ioctl(self.fd, b.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            return VcpuFd(fd, index, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the fd; a second call does nothing."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A vCPU file descriptor and its shared kvm_run page."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self.run_mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    # --- the hot path -------------------------------------------------------------
    def run_decoded(self) -> tuple[int, int, int, int, int, int]:
        """KVM_RUN once; (reason, direction, size, port, count, data_offset).

        The I/O fields are meaningful only when reason is KVM_EXIT_IO; decoding them
        unconditionally in one unpack is cheaper than a second call on the hot path.
        reason is -1 if the run was interrupted (EINTR/EAGAIN).
        """
        try:
            fcntl.ioctl(self.fd, b.KVM_RUN, 0)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return (-1, 0, 0, 0, 0, 0)
            raise KvmError("KVM_RUN", e.errno or 0) from None
        return _RUN_IO.unpack_from(self.run_mm)

    def mmio_exit(self) -> tuple[int, bytes, int, int]:
        """(phys_addr, data, len, is_write) of a KVM_EXIT_MMIO."""
        return _MMIO.unpack_from(self.run_mm, b.KVM_RUN_EXIT_UNION_OFFSET)

    def set_mmio_data(self, data: bytes) -> None:
        """Answer an MMIO read: the data the guest's load will see."""
        off = b.KVM_RUN_EXIT_UNION_OFFSET + 8
        self.run_mm[off : off + len(data)] = data

    def set_immediate_exit(self, value: bool) -> None:
        self.run_mm[b.KVM_RUN_IMMEDIATE_EXIT_OFFSET] = 1 if value else 0

    # --- rare exits, decoded for reports -------------------------------------------
    def exit_info(self, reason: int) -> ExitInfo:
        """Decode a non-I/O exit into a readable form."""
        u = b.KVM_RUN_EXIT_UNION_OFFSET
        try:
            name = b.ExitReason(reason).name
        except ValueError:
            name = f"exit reason {reason}"
        detail = ""
        if reason == b.ExitReason.FAIL_ENTRY:
            hw, cpu = struct.unpack_from("<QI", self.run_mm, u)
            detail = f"hardware entry failure reason {hw:#x} on cpu {cpu}"
        elif reason == b.ExitReason.INTERNAL_ERROR:
            suberror, ndata = _U32X2.unpack_from(self.run_mm, u)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", self.run_mm, u + 8)
            kinds = {
                b.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
                b.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                b.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure",
            }
            detail = kinds.get(suberror, f"internal error {suberror}")
            if data:
                detail += " (data " + " ".join(f"{d:#x}" for d in data) + ")"
        elif reason == b.ExitReason.SYSTEM_EVENT:
            kind = _U32.unpack_from(self.run_mm, u)[0]
            names = {1: "shutdown", 2: "reset", 3: "crash"}
            detail = f"system event {names.get(kind, kind)}"
        elif reason == b.ExitReason.SHUTDOWN:
            detail = "triple fault (the CPU shut down)"
        return ExitInfo(reason, name, detail)

    def debug_exit(self) -> DebugExit:
        """kvm_run.debug.arch of a KVM_EXIT_DEBUG."""
        exc, _pad, pc, dr6, dr7 = _DEBUG.unpack_from(self.run_mm, b.KVM_RUN_EXIT_UNION_OFFSET)
        return DebugExit(exc, pc, dr6, dr7)

    def internal_error(self) -> tuple[int, tuple[int, ...]]:
        """(suberror, data words) of a KVM_EXIT_INTERNAL_ERROR."""
        u = b.KVM_RUN_EXIT_UNION_OFFSET
        suberror, ndata = _U32X2.unpack_from(self.run_mm, u)
        return suberror, struct.unpack_from(f"<{min(ndata, 16)}Q", self.run_mm, u + 8)

    def system_event_type(self) -> int:
        return int(_U32.unpack_from(self.run_mm, b.KVM_RUN_EXIT_UNION_OFFSET)[0])

    # --- state -----------------------------------------------------------------
    def get_regs(self) -> b.kvm_regs:
        regs = b.kvm_regs()
        _ioctl(self.fd, b.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: b.kvm_regs) -> None:
        _ioctl(self.fd, b.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> b.kvm_sregs:
        sregs = b.kvm_sregs()
        _ioctl(self.fd, b.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: b.kvm_sregs) -> None:
        _ioctl(self.fd, b.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> b.kvm_fpu:
        fpu = b.kvm_fpu()
        _ioctl(self.fd, b.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: b.kvm_fpu) -> None:
        _ioctl(self.fd, b.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """Set every MSR of msrs, in order; KvmError naming the first one refused."""
        done = self.set_msrs_upto(list(msrs.items()))
        if done != len(msrs):
            bad = list(msrs)[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused")

    def set_msrs_upto(self, msrs: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS of (index, value) pairs in order: how many KVM set (it stops at
        the first it refuses, which is msrs[answer])."""
        buf = b.kvm_msrs(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return _ioctl(self.fd, b.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = b.kvm_msrs(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = _ioctl(self.fd, b.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def set_cpuid2(self, entries: list[SupportedCpuid]) -> None:
        buf = b.kvm_cpuid2(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = b.kvm_cpuid_entry2(
                e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
            )
        _ioctl(self.fd, b.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_mp_state(self) -> int:
        st = b.kvm_mp_state()
        _ioctl(self.fd, b.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return int(st.mp_state)

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, b.KVM_SET_MP_STATE, b.kvm_mp_state(state), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> b.kvm_vcpu_events:
        ev = b.kvm_vcpu_events()
        _ioctl(self.fd, b.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def set_vcpu_events(self, ev: b.kvm_vcpu_events) -> None:
        _ioctl(self.fd, b.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def get_lapic(self) -> b.kvm_lapic_state:
        st = b.kvm_lapic_state()
        _ioctl(self.fd, b.KVM_GET_LAPIC, st, "KVM_GET_LAPIC")
        return st

    def set_lapic(self, st: b.kvm_lapic_state) -> None:
        _ioctl(self.fd, b.KVM_SET_LAPIC, st, "KVM_SET_LAPIC")

    # --- state for snapshots (snapshot/state.py) -------------------------------------
    def get_xsave(self, size: int) -> bytes:
        """The vCPU's XSAVE image of size bytes (Kvm.xsave_size): KVM_GET_XSAVE2 when
        it is larger than the classic 4 KiB, which KVM_GET_XSAVE would truncate."""
        buf = bytearray(size)
        if size > ctypes.sizeof(b.kvm_xsave):
            _ioctl(self.fd, b.KVM_GET_XSAVE2, buf, "KVM_GET_XSAVE2")
        else:
            _ioctl(self.fd, b.KVM_GET_XSAVE, buf, "KVM_GET_XSAVE")
        return bytes(buf)

    def set_xsave(self, image: bytes) -> None:
        """KVM_SET_XSAVE; the kernel reads as many bytes as KVM_CAP_XSAVE2 says."""
        _ioctl(self.fd, b.KVM_SET_XSAVE, bytearray(image), "KVM_SET_XSAVE")

    def get_xcrs(self) -> b.kvm_xcrs:
        xcrs = b.kvm_xcrs()
        _ioctl(self.fd, b.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        return xcrs

    def set_xcrs(self, xcrs: b.kvm_xcrs) -> None:
        _ioctl(self.fd, b.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_debugregs(self) -> b.kvm_debugregs:
        regs = b.kvm_debugregs()
        _ioctl(self.fd, b.KVM_GET_DEBUGREGS, regs, "KVM_GET_DEBUGREGS")
        return regs

    def set_debugregs(self, regs: b.kvm_debugregs) -> None:
        _ioctl(self.fd, b.KVM_SET_DEBUGREGS, regs, "KVM_SET_DEBUGREGS")

    def get_cpuid2(self) -> list[SupportedCpuid]:
        """KVM_GET_CPUID2: the CPUID this vCPU was given, growing the buffer as needed."""
        return _cpuid_list(self.fd, b.KVM_GET_CPUID2, "KVM_GET_CPUID2")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: the guest's TSC rate (scaled by the hardware if it differs)."""
        _ioctl(self.fd, b.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell a kvmclock guest it was paused (no soft-lockup report);
        EINVAL means the guest has no kvmclock, which the caller may ignore."""
        _ioctl(self.fd, b.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")

    def set_guest_debug(self, control: int, debugregs: tuple[int, ...] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: control is KVM_GUESTDBG_* flags (0 turns debugging off);
        debugregs are DR0-DR3, (unused), (unused), DR6, DR7 for KVM_GUESTDBG_USE_HW_BP."""
        dbg = b.kvm_guest_debug(control, 0)
        for i, value in enumerate(debugregs[:8]):
            dbg.debugreg[i] = value
        _ioctl(self.fd, b.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, b.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a new fd of this vCPU's binary statistics. The ioctl takes the
        vCPU's mutex, which KVM_RUN holds while the guest runs (or sits in HLT): ask for it
        before the vCPU thread starts; reading the fd later needs no lock."""
        return _ioctl(self.fd, b.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    def set_signal_mask(self, blocked: set[int]) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is inside KVM_RUN.

        KVM swaps this mask in for the duration of KVM_RUN only, so a signal the thread
        blocks everywhere else can still interrupt the guest (signals.py says why).
        """
        bits = 0
        for sig in blocked:
            if 1 <= sig <= 8 * b.KERNEL_SIGSET_BYTES:
                bits |= 1 << (sig - 1)
        arg = bytearray(struct.pack("<IQ", b.KERNEL_SIGSET_BYTES, bits))
        _ioctl(self.fd, b.KVM_SET_SIGNAL_MASK, arg, "KVM_SET_SIGNAL_MASK")

    def close(self) -> None:
        """Unmap kvm_run and close the fd; a second call does nothing."""
        if self.fd < 0:
            return
        self.run_mm.close()
        os.close(self.fd)
        self.fd = -1
