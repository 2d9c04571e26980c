"""vCPU and VM state: taken from a paused machine and given to a fresh one, in order.

What KVM holds for a partition (everything not in guest RAM or in a device model)
comes out of here as frozen dataclasses of plain values, and goes back in the order
convention 15 fixes, each step with its reason at the step:

    read:    MP_STATE first, then REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRs,
             VCPU_EVENTS (and CPUID and the TSC rate, which reading cannot change)
    restore: CPUID -> MP_STATE -> REGS -> SREGS -> XSAVE -> XCRS -> DEBUGREGS -> LAPIC
             -> MSRs (the TSC deadline after the TSC) -> VCPU_EVENTS

(Firecracker's vstate/vcpu.rs and QEMU's target/i386/kvm.c agree on the reasons.) The
VM-wide part is the in-kernel PIC master and slave, IOAPIC, PIT and KVM clock.

MSRs: every MSR of KVM_GET_MSR_INDEX_LIST, plus what KVM emulates without listing it
(its own range 0x4b564d00-0x4b564dff, the MTRRs, the machine-check banks). An MSR of
the index list the host refuses to read is recorded in KvmVcpuState.msrs_unreadable, never
dropped without a word; unlisted candidates the host does not know simply do not exist
there. An MSR the host refuses to write at restore is accepted only if this host already
holds the saved value (a read-only identification MSR, such as PVM's 0x4b564d11): the
restore reports it; a different value is a snapshot from another host (SnapshotError).

Every restore builds and checks all of its KVM structures before the first ioctl, so a
corrupt state changes nothing. KVM can still refuse a value on a different host: that
ioctl's KvmError (or a SnapshotError) ends the restore, and the caller discards the
half-restored machine, which was never started.

What does not live here: pausing the machine (machine.py), device state (each device's
save/restore), files (format.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from corevisor.errors import KvmError, SnapshotError
from corevisor.kvm import bindings as b
from corevisor.kvm.ioctls import Kvm, SupportedCpuid, VcpuFd, VmFd
from corevisor.machine import Machine, MachineState
from corevisor.snapshot import restore_parts, save_parts

__all__ = [
    "Registers",
    "Segment",
    "DescriptorTable",
    "SpecialRegisters",
    "VcpuEvents",
    "DebugRegisters",
    "Xcr",
    "Msr",
    "KvmVcpuState",
    "PicState",
    "IoapicState",
    "PitChannel",
    "PitState",
    "ClockState",
    "KvmVmState",
    "HostCpu",
    "RestoreNotes",
    "MachineSnapshot",
    "capture_machine",
    "restore_machine",
    "capture_vcpu",
    "restore_vcpu",
    "capture_vm",
    "restore_vm",
    "host_cpu",
    "check_host_cpu",
    "msr_restore_order",
    "learn_msrs",
]

_D = TypeVar("_D")

# Fields of the C structures that carry no state: not mirrored, zero when written back.
_PADDING = frozenset({"pad", "pad0", "pad1", "pad2", "padding", "reserved"})
MAX_IO_MSRS = 255  # KVM_GET/SET_MSRS refuse 256 or more entries per call (E2BIG)
LAPIC_SIZE = ctypes.sizeof(b.kvm_lapic_state)
MAX_XSAVE_SIZE = 1 << 20  # a bound for hostile input; real images are 4-12 KiB
MAX_CPUID_ENTRIES = 4096
MP_STATES = frozenset(
    {
        b.KVM_MP_STATE_RUNNABLE,
        b.KVM_MP_STATE_UNINITIALIZED,
        b.KVM_MP_STATE_INIT_RECEIVED,
        b.KVM_MP_STATE_HALTED,
        b.KVM_MP_STATE_SIPI_RECEIVED,
    }
)
_EVENT_FLAGS = (
    b.KVM_VCPUEVENT_VALID_NMI_PENDING
    | b.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    | b.KVM_VCPUEVENT_VALID_SHADOW
    | b.KVM_VCPUEVENT_VALID_SMM
    | b.KVM_VCPUEVENT_VALID_PAYLOAD
    | b.KVM_VCPUEVENT_VALID_TRIPLE_FAULT
)

# MSRs KVM emulates for a vCPU but leaves out of KVM_GET_MSR_INDEX_LIST.
MSR_MTRR_CAP = 0xFE
MSR_MCG_CAP = 0x179
MSR_MC0_CTL = 0x400
MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_ASYNC_PF_INT = 0x4B564D06


# --- plain-value mirrors of the KVM structures ----------------------------------------
# Each dataclass below has exactly the fields of its C structure, minus padding and
# reserved words, with the C names; _from_c and _to_c convert by those names, and _to_c
# checks every value fits its C field, which is how a restore validates before mutating.


@dataclass(frozen=True)
class Registers:
    """kvm_regs: the general-purpose registers, rip and rflags."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int


@dataclass(frozen=True)
class Segment:
    """kvm_segment: a segment register with its hidden descriptor cache."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name of the long-mode bit
    g: int
    avl: int
    unusable: int


@dataclass(frozen=True)
class DescriptorTable:
    """kvm_dtable: GDTR or IDTR."""

    base: int
    limit: int


@dataclass(frozen=True)
class SpecialRegisters:
    """kvm_sregs: segments, descriptor tables, control registers, EFER, APIC base, and
    the bitmap of an interrupt KVM had queued for injection."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, ...]


@dataclass(frozen=True)
class ExceptionEvent:
    injected: int
    nr: int
    has_error_code: int
    pending: int
    error_code: int


@dataclass(frozen=True)
class InterruptEvent:
    injected: int
    nr: int
    soft: int
    shadow: int


@dataclass(frozen=True)
class NmiEvent:
    injected: int
    pending: int
    masked: int


@dataclass(frozen=True)
class SmiEvent:
    smm: int
    pending: int
    smm_inside_nmi: int
    latched_init: int


@dataclass(frozen=True)
class VcpuEvents:
    """kvm_vcpu_events: exceptions, interrupts, NMIs and SMIs in flight, the interrupt
    shadow; flags say which optional parts are valid."""

    exception: ExceptionEvent
    interrupt: InterruptEvent
    nmi: NmiEvent
    sipi_vector: int
    flags: int
    smi: SmiEvent
    triple_fault_pending: int
    exception_has_payload: int
    exception_payload: int


@dataclass(frozen=True)
class DebugRegisters:
    """kvm_debugregs: DR0-DR3, DR6, DR7 (flags is always 0 today)."""

    db: tuple[int, ...]
    dr6: int
    dr7: int
    flags: int


@dataclass(frozen=True)
class PicState:
    """kvm_pic_state: one 8259A."""

    last_irr: int
    irr: int
    imr: int
    isr: int
    priority_add: int
    irq_base: int
    read_reg_select: int
    poll: int
    special_mask: int
    init_state: int
    auto_eoi: int
    rotate_on_auto_eoi: int
    special_fully_nested_mode: int
    init4: int
    elcr: int
    elcr_mask: int


@dataclass(frozen=True)
class IoapicState:
    """kvm_ioapic_state: registers and the 24 redirection entries."""

    base_address: int
    ioregsel: int
    id: int
    irr: int
    redirtbl: tuple[int, ...]


@dataclass(frozen=True)
class PitChannel:
    """kvm_pit_channel_state: one 8254 counter. count_load_time is a host time that
    KVM_SET_PIT2 replaces with "now": the channel restarts its count on restore."""

    count: int
    latched_count: int
    count_latched: int
    status_latched: int
    status: int
    read_state: int
    write_state: int
    write_latch: int
    rw_mode: int
    mode: int
    bcd: int
    gate: int
    count_load_time: int


@dataclass(frozen=True)
class PitState:
    """kvm_pit_state2: the three counters and the speaker flags."""

    channels: tuple[PitChannel, ...]
    flags: int


# --- the states ---------------------------------------------------------------------


@dataclass(frozen=True)
class Xcr:
    """One extended control register (XCR0 is the XSAVE feature mask)."""

    xcr: int
    value: int


@dataclass(frozen=True)
class Msr:
    index: int
    value: int


@dataclass(frozen=True)
class KvmVcpuState:
    """Everything KVM holds for one vCPU (guest RAM and device models aside)."""

    index: int
    cpuid: tuple[SupportedCpuid, ...]
    tsc_khz: int
    mp_state: int
    regs: Registers
    sregs: SpecialRegisters
    xsave: bytes
    xcrs: tuple[Xcr, ...]
    debugregs: DebugRegisters
    lapic: bytes
    msrs: tuple[Msr, ...]
    msrs_unreadable: tuple[int, ...]  # listed by KVM, refused to read: not restored
    events: VcpuEvents


@dataclass(frozen=True)
class ClockState:
    """The VM's kvmclock in ns. flags is what KVM_GET_CLOCK said (TSC_STABLE, ...);
    only the clock value is given back, so the guest sees no time pass while saved."""

    clock: int
    flags: int


@dataclass(frozen=True)
class KvmVmState:
    """The in-kernel devices of a VM: both PICs, the IOAPIC, the PIT, the KVM clock."""

    pic_master: PicState
    pic_slave: PicState
    ioapic: IoapicState
    pit: PitState
    clock: ClockState


@dataclass(frozen=True)
class HostCpu:
    """What a snapshot needs from the CPU it resumes on: the vendor, the signature
    (CPUID 1 EAX: family, model, stepping) and the XSAVE image size."""

    vendor: str
    signature: int
    xsave_size: int


@dataclass(frozen=True)
class RestoreNotes:
    """What a restore did not write, and why (for the caller to log)."""

    msrs_readonly: tuple[int, ...] = ()  # refused by the host, already holding the value
    msrs_unreadable: tuple[int, ...] = ()  # recorded at capture: never had a value

    def lines(self) -> list[str]:
        out = []
        if self.msrs_readonly:
            out.append(
                "MSRs read-only on this host, already holding the saved values: "
                + ", ".join(f"{i:#x}" for i in self.msrs_readonly)
            )
        if self.msrs_unreadable:
            out.append(
                "MSRs this host listed but refused to read when the snapshot was taken "
                "(not restored): " + ", ".join(f"{i:#x}" for i in self.msrs_unreadable)
            )
        return out


# --- the generic C <-> dataclass conversion ------------------------------------------


def _c_fields(ctype: Any) -> list[tuple[str, Any]]:
    return [(name, t) for name, t in ctype._fields_ if name not in _PADDING]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """cls's resolved field types (annotations are strings here), computed once."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _from_c(cls: type[_D], obj: Any) -> _D:
    """The mirror dataclass cls of the ctypes structure obj."""
    hints = _hints(cls)
    values = {name: _plain(hints[name], getattr(obj, name)) for name, _ in _c_fields(type(obj))}
    return cls(**values)


def _plain(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return _from_c(typing.cast(type, hint), value)
    if isinstance(value, ctypes.Array):
        (item,) = typing.get_args(hint)[:1]
        return tuple(_plain(item, v) for v in value)
    return int(value)


def _to_c(ctype: Any, value: object, where: str) -> Any:
    """A new ctypes ctype filled from its mirror dataclass value; SnapshotError (naming
    the field) when a field is missing, of the wrong kind or does not fit its C type."""
    obj = ctype()
    for name, ftype in _c_fields(ctype):
        try:
            field = getattr(value, name)
        except AttributeError:
            raise SnapshotError(f"{where}: no field {name}") from None
        _store(obj, name, ftype, field, f"{where}.{name}")
    return obj


def _store(obj: Any, name: str, ftype: Any, value: object, where: str) -> None:
    if issubclass(ftype, ctypes.Array):
        if type(value) is not tuple or len(value) != ftype._length_:
            raise SnapshotError(f"{where}: expected {ftype._length_} values")
        array = getattr(obj, name)
        for i, item in enumerate(value):
            if issubclass(ftype._type_, ctypes.Structure):
                array[i] = _to_c(ftype._type_, item, f"{where}[{i}]")
            else:
                array[i] = _fit(ftype._type_, item, f"{where}[{i}]")
    elif issubclass(ftype, ctypes.Structure | ctypes.Union):
        setattr(obj, name, _to_c(ftype, value, where))
    else:
        setattr(obj, name, _fit(ftype, value, where))


_BOUNDS: dict[Any, tuple[int, int, int]] = {}


def _fit(ctype: Any, value: object, where: str) -> int:
    """value, if it is an int that ctype (an integer C type) can hold exactly."""
    bounds = _BOUNDS.get(ctype)
    if bounds is None:
        bits = 8 * ctypes.sizeof(ctype)
        signed = ctype(-1).value < 0
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        bounds = _BOUNDS[ctype] = (low, high, bits)
    low, high, bits = bounds
    if type(value) is not int or not low <= value <= high:
        raise SnapshotError(f"{where}: {value!r} does not fit a {bits}-bit field")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SnapshotError(message)


# --- MSRs ---------------------------------------------------------------------------


def _read_msrs(fd: VcpuFd, indices: Sequence[int]) -> tuple[dict[int, int], list[int]]:
    """(values, refused): KVM_GET_MSRS stops at the first MSR it refuses and says how
    far it got, so the rest is asked again in the next call."""
    values: dict[int, int] = {}
    refused: list[int] = []
    todo = list(indices)
    while todo:
        chunk = todo[:MAX_IO_MSRS]
        got = fd.get_msrs(chunk)
        values.update(got)
        done = len(got)
        if done < len(chunk):
            refused.append(chunk[done])
            done += 1
        todo = todo[done:]
    return values, refused


def _extra_candidates(fd: VcpuFd) -> list[int]:
    """MSRs KVM emulates but does not list: its own paravirtual range (PVM adds some
    there too), the MTRRs (MTRRcap says how many variable ranges) and the machine-check
    banks (MCG_CAP says how many). MTRRcap and MCG_CAP themselves are not guest state."""
    caps = fd.get_msrs([MSR_MTRR_CAP, MSR_MCG_CAP])
    variable = caps.get(MSR_MTRR_CAP, 0) & 0xFF
    banks = caps.get(MSR_MCG_CAP, 0) & 0xFF
    return [
        *range(b.MSR_KVM_FIRST, b.MSR_KVM_LAST + 1),
        b.MSR_MTRR_DEF_TYPE,
        *MTRR_FIXED,
        *range(0x200, 0x200 + 2 * variable),
        *range(MSR_MC0_CTL, MSR_MC0_CTL + 4 * banks),
    ]


# The readable subset of the unlisted candidates, per candidate list and CPUID (which
# MSRs exist can depend on it): finding it costs one ioctl per absent MSR (hundreds), so
# it is done once per process and vCPU model.
_EXTRA_READABLE: dict[tuple[tuple[int, ...], tuple[SupportedCpuid, ...]], tuple[int, ...]] = {}


def learn_msrs(kvm: Kvm, fd: VcpuFd) -> tuple[int, ...]:
    """Which unlisted MSRs this vCPU model has (cached; fd's thread out of KVM_RUN): a
    migration learns it before its final pause, so the pause does not pay for it."""
    listed_set = set(kvm.msr_index_list())
    extra = [i for i in _extra_candidates(fd) if i not in listed_set]
    key = (tuple(extra), tuple(fd.get_cpuid2()))
    known = _EXTRA_READABLE.get(key)
    if known is None:
        known = tuple(sorted(_read_msrs(fd, extra)[0]))
        _EXTRA_READABLE[key] = known
    return known


def _msr_values(
    kvm: Kvm, fd: VcpuFd, cpuid: tuple[SupportedCpuid, ...]
) -> tuple[tuple[Msr, ...], tuple[int, ...]]:
    """Every MSR this host lets us read, and the listed ones it refused."""
    listed = kvm.msr_index_list()
    listed_set = set(listed)
    extra = [i for i in _extra_candidates(fd) if i not in listed_set]
    key = (tuple(extra), cpuid)
    known = _EXTRA_READABLE.get(key)
    if known is None:
        known = tuple(sorted(_read_msrs(fd, extra)[0]))
        _EXTRA_READABLE[key] = known
    values, refused = _read_msrs(fd, [*listed, *known])
    refused_listed = tuple(i for i in refused if i in listed_set)
    return tuple(Msr(i, v) for i, v in sorted(values.items())), refused_listed


def msr_restore_order(msrs: Iterable[Msr]) -> list[Msr]:
    """The order MSRs are written back in (what each exception protects is beside it)."""
    ordered = sorted(msrs, key=lambda m: m.index)

    def rank(m: Msr) -> int:
        if m.index == b.MSR_IA32_TSC:
            # First: the kvmclock and the TSC deadline are computed against the guest's
            # TSC, so it must be the restored one before they are written.
            return 0
        if m.index == MSR_KVM_ASYNC_PF_INT:
            # Before ASYNC_PF_EN: enabling interrupt-delivered async page faults checks
            # the vector this MSR holds (QEMU orders them the same way).
            return 1
        if m.index == b.MSR_IA32_TSC_DEADLINE:
            # Last: writing it arms the LAPIC timer against the current guest TSC; with
            # the TSC (and the LAPIC's timer mode, restored before every MSR) in place,
            # a deadline that passed while saved fires at once instead of never.
            return 3
        return 2

    return sorted(ordered, key=rank)


def _write_msrs(fd: VcpuFd, msrs: list[Msr]) -> tuple[int, ...]:
    """Write msrs in order; returns the MSRs this host refused but already holds at the
    saved value (read-only here). A refused MSR with another value is SnapshotError."""
    readonly: list[int] = []
    todo = [(m.index, m.value) for m in msrs]
    while todo:
        chunk = todo[:MAX_IO_MSRS]
        done = fd.set_msrs_upto(chunk)
        if done < len(chunk):  # KVM stopped at a refused MSR: is it read-only here?
            index, value = chunk[done]
            here = fd.get_msrs([index]).get(index)
            if here != value:
                shown = "cannot be read" if here is None else f"holds {here:#x}"
                raise SnapshotError(
                    f"MSR {index:#x}: this host refuses the saved value {value:#x} (it "
                    f"{shown}): the snapshot was taken on another host or CPU"
                )
            readonly.append(index)
            done += 1
        todo = todo[done:]
    return tuple(readonly)


# --- vCPU capture and restore ---------------------------------------------------------


def capture_vcpu(kvm: Kvm, fd: VcpuFd) -> KvmVcpuState:
    """Read one paused vCPU's state (its thread must be out of KVM_RUN)."""
    # MP_STATE first: KVM_GET_MP_STATE processes pending INIT/SIPI events
    # (kvm_apic_accept_events), which can change the registers and the LAPIC read next.
    mp_state = fd.get_mp_state()
    regs = _from_c(Registers, fd.get_regs())
    sregs = _from_c(SpecialRegisters, fd.get_sregs())
    xsave = fd.get_xsave(kvm.xsave_size())
    raw_xcrs = fd.get_xcrs()
    xcrs = tuple(Xcr(x.xcr, x.value) for x in raw_xcrs.xcrs[: raw_xcrs.nr_xcrs])
    debugregs = _from_c(DebugRegisters, fd.get_debugregs())
    # KVM_GET_LAPIC syncs interrupts posted to the vCPU into IRR before copying the page.
    lapic = bytes(fd.get_lapic())
    cpuid = tuple(fd.get_cpuid2())
    msrs, unreadable = _msr_values(kvm, fd, cpuid)
    # VCPU_EVENTS last: the GETs above may still move pending events (an interrupt the
    # LAPIC sync just queued); what is in flight is read once everything else is.
    events = _from_c(VcpuEvents, fd.get_vcpu_events())
    return KvmVcpuState(
        index=fd.index,
        cpuid=cpuid,
        tsc_khz=fd.get_tsc_khz(),
        mp_state=mp_state,
        regs=regs,
        sregs=sregs,
        xsave=xsave,
        xcrs=xcrs,
        debugregs=debugregs,
        lapic=lapic,
        msrs=msrs,
        msrs_unreadable=unreadable,
        events=events,
    )


@dataclass
class _VcpuStructs:
    """A KvmVcpuState as the ctypes structures its ioctls take, all checked."""

    regs: b.kvm_regs
    sregs: b.kvm_sregs
    xcrs: b.kvm_xcrs
    debugregs: b.kvm_debugregs
    lapic: b.kvm_lapic_state
    events: b.kvm_vcpu_events
    msrs: list[Msr]


def _check_vcpu(state: KvmVcpuState, xsave_size: int) -> _VcpuStructs:
    """Validate every part of state and build the structures; no ioctl yet."""
    where = f"vcpu{getattr(state, 'index', '?')}"
    _require(isinstance(state, KvmVcpuState), f"{where}: not a KvmVcpuState")
    _require(
        type(state.cpuid) is tuple
        and 0 < len(state.cpuid) <= MAX_CPUID_ENTRIES
        and all(isinstance(e, SupportedCpuid) for e in state.cpuid),
        f"{where}: CPUID is not a list of entries",
    )
    for e in state.cpuid:
        for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
            _fit(ctypes.c_uint32, getattr(e, name), f"{where}.cpuid.{name}")
    _fit(ctypes.c_uint32, state.tsc_khz, f"{where}.tsc_khz")
    _require(state.tsc_khz > 0, f"{where}: TSC rate 0 kHz")
    _require(state.mp_state in MP_STATES, f"{where}: unknown MP state {state.mp_state!r}")
    _require(
        type(state.xsave) is bytes and 512 + 64 <= len(state.xsave) <= MAX_XSAVE_SIZE,
        f"{where}: XSAVE image is not bytes of a plausible size",
    )
    _require(
        len(state.xsave) <= xsave_size,
        f"{where}: the XSAVE image holds {len(state.xsave)} bytes, this host's KVM only "
        f"{xsave_size}: the snapshot uses CPU state this host does not have",
    )
    _require(
        type(state.lapic) is bytes and len(state.lapic) == LAPIC_SIZE,
        f"{where}: LAPIC page is not {LAPIC_SIZE} bytes",
    )
    _require(
        type(state.xcrs) is tuple and len(state.xcrs) <= b.KVM_MAX_XCRS,
        f"{where}: more than {b.KVM_MAX_XCRS} XCRs",
    )
    xcrs = b.kvm_xcrs(nr_xcrs=len(state.xcrs))
    for i, x in enumerate(state.xcrs):
        xcrs.xcrs[i] = _to_c(b.kvm_xcr, x, f"{where}.xcrs[{i}]")
    _require(
        type(state.msrs) is tuple and all(isinstance(m, Msr) for m in state.msrs),
        f"{where}: MSRs are not a list of Msr",
    )
    for m in state.msrs:
        _fit(ctypes.c_uint32, m.index, f"{where}.msrs.index")
        _fit(ctypes.c_uint64, m.value, f"{where}.msrs[{m.index:#x}]")
    _require(
        len({m.index for m in state.msrs}) == len(state.msrs), f"{where}: an MSR is saved twice"
    )
    _require(
        type(state.msrs_unreadable) is tuple
        and all(type(i) is int for i in state.msrs_unreadable),
        f"{where}: msrs_unreadable is not a list of MSR numbers",
    )
    events = _to_c(b.kvm_vcpu_events, state.events, f"{where}.events")
    _require(not events.flags & ~_EVENT_FLAGS, f"{where}: unknown VCPU_EVENTS flags")
    debugregs = _to_c(b.kvm_debugregs, state.debugregs, f"{where}.debugregs")
    _require(debugregs.flags == 0, f"{where}: DEBUGREGS flags must be 0")
    return _VcpuStructs(
        regs=_to_c(b.kvm_regs, state.regs, f"{where}.regs"),
        sregs=_to_c(b.kvm_sregs, state.sregs, f"{where}.sregs"),
        xcrs=xcrs,
        debugregs=debugregs,
        lapic=b.kvm_lapic_state.from_buffer_copy(state.lapic),
        events=events,
        msrs=msr_restore_order(state.msrs),
    )


def restore_vcpu(kvm: Kvm, fd: VcpuFd, state: KvmVcpuState) -> RestoreNotes:
    """Give a fresh, never-run vCPU the state of a saved one, in the documented order."""
    size = kvm.xsave_size()
    s = _check_vcpu(state, size)
    _require(state.index == fd.index, f"vcpu{fd.index}: state of vcpu{state.index}")
    return _apply_vcpu(fd, state, s, size)


def _apply_vcpu(fd: VcpuFd, state: KvmVcpuState, s: _VcpuStructs, size: int) -> RestoreNotes:
    # CPUID first: KVM checks every later value against it (XSAVE features, which MSRs
    # exist, EFER bits), and it may only change before the vCPU first runs. The TSC rate
    # goes with it: the CPUID timing leaf publishes it, and the TSC MSR is scaled by it.
    fd.set_cpuid2(list(state.cpuid))
    if fd.get_tsc_khz() != state.tsc_khz:
        try:
            fd.set_tsc_khz(state.tsc_khz)
        except KvmError as e:
            raise SnapshotError(
                f"vcpu{fd.index}: the snapshot's TSC runs at {state.tsc_khz} kHz and this "
                f"host cannot scale its {fd.get_tsc_khz()} kHz to it ({e})"
            ) from None
    # MP_STATE before REGS: setting a vCPU runnable or halted must not reset the
    # registers given next (an AP taken out of INIT would), and SREGS/LAPIC may depend
    # on whether the vCPU is the BSP in a running state.
    fd.set_mp_state(state.mp_state)
    # REGS before VCPU_EVENTS: KVM_SET_REGS drops any pending exception, which
    # VCPU_EVENTS restores at the end.
    fd.set_regs(s.regs)
    # SREGS before LAPIC: it carries the APIC base (enable bit, x2APIC mode) that
    # KVM_SET_LAPIC interprets the page against; and before XSAVE/MSRs, CR4 and EFER say
    # which state and MSRs are enabled.
    fd.set_sregs(s.sregs)
    # XSAVE then XCRS: the image holds FPU/SSE/AVX registers (checked against CPUID);
    # XCR0 then says which of them the guest has enabled.
    fd.set_xsave(state.xsave.ljust(size, b"\0"))
    fd.set_xcrs(s.xcrs)
    fd.set_debugregs(s.debugregs)
    # LAPIC before MSRs: the TSC deadline MSR is only accepted, and armed, when the
    # restored LAPIC's timer is in TSC-deadline mode.
    fd.set_lapic(s.lapic)
    readonly = _write_msrs(fd, s.msrs)
    # VCPU_EVENTS last: it re-injects what was in flight (exception, interrupt, NMI,
    # interrupt shadow), which the SETs above would have cleared or overridden.
    # VALID_SIPI_VECTOR is added so the saved SIPI vector is taken (GET does not set it).
    s.events.flags |= b.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    fd.set_vcpu_events(s.events)
    return RestoreNotes(msrs_readonly=readonly, msrs_unreadable=state.msrs_unreadable)


# --- VM capture and restore ----------------------------------------------------------


def capture_vm(vm: VmFd) -> KvmVmState:
    """Read the in-kernel devices of a VM whose vCPUs are all paused."""
    return KvmVmState(
        pic_master=_from_c(PicState, vm.get_irqchip(b.KVM_IRQCHIP_PIC_MASTER).chip.pic),
        pic_slave=_from_c(PicState, vm.get_irqchip(b.KVM_IRQCHIP_PIC_SLAVE).chip.pic),
        ioapic=_from_c(IoapicState, vm.get_irqchip(b.KVM_IRQCHIP_IOAPIC).chip.ioapic),
        pit=_from_c(PitState, vm.get_pit2()),
        clock=ClockState(*_clock(vm)),
    )


def _clock(vm: VmFd) -> tuple[int, int]:
    data = vm.get_clock()
    return int(data.clock), int(data.flags)


@dataclass
class _VmStructs:
    chips: list[b.kvm_irqchip]
    pit: b.kvm_pit_state2
    clock: b.kvm_clock_data


def _check_vm(state: KvmVmState) -> _VmStructs:
    """Validate a KvmVmState and build its structures; no ioctl yet."""
    _require(isinstance(state, KvmVmState), "vm: not a KvmVmState")
    chips = []
    for chip_id, name in (
        (b.KVM_IRQCHIP_PIC_MASTER, "pic_master"),
        (b.KVM_IRQCHIP_PIC_SLAVE, "pic_slave"),
    ):
        chip = b.kvm_irqchip(chip_id)
        chip.chip.pic = _to_c(b.kvm_pic_state, getattr(state, name), f"vm.{name}")
        chips.append(chip)
    ioapic = b.kvm_irqchip(b.KVM_IRQCHIP_IOAPIC)
    ioapic.chip.ioapic = _to_c(b.kvm_ioapic_state, state.ioapic, "vm.ioapic")
    chips.append(ioapic)
    _require(isinstance(state.clock, ClockState), "vm.clock: not a ClockState")
    _fit(ctypes.c_uint32, state.clock.flags, "vm.clock.flags")
    clock = b.kvm_clock_data(clock=_fit(ctypes.c_uint64, state.clock.clock, "vm.clock"))
    return _VmStructs(chips, _to_c(b.kvm_pit_state2, state.pit, "vm.pit"), clock)


def restore_vm(vm: VmFd, state: KvmVmState) -> None:
    """Give a fresh VM (irqchip and PIT created, no vCPU run yet) the saved devices.

    Runs before the vCPUs are restored, as Firecracker does: the LAPICs restored then
    find the IOAPIC routes and the PIT they were programmed against.
    """
    _apply_vm(vm, _check_vm(state))


def _apply_vm(vm: VmFd, s: _VmStructs) -> None:
    # The IOAPIC and PICs replace whatever the fresh chips hold, including lines the
    # device models have just re-driven: KVM re-delivers the saved pending requests
    # (irr), and a line that was high and already delivered stays quiet.
    for chip in s.chips:
        vm.set_irqchip(chip)
    # KVM_SET_PIT2 reloads each counter from its saved count at "now" (the host time in
    # count_load_time is not meaningful in another VM, so KVM does not use it).
    vm.set_pit2(s.pit)
    # The kvmclock continues from the saved value: guest time does not jump over the
    # time the snapshot spent on disk (as the TSC MSR, restored per vCPU, does not).
    vm.set_clock(s.clock)


# --- a whole machine -------------------------------------------------------------------


@dataclass(frozen=True)
class MachineSnapshot:
    """All of a machine's state but its RAM (format.py keeps that in its own file)."""

    host: HostCpu
    vm: KvmVmState
    vcpus: tuple[KvmVcpuState, ...]
    devices: tuple[tuple[str, object], ...]  # (name in Machine.devices, its state)


def capture_machine(m: Machine) -> MachineSnapshot:
    """Everything but RAM of a paused (or never started) machine. Its device I/O must be
    quiesced too, and nothing may resume it meanwhile: the lifecycle's snapshot command
    guarantees both; this checks the state it can see."""
    if m.state not in (MachineState.PAUSED, MachineState.CREATED):
        raise SnapshotError(f"machine {m.name}: its state cannot be taken while it is "
                            f"{m.state.value} (pause it first)")
    return MachineSnapshot(
        host=host_cpu(m.kvm),
        vm=capture_vm(m.vm),
        vcpus=tuple(capture_vcpu(m.kvm, v.fd) for v in m.vcpus),
        devices=save_parts(m.devices),
    )


def restore_machine(m: Machine, snap: MachineSnapshot) -> RestoreNotes:
    """Give a fresh machine, built from the snapshot's spec with its RAM already
    restored and never started, the saved state of everything else.

    Order: every KVM structure is checked first (nothing is touched by a bad state);
    then the device models, which re-drive their interrupt lines into the fresh
    irqchip; then the VM's irqchip, PIT and clock, which replace what that did with the
    saved picture; then each vCPU, in the documented order.
    """
    _require(isinstance(snap, MachineSnapshot), "snapshot: not a MachineSnapshot")
    _require(
        m.state is MachineState.CREATED,
        f"machine {m.name}: a snapshot goes into a fresh machine, not one {m.state.value}",
    )
    check_host_cpu(snap.host, host_cpu(m.kvm))
    _require(
        type(snap.vcpus) is tuple and len(snap.vcpus) == len(m.vcpus),
        f"the snapshot has {len(snap.vcpus)} vCPUs, this machine {len(m.vcpus)}",
    )
    size = m.kvm.xsave_size()
    vcpus = [_check_vcpu(st, size) for st in snap.vcpus]
    for v, st in zip(m.vcpus, snap.vcpus, strict=True):
        _require(st.index == v.fd.index, f"vcpu{v.fd.index}: state of vcpu{st.index}")
    vm = _check_vm(snap.vm)
    restore_parts(m.devices, snap.devices)
    _apply_vm(m.vm, vm)
    notes = [
        _apply_vcpu(v.fd, st, s, size)
        for v, st, s in zip(m.vcpus, snap.vcpus, vcpus, strict=True)
    ]
    return RestoreNotes(
        msrs_readonly=tuple(sorted({i for n in notes for i in n.msrs_readonly})),
        msrs_unreadable=tuple(sorted({i for n in notes for i in n.msrs_unreadable})),
    )


# --- the CPU a snapshot can resume on -----------------------------------------------


def host_cpu(kvm: Kvm) -> HostCpu:
    """This host's CPU as KVM offers it to guests."""
    vendor = ""
    signature = 0
    for e in kvm.supported_cpuid():
        if e.function == 0 and e.index == 0:
            vendor = b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(
                "ascii", "replace"
            )
        elif e.function == 1:
            signature = e.eax
    return HostCpu(vendor=vendor, signature=signature, xsave_size=kvm.xsave_size())


def _describe(cpu: HostCpu) -> str:
    family = (cpu.signature >> 8) & 0xF
    if family == 0xF:
        family += (cpu.signature >> 20) & 0xFF
    model = (cpu.signature >> 4) & 0xF | ((cpu.signature >> 16) & 0xF) << 4
    return f"{cpu.vendor} family {family:#x} model {model:#x} stepping {cpu.signature & 0xF}"


def check_host_cpu(saved: HostCpu, here: HostCpu) -> None:
    """Refuse a snapshot taken on another kind of CPU: guest code already chose its code
    paths from CPUID (instruction sets, errata) and must find the same CPU."""
    _require(isinstance(saved, HostCpu), "host cpu: not a HostCpu")
    if (saved.vendor, saved.signature) != (here.vendor, here.signature):
        raise SnapshotError(
            f"the snapshot was taken on {_describe(saved)}; this host is {_describe(here)}"
        )
    if saved.xsave_size > here.xsave_size:
        raise SnapshotError(
            f"the snapshot's XSAVE state is {saved.xsave_size} bytes, this host's "
            f"{here.xsave_size}: it has CPU state this host cannot hold"
        )
