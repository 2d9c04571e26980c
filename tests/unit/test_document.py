"""A spec written back as its document reads back as the same spec (config/document.py),
and the document is valid against the system-file schema."""

from __future__ import annotations

from pathlib import Path

import jsonschema

from corevisor.config.document import partition_document, system_document
from corevisor.config.schema import system_schema
from corevisor.config.toml import read_system, system_from_document
from tests.kvm.images import pvh_elf

ROOT = Path(__file__).resolve().parents[2]


def _system(tmp_path: Path) -> Path:
    (tmp_path / "a.elf").write_bytes(pvh_elf(b"\xf4"))
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    path = tmp_path / "s.toml"
    path.write_text(
        '[partitions.a]\nimage = "a.elf"\ncpus = 2\nmemory = "32M"\npin = "0-1"\n'
        'cmdline = "x=1 y"\nserial = "file:a.log"\ndedicated = true\nexits = "halt-poll"\n'
        'halt_poll_ns = 1000\nrestart = "restart"\nwatchdog_ms = 500\ngdb = "[::1]:1234"\n'
        'blk = [{path = "disk.img", readonly = true}]\nrng = true\nvirtio_console = true\n'
        '[partitions.b]\nimage = "a.elf"\nserial = "unix:b.sock"\n'
        '[channels.link]\nbetween = ["a", "b"]\nsize = "8K"\ngpa = 0xD0000000\n'
        'direction = "a->b"\ndoorbell = "thread"\n'
    )
    return path


def test_round_trip_through_the_document(tmp_path: Path) -> None:
    system = read_system(_system(tmp_path))
    doc = system_document(system)
    again = system_from_document(doc, "doc", Path("/nowhere"))
    assert again.partitions == system.partitions
    assert again.channels == system.channels
    jsonschema.validate(doc, system_schema())
    a = partition_document(system.partitions[0])
    assert (a["memory"], a["pin"], a["serial"], a["gdb"]) == (
        32 << 20, [0, 1], f"file:{tmp_path / 'a.log'}", "[::1]:1234")
    assert a["blk"] == [{"path": str(tmp_path / "disk.img"), "readonly": True}]


def test_the_demo_round_trips() -> None:
    demo = read_system(ROOT / "examples" / "demo.toml")
    doc = system_document(demo)
    jsonschema.validate(doc, system_schema())
    assert system_from_document(doc, "doc", Path("/")).partitions == demo.partitions
