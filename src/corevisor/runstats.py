"""One run's statistics: KVM's binary statistics and corevisor's own exit counts.

``corevisor run --stats`` prints a summary per machine on stderr when the run ends;
``--stats-json PATH`` writes the same numbers, and every other statistic KVM offers, as
one JSON document (its structure: docs/stats.md). Both work for a single guest and for
every partition of a system file (one record per machine, so a restarted partition has
one per boot).

How: builder.attach_stats makes a StatsCollector while the machine is built. It opens
the VM's and each vCPU's stats fd then, before any vCPU runs (KVM_GET_STATS_FD on a vCPU
takes the vCPU's mutex, which KVM_RUN holds while the guest runs or halts), and reads
them once, as the machine closes: after its vCPU threads have stopped, before their fds
close. Nothing is read while the guest runs, and the vCPU loop only keeps the counters
it already had (vcpu.py: exits in total, MMIO exits, rarer exits by reason).

What does not live here: the stats file format (kvm/stats.py), counting exits (vcpu.py),
the command-line flags (cli.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corevisor.errors import CorevisorError
from corevisor.kvm.bindings import Cap, ExitReason
from corevisor.kvm.stats import StatDesc, StatsFile

if TYPE_CHECKING:
    from corevisor.machine import Machine
    from corevisor.vcpu import Vcpu

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Stat:
    """One KVM statistic's value with its descriptor."""

    desc: StatDesc
    value: int | tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        d = self.desc
        out: dict[str, Any] = {
            "value": list(self.value) if isinstance(self.value, tuple) else self.value,
            "type": d.type,
            "unit": d.unit,
            "base": d.base,
            "exponent": d.exponent,
        }
        if d.type == "linear-histogram":
            out["bucket_size"] = d.bucket_size
        return out


@dataclass(frozen=True)
class ExitCounts:
    """corevisor's own count of one vCPU's returns from KVM_RUN (interrupted runs excluded)."""

    exits: int
    io: int
    mmio: int
    other: dict[str, int]  # by KVM_EXIT_* name: HLT, SHUTDOWN, DEBUG, ...

    @classmethod
    def of(cls, vcpu: Vcpu) -> ExitCounts:
        """From the vCPU's counters; I/O exits are the rest, so the I/O path counts nothing."""
        other = {_reason_name(r): n for r, n in sorted(vcpu.other_exits.items())}
        io = vcpu.exits - vcpu.mmio_exits - sum(other.values())
        return cls(vcpu.exits, io, vcpu.mmio_exits, other)

    def to_json(self) -> dict[str, Any]:
        return {"exits": self.exits, "io": self.io, "mmio": self.mmio, "other": self.other}


def _reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return f"EXIT_{reason}"


@dataclass(frozen=True)
class VcpuRun:
    index: int
    id: str  # KVM's id string, "kvm-PID/vcpu-N"; "" without binary stats
    corevisor: ExitCounts
    stats: dict[str, Stat]


@dataclass(frozen=True)
class MachineRun:
    """Everything --stats knows about one machine's run, read as it closed."""

    partition: str
    outcome: dict[str, Any]  # kind, message, code of the machine's StopReport
    vm_id: str
    vm: dict[str, Stat]
    vcpus: tuple[VcpuRun, ...]
    unhandled_pio: int  # port accesses no device claimed (each was an exit too)

    def totals(self) -> dict[str, int]:
        """Scalar statistics of the whole machine: the VM's, plus each vCPU counter
        summed over the vCPUs (a peak: the largest); a vCPU name the VM also has gets
        the prefix "vcpu.". corevisor's own counts are there as "corevisor.*"."""
        out = {name: s.value for name, s in self.vm.items() if isinstance(s.value, int)}
        for v in self.vcpus:
            for name, s in v.stats.items():
                if not isinstance(s.value, int) or s.desc.type not in ("cumulative", "peak"):
                    continue
                key = f"vcpu.{name}" if name in self.vm else name
                seen = out.get(key, 0)
                out[key] = max(seen, s.value) if s.desc.type == "peak" else seen + s.value
        for v in self.vcpus:
            for key, n in (
                ("exits", v.corevisor.exits),
                ("io", v.corevisor.io),
                ("mmio", v.corevisor.mmio),
                *v.corevisor.other.items(),
            ):
                out[f"corevisor.{key}"] = out.get(f"corevisor.{key}", 0) + n
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "totals": self.totals(),
            "corevisor": {"unhandled_pio": self.unhandled_pio},
            "vm": {"id": self.vm_id, "stats": {n: s.to_json() for n, s in self.vm.items()}},
            "vcpus": [
                {
                    "index": v.index,
                    "id": v.id,
                    "corevisor": v.corevisor.to_json(),
                    "stats": {n: s.to_json() for n, s in v.stats.items()},
                }
                for v in self.vcpus
            ],
        }


def _snapshot(f: StatsFile | None) -> dict[str, Stat]:
    if f is None:
        return {}
    values = f.read()
    return {d.name: Stat(d, values[d.name]) for d in f.descriptors}


class StatsCollector:
    """A machine's stats fds, opened at build time and read once when it closes."""

    def __init__(self, machine: Machine, sink: Callable[[MachineRun], None]) -> None:
        self.machine = machine
        self.sink = sink
        self.vm: StatsFile | None = None
        self.vcpus: list[StatsFile | None] = [None] * len(machine.vcpus)
        if not machine.kvm.check_extension(Cap.BINARY_STATS_FD):
            return  # corevisor's own counters only; the summary says so
        try:
            self.vm = StatsFile(machine.vm.stats_fd())
            for i, v in enumerate(machine.vcpus):
                self.vcpus[i] = StatsFile(v.fd.stats_fd())
        except BaseException:
            self._release()  # not yet a closer of the machine: nothing else would
            raise

    def collect(self) -> MachineRun:
        m = self.machine
        r = m.report
        outcome = {"kind": r.kind, "message": r.message, "code": r.code} if r else {}
        vcpus = tuple(
            VcpuRun(v.index, f.id if f else "", ExitCounts.of(v), _snapshot(f))
            for v, f in zip(m.vcpus, self.vcpus, strict=True)
        )
        vm_id = self.vm.id if self.vm else ""
        return MachineRun(m.name, outcome, vm_id, _snapshot(self.vm), vcpus, m.pio.unhandled)

    def close(self) -> None:
        """The machine is closing (its vCPUs have stopped): read, hand over, release."""
        try:
            self.sink(self.collect())
        finally:
            self._release()

    def _release(self) -> None:
        for f in (self.vm, *self.vcpus):
            if f is not None:
                f.close()


# ---------------------------------------------------------------------- the text summary

# (label, headline statistic or None, [(part label, statistic), ...]); a statistic
# this kernel lacks is left out, and so is a part whose count is 0.
_LINES: tuple[tuple[str, str | None, tuple[tuple[str, str], ...]], ...] = (
    (
        "exits in KVM",
        "exits",
        (
            ("io", "io_exits"),
            ("mmio", "mmio_exits"),
            ("halt", "halt_exits"),
            ("irq", "irq_exits"),
            ("irq-window", "irq_window_exits"),
            ("nmi-window", "nmi_window_exits"),
            ("signal", "signal_exits"),
            ("request-irq", "request_irq_exits"),
            ("notify-window", "notify_window_exits"),
        ),
    ),
    (
        "page faults",
        "pf_taken",
        (
            ("fixed", "pf_fixed"),
            ("emulated", "pf_emulate"),
            ("spurious", "pf_spurious"),
            ("fast", "pf_fast"),
            ("mmio sptes", "pf_mmio_spte_created"),
            ("to the guest", "pf_guest"),
        ),
    ),
    (
        "shadow MMU",
        None,
        (
            ("pages created", "mmu_cache_miss"),
            ("zapped", "mmu_shadow_zapped"),
            ("pte writes", "mmu_pte_write"),
            ("pde zapped", "mmu_pde_zapped"),
            ("flooded", "mmu_flooded"),
            ("recycled", "mmu_recycled"),
            ("unsync now", "mmu_unsync"),
        ),
    ),
    ("mappings now", None, (("4K", "pages_4k"), ("2M", "pages_2m"), ("1G", "pages_1g"))),
    (
        "TLB flushes",
        "tlb_flush",
        (
            ("remote", "remote_tlb_flush"),
            ("remote requests", "remote_tlb_flush_requests"),
            ("invlpg", "invlpg"),
        ),
    ),
    (
        "halt polling",
        None,
        (
            ("tried", "halt_attempted_poll"),
            ("succeeded", "halt_successful_poll"),
            ("invalid", "halt_poll_invalid"),
            ("wake-ups", "halt_wakeup"),
            ("polled ok", "halt_poll_success_ns"),
            ("polled in vain", "halt_poll_fail_ns"),
            ("waited", "halt_wait_ns"),
        ),
    ),
    (
        "emulation",
        "insn_emulation",
        (
            ("failed", "insn_emulation_fail"),
            ("hypercalls", "hypercalls"),
            ("irq injections", "irq_injections"),
        ),
    ),
)


def format_value(stat: Stat, value: int) -> str:
    """A scalar in its unit: seconds as ms, bytes as KiB/MiB, counts as they are."""
    d = stat.desc
    if d.unit == "seconds":
        return f"{value * d.scale * 1e3:.3f} ms"
    if d.unit == "bytes":
        n = value * d.scale
        return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
    if d.unit == "cycles":
        return f"{value * d.scale:.0f} cycles"
    return str(value)


def _stat_of(run: MachineRun, name: str) -> Stat | None:
    if name in run.vm:
        return run.vm[name]
    return next((v.stats[name] for v in run.vcpus if name in v.stats), None)


def _total(totals: dict[str, int], name: str) -> int:
    return totals.get(name, totals.get(f"vcpu.{name}", 0))


def _line(
    run: MachineRun,
    totals: dict[str, int],
    spec: tuple[str, str | None, tuple[tuple[str, str], ...]],
) -> str | None:
    label, head, parts = spec
    shown = []
    for part, name in parts:
        stat = _stat_of(run, name)
        if stat is not None and _total(totals, name):
            shown.append(f"{part} {format_value(stat, _total(totals, name))}")
    head_stat = _stat_of(run, head) if head else None
    if head is not None and head_stat is not None:
        text = format_value(head_stat, _total(totals, head))
        return f"  {label:18} {text}" + (f": {', '.join(shown)}" if shown else "")
    if not shown:
        return None
    return f"  {label:18} " + ", ".join(shown)


def summary(run: MachineRun, kvm: str = "", mmu: str = "") -> str:
    """The --stats text for one machine (a few lines; the JSON has everything)."""
    n = len(run.vcpus)
    where = f"; KVM {kvm}, MMU {mmu}" if kvm else ""
    lines = [f"corevisor: stats: {run.partition}: {n} vCPU{'s' if n != 1 else ''}{where}"]
    totals = run.totals()
    own = [f"io {totals.get('corevisor.io', 0)}", f"mmio {totals.get('corevisor.mmio', 0)}"]
    own += [f"{k} {v}" for k, v in sorted(_other_totals(run).items())]
    lines.append(
        f"  {'exits to corevisor':18} {totals.get('corevisor.exits', 0)}: " + ", ".join(own)
    )
    if n > 1:
        per = ", ".join(f"vcpu{v.index} {v.corevisor.exits}" for v in run.vcpus)
        lines.append(f"  {'  per vCPU':18} {per}")
    if not run.vm and not any(v.stats for v in run.vcpus):
        lines.append("  (this host's KVM has no binary statistics: KVM_CAP_BINARY_STATS_FD)")
    for spec in _LINES:
        line = _line(run, totals, spec)
        if line is not None:
            lines.append(line)
    return "\n".join(lines)


def _other_totals(run: MachineRun) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in run.vcpus:
        for k, n in v.corevisor.other.items():
            out[k] = out.get(k, 0) + n
    return out


# ---------------------------------------------------------------------- the JSON document


def document(
    runs: Iterable[MachineRun], partitions: Iterable[str], host: dict[str, Any]
) -> dict[str, Any]:
    """The --stats-json document: partitions in config order, each with its runs."""
    by_name: dict[str, list[MachineRun]] = {name: [] for name in partitions}
    for r in runs:
        by_name.setdefault(r.partition, []).append(r)
    return {
        "format": "corevisor-stats",
        "version": FORMAT_VERSION,
        "host": host,
        "partitions": [
            {"name": name, "runs": [r.to_json() for r in rs]} for name, rs in by_name.items()
        ],
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write the document; a path that cannot be written is a user error naming it."""
    try:
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise CorevisorError(f"--stats-json {path}: {e.strerror or e}") from None


def host_summary() -> dict[str, Any]:
    """The host facts a reader of the numbers needs (kvm/host.py has the rest)."""
    from corevisor.kvm import host

    h = host.detect()
    return {"kvm": h.kvm, "mmu": h.mmu, "tdp_mmu": h.tdp_mmu, "kernel": h.kernel, "cores": h.cores}
