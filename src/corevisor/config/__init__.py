"""Every way into a system spec (spec.py): a system file, the `run` options, a JSON body.

- toml.py: a system file (or a parsed JSON document) -> SystemSpec, validated;
- args.py: the `corevisor run` options -> one validated PartitionSpec;
- validate.py: the pure checks all of them share, with the host passed in (host.py);
- parse.py: the written forms of values (64M, 0-3, file:PATH, HOST:PORT);
- files.py: the checks that look at the file system (image, initrd, log_dir);
- schema.py: the JSON schema of a partition and of a system, derived from spec.py.

The names below are what the rest of corevisor imports; PartitionConfig, ChannelConfig
and SystemConfig are the spec types under their earlier names.
"""

from __future__ import annotations

from corevisor.config.args import partition_from_args
from corevisor.config.host import HostFacts, gather
from corevisor.config.parse import (
    format_cpu_list,
    format_size,
    parse_cpu_list,
    parse_host_port,
    parse_size,
)
from corevisor.config.toml import load_config
from corevisor.config.validate import validate_addition, validate_partition, validate_system
from corevisor.spec import ChannelSpec, PartitionSpec, SystemSpec

PartitionConfig = PartitionSpec
ChannelConfig = ChannelSpec
SystemConfig = SystemSpec

__all__ = [
    "load_config",
    "partition_from_args",
    "validate_partition",
    "validate_system",
    "validate_addition",
    "HostFacts",
    "gather",
    "parse_size",
    "parse_cpu_list",
    "parse_host_port",
    "format_size",
    "format_cpu_list",
    "PartitionConfig",
    "ChannelConfig",
    "SystemConfig",
]
