"""The daemon's metrics: gathered from the System's own counters, written as Prometheus text.

Every name starts with ``corevisor_``, values are in base units (bytes, seconds),
counters end in ``_total``; labels are ``partition``, ``vcpu``, ``reason``, ``device``
(and ``channel``, ``state``). What is counted, and where the number comes from:

- vCPU exits by reason (vcpu.py's loop, as runstats.ExitCounts reads them: io is what is
  left of the total once MMIO and the rarer reasons, counted off the hot path, are taken
  out), vCPU thread CPU time
  (/proc/self/task/TID/stat), the host core each vCPU last ran on;
- KVM's binary statistics per VM and per vCPU, where the host has them (kvm_families;
  helper "stats" builds the reader, kvm/stats.py);
- virtio requests and bytes each way per device (virtio/device.py), serial output bytes
  (the daemon's console.SerialTap), port writes no device claimed;
- doorbells the VMM passed on per channel and receiving partition (channel.py: the
  kernel path never reaches userspace, so only HC_CHANNEL_NOTIFY and doorbell = "thread"
  rings are counted);
- restarts (system.py), crashes and watchdog expiries (the daemon's event log);
- guest memory per partition and the VMM's resident memory (/proc/self/statm).

A partition's counters survive its machines: when a machine closes (a restart, the
guest's end, a stop), its last counts are kept (Retired) and added to those of the next
one, so a partition's counters only grow for as long as the daemon knows the partition.
Gauges (the host core a vCPU ran on) exist only while a machine does. Collecting reads plain ints
other threads write (atomic under the GIL) and a few small /proc files: no lock a vCPU
waits on. The text format is written here rather than with prometheus_client, whose
import alone costs ~100 ms; tests parse it with prometheus_client's parser.

What does not live here: the endpoint (routes.py), the counters themselves.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corevisor.errors import CorevisorError
from corevisor.runstats import ExitCounts

if TYPE_CHECKING:
    from corevisor.api.daemon import Daemon
    from corevisor.kvm.stats import StatDesc, StatsFile
    from corevisor.machine import Machine
    from corevisor.runstats import MachineRun

__all__ = ["Family", "collect", "to_text", "to_json", "thread_cpu", "vmm_rss", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "corevisor_"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric: its name (with _total for a counter), type, help, and samples by labels
    (adding to a sample's labels again adds to its value)."""

    name: str
    kind: str  # "counter" | "gauge"
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)

    def add(self, value: float, **labels: str) -> None:
        key = tuple(labels.items())
        self.samples[key] = self.samples.get(key, 0) + value


# ---------------------------------------------------------------------- /proc


def thread_cpu(tid: int) -> tuple[int, float] | None:
    """(the core the thread last ran on, its user + system CPU seconds), None if gone."""
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: fields restart after the last ")"
    fields = text[text.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15
    return int(fields[36]), (utime + stime) / _TICK  # field 39: processor


def vmm_rss() -> int:
    """The daemon's resident memory in bytes."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


# ---------------------------------------------------------------------- collecting


class _Families:
    """The families of one scrape, by name, in the order they were first used."""

    def __init__(self) -> None:
        self._by_name: dict[str, Family] = {}

    def __call__(self, name: str, kind: str, help: str) -> Family:
        full = PREFIX + name
        family = self._by_name.get(full)
        if family is None:
            family = self._by_name[full] = Family(full, kind, help)
        return family

    def all(self) -> list[Family]:
        return list(self._by_name.values())


class Retired:
    """The counters of machines that have closed, by partition (see the module docstring).

    ``watch(name, m)`` registers m's last counts to be kept when it closes (a closer of
    the machine: it runs after the vCPU threads have stopped).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families = _Families()
        self._watched: weakref.WeakSet[Machine] = weakref.WeakSet()

    def watch(self, name: str, m: Machine) -> None:
        with self._lock:
            if m in self._watched:
                return
            self._watched.add(m)
        m.at_close(lambda: self._retire(name, m))

    def _retire(self, name: str, m: Machine) -> None:
        last = _Families()
        _machine(last, name, m, live=False)
        self._keep(last)

    def _keep(self, last: _Families) -> None:
        with self._lock:
            for fam in last.all():
                if fam.kind != "counter":
                    continue
                into = self._families(fam.name.removeprefix(PREFIX), fam.kind, fam.help)
                for labels, value in fam.samples.items():
                    into.add(value, **dict(labels))

    def retire_run(self, run: MachineRun) -> None:
        """A closed machine's KVM statistics (the cumulative ones are kept)."""
        last = _Families()
        kvm_retired(last, run)
        self._keep(last)

    def forget(self, name: str) -> None:
        """The partition was removed: its counters go with it."""
        with self._lock:
            for fam in self._families.all():
                for labels in [k for k in fam.samples if ("partition", name) in k]:
                    del fam.samples[labels]

    def add_to(self, f: _Families) -> None:
        with self._lock:
            for fam in self._families.all():
                into = f(fam.name.removeprefix(PREFIX), fam.kind, fam.help)
                for labels, value in fam.samples.items():
                    into.add(value, **dict(labels))


def collect(daemon: Daemon) -> list[Family]:
    """Every metric of the daemon, now."""
    f = _Families()
    system = daemon.system
    counts = daemon.events.counts
    for info in system.partitions():
        name = info.name
        f("partition_state", "gauge", "1 for the partition's current state").add(
            1, partition=name, state=info.state.value)
        f("partition_restarts_total", "counter", "restarts, by the policy or the API").add(
            info.restarts, partition=name)
        f("partition_crashes_total", "counter", "abnormal stops (crash events)").add(
            counts[(name, "crash")], partition=name)
        f("watchdog_expiries_total", "counter", "watchdog expiries").add(
            counts[(name, "watchdog")], partition=name)
        f("guest_memory_bytes", "gauge", "guest RAM configured").add(
            info.config.memory, partition=name)
        try:
            tap = system.serial(name)
        except Exception:  # noqa: BLE001 - removed meanwhile, or not tapped
            tap = None
        if tap is not None:
            f("serial_output_bytes_total", "counter", "bytes the guest wrote to its serial line"
              ).add(tap.written, partition=name)
        m = system.machine(name)
        if m is not None:
            _machine(f, name, m)
    daemon.retired.add_to(f)
    for ch in system.channels():
        for receiver in ch.config.between:
            f("channel_doorbells_total", "counter",
              "doorbells the VMM passed on (HC_CHANNEL_NOTIFY, doorbell = \"thread\"), by "
              "receiving partition; kernel-path rings are not seen").add(
                ch.passed_on.get(receiver, 0), channel=ch.name, partition=receiver)
    f("vmm_resident_memory_bytes", "gauge", "resident memory of the corevisor daemon").add(
        vmm_rss())
    f("api_connections", "gauge", "API connections open").add(daemon.server.connections)
    f("start_time_seconds", "gauge", "when the daemon started (Unix time)").add(daemon.started)
    return f.all()


def _machine(f: _Families, name: str, m: Machine, live: bool = True) -> None:
    """One partition's machine: its vCPUs, devices, and KVM's statistics (live: its
    threads still run, so /proc has them)."""
    exits = f("vcpu_exits_total", "counter", "returns from KVM_RUN to corevisor, by exit reason")
    cpu = f("vcpu_cpu_seconds_total", "counter", "CPU time of the vCPU's host thread")
    core = f("vcpu_host_core", "gauge", "the host core the vCPU thread last ran on")
    for v in list(m.vcpus):
        vcpu = str(v.index)
        counts = ExitCounts.of(v)
        exits.add(max(counts.io, 0), partition=name, vcpu=vcpu, reason="io")
        exits.add(counts.mmio, partition=name, vcpu=vcpu, reason="mmio")
        for reason, n in counts.other.items():
            exits.add(n, partition=name, vcpu=vcpu, reason=reason.lower())
        tid = v.native_id
        usage = thread_cpu(tid) if tid is not None and v.alive else None
        if usage is not None:
            core.add(usage[0], partition=name, vcpu=vcpu)
        cpu.add(usage[1] if usage is not None else v.cpu_seconds, partition=name, vcpu=vcpu)
    f("pio_unhandled_total", "counter", "port accesses no device claimed").add(
        m.pio.unhandled, partition=name)
    for dev_name, transport in list(m.devices.items()):
        dev = getattr(transport, "device", None)
        if dev is None or not hasattr(dev, "bytes_to_guest"):
            continue
        f("virtio_requests_total", "counter", "virtio requests completed").add(
            dev.requests, partition=name, device=dev_name)
        f("virtio_from_guest_bytes_total", "counter",
          "bytes the guest handed a virtio device (disk writes, frames sent)").add(
            dev.bytes_from_guest, partition=name, device=dev_name)
        f("virtio_to_guest_bytes_total", "counter",
          "bytes a virtio device wrote into guest buffers (disk reads, frames received)").add(
            dev.bytes_to_guest, partition=name, device=dev_name)
    if live:
        kvm_families(f, name, m)


def kvm_families(f: _Families, name: str, m: Machine) -> None:
    """KVM's binary statistics of the machine (KVM_GET_STATS_FD), read now.

    The files are opened while the machine is built (a vCPU's ioctl would wait for its
    KVM_RUN) by runstats.StatsCollector, which the machine keeps as ``m.stats``; reading
    them takes no lock. Cumulative statistics become counters (``corevisor_kvm_vcpu_
    <name>_total``, in base units: ``halt_wait_ns`` -> ``..._halt_wait_seconds_total``),
    instant and peak ones gauges; histograms are left out. A machine without them (a
    host without KVM_CAP_BINARY_STATS_FD) adds nothing.
    """
    collector = m.stats
    if collector is None:
        return
    files: list[tuple[str, dict[str, str], StatsFile | None]] = [("vm", {}, collector.vm)]
    files += [("vcpu", {"vcpu": str(i)}, sf) for i, sf in enumerate(collector.vcpus)]
    for scope, labels, sf in files:
        if sf is None or sf.fd < 0:
            continue
        try:
            values = sf.read()
        except CorevisorError:  # closed meanwhile (the machine is going away)
            continue
        for desc in sf.descriptors:
            _kvm_sample(f, scope, desc, values.get(desc.name), {"partition": name, **labels})


def kvm_retired(f: _Families, run: MachineRun) -> None:
    """The KVM statistics of a machine that has closed (read as it closed: runstats)."""
    for stat in run.vm.values():
        _kvm_sample(f, "vm", stat.desc, stat.value, {"partition": run.partition})
    for v in run.vcpus:
        for stat in v.stats.values():
            _kvm_sample(f, "vcpu", stat.desc, stat.value,
                        {"partition": run.partition, "vcpu": str(v.index)})


def _kvm_sample(
    f: _Families, scope: str, desc: StatDesc, value: object, labels: dict[str, str]
) -> None:
    metric = _kvm_metric(scope, desc.name, desc)
    if metric is None or not isinstance(value, int):
        return
    full, kind, scale = metric
    f(full, kind, f"KVM statistic {desc.name} ({scope}, {desc.type})").add(
        value * scale, **labels)


_UNIT_SUFFIXES = {"seconds": ("_seconds", ("_ns", "_us", "_ms")), "bytes": ("_bytes", ())}


def _kvm_metric(scope: str, stat: str, desc: StatDesc) -> tuple[str, str, float] | None:
    """(metric name without the prefix, kind, scale to base units) of one KVM statistic."""
    if desc.is_histogram:
        return None
    base = stat
    suffix = ""
    unit = _UNIT_SUFFIXES.get(desc.unit)
    if unit is not None:
        suffix, strip = unit
        for s in strip:
            base = base.removesuffix(s)
        base = base.removesuffix(suffix)
    name = f"kvm_{scope}_{base}{suffix}"
    if desc.type == "cumulative":
        return name + "_total", "counter", desc.scale
    return name, "gauge", desc.scale


# ---------------------------------------------------------------------- writing


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def to_text(families: Iterable[Family]) -> str:
    """The Prometheus text exposition format, version 0.0.4."""
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help.replace(chr(92), chr(92) * 2)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples.items():
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{fam.name}{{{inner}}} {_number(value)}" if inner
                         else f"{fam.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def to_json(families: Iterable[Family]) -> dict[str, Any]:
    """The same metrics as JSON (what `corevisor top` reads)."""
    return {
        "metrics": [
            {
                "name": fam.name,
                "type": fam.kind,
                "help": fam.help,
                "samples": [{"labels": dict(labels), "value": value}
                            for labels, value in fam.samples.items()],
            }
            for fam in families
        ]
    }
