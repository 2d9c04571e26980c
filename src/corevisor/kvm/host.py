"""What this host's KVM is: its flavour, MMU mode, capabilities, cores and isolation.

The one home for host facts that change what corevisor does or how its figures read:

- which module provides /dev/kvm: PVM (``kvm_pvm``: no VT-x/AMD-V, guest kernel code
  emulated, see HOST.md), ``kvm_intel`` (VT-x) or ``kvm_amd`` (AMD-V);
- how guest memory is virtualized: shadow paging, or hardware two-dimensional paging
  (Intel EPT, AMD NPT), and whether KVM's TDP MMU manages it;
- the KVM capabilities corevisor uses (KVM_CHECK_EXTENSION) and what for;
- the host's cores, those this process may run on, isolated and nohz_full cores;
- the CPU's virtualization flags (vmx, svm, ept, npt, hypervisor).

``detect()`` gathers them once per process into a frozen ``HostInfo``. Code with
PVM-only behaviour asks ``detect().is_pvm`` while it sets up, never on a vCPU's hot path.
``corevisor host`` prints ``format_report()`` or ``to_json()``.

What does not live here: the host facts validation needs and checking a configuration
against them (config/host.py, config/validate.py: memory, pinned cores; cores and
affinity are read there and reused here), the ioctls themselves (kvm/ioctls.py), KVM's
run-time counters (kvm/stats.py).
"""

from __future__ import annotations

import functools
import os
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from corevisor.config.host import gather
from corevisor.config.parse import format_cpu_list, parse_cpu_list
from corevisor.errors import ConfigError, KvmError
from corevisor.kvm.bindings import Cap
from corevisor.kvm.ioctls import Kvm

# The vendor modules, in the order they are looked for: KVM loads one at a time.
VENDOR_MODULES = {"kvm_pvm": "pvm", "kvm_intel": "kvm_intel", "kvm_amd": "kvm_amd"}

# What corevisor asks KVM_CHECK_EXTENSION for, and why (the report's last column).
CAPABILITIES: tuple[tuple[Cap, str], ...] = (
    (Cap.IRQCHIP, "in-kernel PIC, IOAPIC and LAPIC (required)"),
    (Cap.PIT2, "in-kernel PIT (required)"),
    (Cap.USER_MEMORY, "guest RAM in memory slots (required)"),
    (Cap.IMMEDIATE_EXIT, "race-free vCPU pause (required)"),
    (Cap.MP_STATE, "INIT/SIPI state of application processors (required)"),
    (Cap.NR_VCPUS, "recommended vCPUs per VM"),
    (Cap.MAX_VCPUS, "most vCPUs per VM (the --cpus limit)"),
    (Cap.NR_MEMSLOTS, "memory slots per VM (RAM, channels)"),
    (Cap.SET_TSS_ADDR, "real-mode TSS (VT-x)"),
    (Cap.GET_TSC_KHZ, "TSC frequency for the guest's CPUID"),
    (Cap.IOEVENTFD, "doorbells and virtio kicks served in the kernel"),
    (Cap.IRQFD, "interrupts from eventfds (doorbells, virtio)"),
    (Cap.READONLY_MEM, "one-way channels"),
    (Cap.X86_DISABLE_EXITS, 'exits = "disabled" (bitmask of HLT, PAUSE, ...)'),
    (Cap.HALT_POLL, 'exits = "halt-poll"'),
    (Cap.SET_GUEST_DEBUG, "GDB: breakpoints, single-step"),
    (Cap.SET_GUEST_DEBUG2, "GDB: accepted KVM_GUESTDBG_* flags (bitmask)"),
    (Cap.BINARY_STATS_FD, "run --stats (KVM_GET_STATS_FD)"),
)
# What builder.py refuses to run without, in the order it checks them.
REQUIRED = (Cap.IRQCHIP, Cap.USER_MEMORY, Cap.IMMEDIATE_EXIT, Cap.PIT2, Cap.MP_STATE)

_MMU_TEXT = {
    "shadow": (
        "shadow paging",
        "KVM keeps shadow page tables in step with the guest's: guest page faults, "
        "page-table writes, CR3 writes and INVLPG trap to KVM",
    ),
    "ept": (
        "Intel EPT, extended page tables",
        "the CPU walks the guest's page tables and KVM's guest-physical map itself: "
        "guest page faults and CR3 writes stay in the guest",
    ),
    "npt": (
        "AMD NPT, nested paging",
        "the CPU walks the guest's page tables and KVM's guest-physical map itself: "
        "guest page faults and CR3 writes stay in the guest",
    ),
    "none": ("none", "no KVM on this host"),
}
_KVM_TEXT = {
    "pvm": "PVM (module kvm_pvm): no VT-x/AMD-V; guest CPL3 runs natively, CPL0 is "
    "emulated by the host kernel",
    "kvm_intel": "kvm_intel: Intel VT-x",
    "kvm_amd": "kvm_amd: AMD-V (SVM)",
    "unknown": "a KVM whose vendor module corevisor does not know",
    "none": "none: no KVM module is loaded",
}


@dataclass(frozen=True)
class Capability:
    """One KVM_CHECK_EXTENSION answer (0: absent; some answers are counts or bitmasks)."""

    name: str
    number: int
    value: int
    purpose: str


@dataclass(frozen=True)
class HostInfo:
    """This host's KVM and CPUs, as corevisor sees them (see the module docstring)."""

    kvm: str  # "pvm" | "kvm_intel" | "kvm_amd" | "unknown" | "none"
    module: str  # the vendor module providing /dev/kvm, "" if none
    mmu: str  # "shadow" | "ept" | "npt" | "none"
    tdp_mmu: bool | None  # kvm.tdp_mmu; only used with EPT/NPT
    nested: bool | None  # the vendor module's "nested" parameter (VMs inside guests)
    dev_kvm: str  # "" if /dev/kvm opened with API 12, else why it did not
    api_version: int | None
    capabilities: tuple[Capability, ...]
    cores: int  # CPUs the kernel knows
    online: tuple[int, ...]
    allowed: tuple[int, ...]  # this process's CPU affinity
    isolated: tuple[int, ...]  # isolcpus= (domain isolation)
    nohz_full: tuple[int, ...] | None  # None: the kernel has no nohz_full support
    cpu_vendor: str
    cpu_model: str
    virt_flags: tuple[str, ...]  # which of vmx, svm, ept, npt, hypervisor the CPU shows
    kernel: str

    @property
    def is_pvm(self) -> bool:
        """PVM: guest CPL0 emulated, no hardware virtualization (HOST.md)."""
        return self.kvm == "pvm"

    @property
    def hardware_assisted(self) -> bool:
        """VT-x or AMD-V: guest kernel code runs natively."""
        return self.kvm in ("kvm_intel", "kvm_amd")

    @property
    def nested_paging(self) -> bool:
        """Guest-physical memory translated by the CPU (EPT or NPT), not shadowed."""
        return self.mmu in ("ept", "npt")

    @property
    def shadow_paging(self) -> bool:
        return self.mmu == "shadow"

    def cap(self, cap: Cap) -> int:
        """A capability's answer from the report (0 if absent or not asked)."""
        for c in self.capabilities:
            if c.number == int(cap):
                return c.value
        return 0

    def to_json(self) -> dict[str, Any]:
        """Plain values for `corevisor host --json` and the --stats-json "host" key."""
        data = asdict(self)
        data["capabilities"] = {c.name: c.value for c in self.capabilities}
        for key in ("is_pvm", "hardware_assisted", "nested_paging", "shadow_paging"):
            data[key] = getattr(self, key)
        return data


# ---------------------------------------------------------------------- reading the host


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _flag(text: str | None) -> bool | None:
    """A module parameter that is a bool ("Y"/"N") or an int used as one ("1"/"0")."""
    if text is None or not text:
        return None
    return text[0] in "Yy1"


def _cpus(path: Path) -> tuple[int, ...] | None:
    """A sysfs CPU list ("0-3,6", or empty); None if the file does not exist."""
    text = _read(path)
    if text is None:
        return None
    if not text or text == "(null)":
        return ()
    try:
        return parse_cpu_list(text, str(path))
    except ConfigError:
        return ()


def _cpuinfo(root: Path) -> tuple[str, str, tuple[str, ...]]:
    """(vendor, model name, virtualization flags) of the first CPU in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        if not line.strip():
            break  # first processor only
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split()) | set(fields.get("vmx flags", "").split())
    wanted = ("vmx", "svm", "ept", "npt", "hypervisor")
    return (
        fields.get("vendor_id", ""),
        fields.get("model name", ""),
        tuple(f for f in wanted if f in flags),
    )


def _mmu(kvm: str, params: Path) -> str:
    if kvm == "pvm":
        return "shadow"  # PVM has no two-dimensional paging to use
    if kvm == "kvm_intel":
        return "ept" if _flag(_read(params / "ept")) else "shadow"
    if kvm == "kvm_amd":
        return "npt" if _flag(_read(params / "npt")) else "shadow"
    return "none" if kvm == "none" else "shadow"


def _capabilities(dev: str) -> tuple[str, int | None, tuple[Capability, ...]]:
    """(why /dev/kvm is unusable or "", API version, capability answers)."""
    try:
        kvm = Kvm(dev)
    except KvmError as e:
        return str(e), None, ()
    try:
        caps = tuple(
            Capability(cap.name, int(cap), kvm.check_extension(cap), purpose)
            for cap, purpose in CAPABILITIES
        )
    finally:
        kvm.close()
    return "", 12, caps


def probe(dev: str = "/dev/kvm", root: Path = Path("/")) -> HostInfo:
    """Read the host now (uncached); root lets the sysfs/procfs reads move for a chroot."""
    sysmod = root / "sys/module"
    module = next((m for m in VENDOR_MODULES if (sysmod / m).is_dir()), "")
    if module:
        kvm = VENDOR_MODULES[module]
    else:
        kvm = "unknown" if (sysmod / "kvm").is_dir() or os.path.exists(dev) else "none"
    params = sysmod / module / "parameters"
    dev_kvm, api, caps = _capabilities(dev)
    cpu = root / "sys/devices/system/cpu"
    vendor, model, virt = _cpuinfo(root)
    facts = gather()  # cores and affinity, as validation sees them (config/host.py)
    cores = facts.cores
    return HostInfo(
        kvm=kvm,
        module=module,
        mmu=_mmu(kvm, params),
        tdp_mmu=_flag(_read(sysmod / "kvm/parameters/tdp_mmu")),
        nested=_flag(_read(params / "nested")) if module in ("kvm_intel", "kvm_amd") else None,
        dev_kvm=dev_kvm,
        api_version=api,
        capabilities=caps,
        cores=cores,
        online=_cpus(cpu / "online") or tuple(range(cores)),
        allowed=tuple(sorted(facts.affinity)),
        isolated=_cpus(cpu / "isolated") or (),
        nohz_full=_cpus(cpu / "nohz_full"),
        cpu_vendor=vendor,
        cpu_model=model,
        virt_flags=virt,
        kernel=os.uname().release,
    )


@functools.cache
def detect() -> HostInfo:
    """This host, read once per process (host facts do not change while corevisor runs)."""
    return probe()


# ---------------------------------------------------------------------- the report


def _onoff(value: bool | None) -> str:
    return "unknown" if value is None else ("on" if value else "off")


def _mmu_lines(h: HostInfo) -> list[str]:
    name, how = _MMU_TEXT.get(h.mmu, (h.mmu, ""))
    tdp = f"TDP MMU {_onoff(h.tdp_mmu)}"
    if h.shadow_paging:
        tdp += ", which serves only EPT/NPT"
    return [f"{name} ({tdp})", *textwrap.wrap(how, 86)]


def _virt_line(h: HostInfo) -> str:
    hw = [f for f in h.virt_flags if f in ("vmx", "svm")]
    flags = " ".join(h.virt_flags) or "none"
    note = "" if hw else " (no vmx/svm: no hardware virtualization visible)"
    return f"{flags}{note}"


def _cores_line(h: HostInfo) -> str:
    return (
        f"{h.cores} (online {format_cpu_list(h.online)}; "
        f"corevisor may use {format_cpu_list(h.allowed)})"
    )


def _isolation_line(h: HostInfo) -> str:
    nohz = "unsupported" if h.nohz_full is None else format_cpu_list(h.nohz_full)
    return f"isolcpus {format_cpu_list(h.isolated)}; nohz_full {nohz}"


def format_report(h: HostInfo) -> str:
    """The `corevisor host` text: a few labelled lines, then the capability table."""
    rows = [
        ("KVM", _KVM_TEXT.get(h.kvm, h.kvm)),
        ("/dev/kvm", f"API {h.api_version}" if not h.dev_kvm else f"unusable: {h.dev_kvm}"),
        *(("MMU" if i == 0 else "", line) for i, line in enumerate(_mmu_lines(h))),
        ("nested", _onoff(h.nested) if h.nested is not None else "n/a"),
        ("CPU", f"{h.cpu_vendor} {h.cpu_model}".strip() or "unknown"),
        ("virt flags", _virt_line(h)),
        ("cores", _cores_line(h)),
        ("isolation", _isolation_line(h)),
        ("kernel", h.kernel),
    ]
    lines = [f"{label + ':' if label else '':12}{value}" for label, value in rows]
    if h.capabilities:
        lines.append("capabilities (KVM_CHECK_EXTENSION):")
        width = max(len(c.name) for c in h.capabilities)
        for c in h.capabilities:
            shown = "absent" if c.value == 0 else str(c.value)
            if c.value > 1 and "bitmask" in c.purpose:
                shown = hex(c.value)
            lines.append(f"  {c.name:{width}}  {shown:>8}  {c.purpose}")
        missing = [c.name for c in h.capabilities if not c.value and Cap[c.name] in REQUIRED]
        if missing:
            lines.append(f"corevisor cannot run here: missing {', '.join(missing)}")
    return "\n".join(lines)
