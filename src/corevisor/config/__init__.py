"""Every way into a system spec (spec.py): a system file, the `run` options, a JSON body.

- toml.py: a system file (or a parsed JSON document) -> SystemSpec, validated;
- args.py: the `corevisor run` options -> one validated PartitionSpec;
- validate.py: the pure checks all of them share, with the host passed in (host.py);
- parse.py: the written forms of values (64M, 0-3, file:PATH, HOST:PORT);
- files.py: the checks that look at the file system (image, initrd, log_dir);
- schema.py: the JSON schema of a partition and of a system, derived from spec.py.

The names below are what the rest of corevisor imports, loaded on first use so that
importing one submodule (files.py, parse.py) does not import them all: `corevisor run`
start-up is benchmarked. PartitionConfig, ChannelConfig and SystemConfig are the spec
types under their earlier names.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "load_config": ("corevisor.config.toml", "load_config"),
    "partition_from_args": ("corevisor.config.args", "partition_from_args"),
    "validate_partition": ("corevisor.config.validate", "validate_partition"),
    "validate_system": ("corevisor.config.validate", "validate_system"),
    "validate_addition": ("corevisor.config.validate", "validate_addition"),
    "HostFacts": ("corevisor.config.host", "HostFacts"),
    "gather": ("corevisor.config.host", "gather"),
    "parse_size": ("corevisor.config.parse", "parse_size"),
    "parse_cpu_list": ("corevisor.config.parse", "parse_cpu_list"),
    "parse_host_port": ("corevisor.config.parse", "parse_host_port"),
    "format_size": ("corevisor.config.parse", "format_size"),
    "format_cpu_list": ("corevisor.config.parse", "format_cpu_list"),
    "PartitionConfig": ("corevisor.spec", "PartitionSpec"),
    "ChannelConfig": ("corevisor.spec", "ChannelSpec"),
    "SystemConfig": ("corevisor.spec", "SystemSpec"),
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        module, attr = _NAMES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'corevisor.config' has no attribute {name!r}")
