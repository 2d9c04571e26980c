"""`corevisor ctl`'s own side: what `add FILE` sends, and its table."""

from __future__ import annotations

from pathlib import Path

from corevisor.api.ctl import _documents, format_table
from tests.kvm.images import pvh_elf


def test_add_sends_each_partition_with_the_channels_to_those_before_it(tmp_path: Path) -> None:
    (tmp_path / "g.elf").write_bytes(pvh_elf(b"\xf4"))
    path = tmp_path / "s.toml"
    path.write_text(
        "".join(f'[partitions.{n}]\nimage = "g.elf"\nmemory = "16M"\n' for n in "abc")
        + '[channels.ab]\nbetween = ["a", "b"]\n[channels.cb]\nbetween = ["c", "b"]\n'
        + '[channels.ac]\nbetween = ["a", "c"]\n'
    )
    bodies = _documents(path)
    assert [list(b["partitions"]) for b in bodies] == [["a"], ["b"], ["c"]]
    assert [sorted(b.get("channels", {})) for b in bodies] == [[], ["ab"], ["ac", "cb"]]
    assert bodies[0]["partitions"]["a"]["image"] == str(tmp_path / "g.elf")  # absolute


def test_table_columns_line_up() -> None:
    text = format_table(["NAME", "STATE", "LAST"], [["rtos", "running", ""],
                                                    ["a-long-name", "paused", "why"]])
    assert text.splitlines() == [
        "NAME         STATE    LAST",
        "rtos         running",
        "a-long-name  paused   why",
    ]
