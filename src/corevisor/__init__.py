"""corevisor: a multicore partitioning hypervisor written in Python on Linux KVM.

The curated public API, imported lazily so `import corevisor` stays cheap and a
partial install still imports; everything not listed here is internal.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "PartitionSpec": "corevisor.spec",
    "ChannelSpec": "corevisor.spec",
    "SystemSpec": "corevisor.spec",
    "PartitionConfig": "corevisor.config",
    "SystemConfig": "corevisor.config",
    "load_config": "corevisor.config",
    "partition_from_args": "corevisor.config",
    "validate_system": "corevisor.config",
    "validate_addition": "corevisor.config",
    "HostFacts": "corevisor.config",
    "build": "corevisor.builder",
    "Machine": "corevisor.machine",
    "System": "corevisor.system",
    "PartitionState": "corevisor.system",
    "MachineState": "corevisor.machine",
    "CorevisorError": "corevisor.errors",
    "ConfigError": "corevisor.errors",
    "KvmError": "corevisor.errors",
    "GuestMemoryError": "corevisor.errors",
    "LoaderError": "corevisor.errors",
    "DeviceError": "corevisor.errors",
    "GuestStopped": "corevisor.errors",
    "StateError": "corevisor.errors",
    "NotFoundError": "corevisor.errors",
    "SnapshotError": "corevisor.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'corevisor' has no attribute {name!r}")
