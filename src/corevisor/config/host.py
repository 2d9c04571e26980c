"""HostFacts: what validation needs to know about the host, gathered in one place.

Validation (validate.py) is pure: it takes a HostFacts value and never looks at the
host itself, so a test passes the facts of any host it likes (two cores, 24 MiB free)
and the API checks a new partition against the same facts the system was checked with.
gather() reads the real ones: core count, this process's CPU affinity, /proc/meminfo's
MemTotal and MemAvailable. The KVM vCPU limit needs /dev/kvm open; whoever holds it
(the builder, a daemon) passes it in, and without it validation uses MAX_VCPUS only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["HostFacts", "gather"]


@dataclass(frozen=True)
class HostFacts:
    """The host as validation sees it. None: not known (that check is skipped)."""

    cores: int  # host cores 0..cores-1 exist
    affinity: frozenset[int]  # the cores corevisor may run on (sched_getaffinity)
    mem_total: int | None = None  # bytes: no single partition may be bigger
    mem_available: int | None = None  # bytes the host can give a whole system
    max_vcpus: int | None = None  # KVM_CAP_MAX_VCPUS, when /dev/kvm was asked

    @property
    def available(self) -> tuple[str, int] | None:
        """What a whole system may take, and the /proc/meminfo field it comes from."""
        if self.mem_available is not None:
            return "MemAvailable", self.mem_available
        if self.mem_total is not None:  # kernels before 3.14 have no MemAvailable
            return "MemTotal", self.mem_total
        return None


def _meminfo() -> dict[str, int]:
    """The /proc/meminfo fields in bytes (empty if it cannot be read)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except (OSError, ValueError):
        return {}
    return fields


def gather(max_vcpus: int | None = None) -> HostFacts:
    """The facts of this host, now."""
    meminfo = _meminfo()
    return HostFacts(
        cores=os.cpu_count() or 1,
        affinity=frozenset(os.sched_getaffinity(0)),
        mem_total=meminfo.get("MemTotal"),
        mem_available=meminfo.get("MemAvailable"),
        max_vcpus=max_vcpus,
    )
