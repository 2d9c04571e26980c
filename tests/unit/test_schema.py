"""The JSON schema derived from the spec: real system files pass it, bad ones do not, and
it agrees with the reader (config/toml.py) on which documents are system files."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from corevisor.config import HostFacts, load_config
from corevisor.config.schema import components, partition_schema, system_schema
from corevisor.config.toml import CHANNEL_KEYS, PARTITION_KEYS
from corevisor.errors import ConfigError
from tests.kvm.images import pvh_elf

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = sorted((ROOT / "guests" / "systems").glob("*.toml"))
REAL_FILES = [*sorted((ROOT / "examples").glob("*.toml")), *SYSTEMS]

FULL = """
[partitions.rtos]
image = "hello.elf"
cpus = 2
memory = "32M"
pin = "0"
cmdline = "exit=0"
serial = "file:logs/rtos.log"
dedicated = true
exits = "halt-poll"
halt_poll_ns = 50000
restart = "restart"
watchdog_ms = 500
gdb = "127.0.0.1:4321"
blk = [{path = "disk.img", readonly = true}]
net = [{tap = "tap0"}]
rng = true
virtio_console = true

[partitions.linux]
image = "hello.elf"
memory = 16777216
pin = [3]
initrd = "rd.cpio"
serial = "unix:linux.sock"

[channels.feed]
between = ["rtos", "linux"]
size = "8K"
direction = "rtos->linux"
doorbell = "thread"

[channels.fixed]
between = ["linux", "rtos"]
gpa = 0xE0000000

[system]
log_dir = "logs"
sandbox = false
"""


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)  # the schema itself is valid
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "hello.elf").write_bytes(pvh_elf(b"\xf4"))
    (tmp_path / "disk.img").write_bytes(bytes(1024))
    (tmp_path / "rd.cpio").write_bytes(b"070701")
    return tmp_path


def test_the_repositorys_system_files_are_valid() -> None:
    assert len(REAL_FILES) >= 2
    check = validator(system_schema())
    for path in REAL_FILES:
        errors = [e.message for e in check.iter_errors(tomllib.loads(path.read_text()))]
        assert errors == [], path


def test_a_file_with_every_key_is_valid_to_both(tree: Path) -> None:
    (tree / "s.toml").write_text(FULL)
    four_cores = HostFacts(cores=4, affinity=frozenset(range(4)), mem_available=1 << 30)
    system = load_config(tree / "s.toml", host=four_cores)  # the reader accepts it ...
    assert [p.name for p in system.partitions] == ["rtos", "linux"]
    validator(system_schema()).validate(tomllib.loads(FULL))  # ... and so does the schema


def test_the_schema_has_exactly_the_readers_keys() -> None:
    defs = system_schema()["$defs"]
    assert tuple(defs["PartitionSpec"]["properties"]) == PARTITION_KEYS
    assert tuple(defs["ChannelSpec"]["properties"]) == CHANNEL_KEYS
    assert "required" not in defs["PartitionSpec"]  # image, or bios: exactly one
    assert defs["PartitionSpec"]["oneOf"] == [{"required": ["image"]}, {"required": ["bios"]}]
    assert defs["ExitMode"]["enum"] == sorted(["normal", "halt-poll", "disabled"])


BAD = {
    "unknown top-level key": '[debug]\n[partitions.a]\nimage = "hello.elf"\n',
    "no partitions": '[system]\nlog_dir = "x"\n',
    "empty partitions": "[partitions]\n",
    "bad partition name": '[partitions.Demo]\nimage = "hello.elf"\n',
    "missing image": "[partitions.a]\ncpus = 1\n",
    "unknown partition key": '[partitions.a]\nimage = "hello.elf"\ncpu = 2\n',
    "cpus a string": '[partitions.a]\nimage = "hello.elf"\ncpus = "2"\n',
    "cpus zero": '[partitions.a]\nimage = "hello.elf"\ncpus = 0\n',
    "cpus too many": '[partitions.a]\nimage = "hello.elf"\ncpus = 65\n',
    "size with a unit": '[partitions.a]\nimage = "hello.elf"\nmemory = "64MB"\n',
    "negative size": '[partitions.a]\nimage = "hello.elf"\nmemory = -4096\n',
    "serial kind": '[partitions.a]\nimage = "hello.elf"\nserial = "tty"\n',
    "serial without path": '[partitions.a]\nimage = "hello.elf"\nserial = "file:"\n',
    "exit mode": '[partitions.a]\nimage = "hello.elf"\nexits = "fast"\n',
    "restart policy": '[partitions.a]\nimage = "hello.elf"\nrestart = "always"\n',
    "watchdog negative": '[partitions.a]\nimage = "hello.elf"\nwatchdog_ms = -1\n',
    "gdb not host:port": '[partitions.a]\nimage = "hello.elf"\ngdb = "nowhere"\n',
    "bad pin list": '[partitions.a]\nimage = "hello.elf"\npin = "zero"\n',
    "blk key": '[partitions.a]\nimage = "hello.elf"\nblk = [{path = "disk.img", ro = true}]\n',
    "rng not a boolean": '[partitions.a]\nimage = "hello.elf"\nrng = 1\n',
    "channel with one end": '[partitions.a]\nimage = "hello.elf"\n[channels.c]\nbetween = "a"\n',
    "channel key": '[partitions.a]\nimage = "hello.elf"\n[channels.c]\nbetween = ["a", "a"]\n'
    "colour = 1\n",
    "doorbell": '[partitions.a]\nimage = "hello.elf"\n[channels.c]\nbetween = ["a", "b"]\n'
    'doorbell = "python"\n',
    "system key": '[partitions.a]\nimage = "hello.elf"\n[system]\nlogs = "x"\n',
}


@pytest.mark.parametrize("text", BAD.values(), ids=BAD.keys())
def test_bad_documents_are_refused_by_the_schema_and_the_reader(tree: Path, text: str) -> None:
    errors = list(validator(system_schema()).iter_errors(tomllib.loads(text)))
    assert errors, "the schema accepted it"
    (tree / "s.toml").write_text(text)
    with pytest.raises(ConfigError):
        load_config(tree / "s.toml")


def test_a_partition_body_as_the_api_would_get_it() -> None:
    check = validator(partition_schema())
    check.validate({"image": "guests/build/hello.elf", "memory": "32M", "serial": "null"})
    check.validate({"image": "x.elf", "gdb": "[::1]:1234", "pin": [0, 1], "cpus": 2})
    for bad in (
        {"memory": "32M"},  # no image
        {"image": "x.elf", "bios": "bios.bin"},  # both
        {"image": "x.elf", "name": "a"},  # the name is the URL's (or the table's key)
        {"image": "x.elf", "gdb": "127.0.0.1"},
        {"image": "x.elf", "serial": None},  # optional keys are left out, not null
        {"image": ""},
    ):
        assert list(check.iter_errors(bad)), bad


def test_components_for_an_openapi_document_resolve() -> None:
    schemas = components("#/components/schemas/{name}")
    assert {"PartitionSpec", "ChannelSpec", "SystemSpec"} <= set(schemas)
    doc = {"components": {"schemas": schemas}, "$ref": "#/components/schemas/SystemSpec"}
    check = jsonschema.Draft202012Validator(doc)
    check.validate(tomllib.loads(REAL_FILES[0].read_text()))
    assert list(check.iter_errors({"partitions": {"a": {"image": "x", "cpus": 0}}}))
