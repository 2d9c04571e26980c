"""The page-table-stress guest on real KVM: what it prints, and what KVM saw it do.

Under shadow paging (this host's PVM, the lab with npt=0) every first touch of a freshly
mapped page is a fault KVM must fix; under nested paging (the lab with npt=1) the guest
maps and touches pages without KVM. The counts come from --stats-json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.kvm.conftest import corevisor

LINE = re.compile(
    r"ptstress: iters=(\d+) ns_per_iter=(\d+) ns_per_page=(\d+) cr3_switches=(\d+) "
    r"tsc_khz=(\d+)"
)


def _run(tmp_path: Path, cmdline: str) -> tuple[re.Match[str], dict[str, int], str]:
    out = tmp_path / "stats.json"
    r = corevisor("run", "ptstress", "--cmdline", cmdline, "--stats-json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("ptstress:")]
    assert len(lines) == 2, r.stdout  # small serial output: a header and the result
    m = LINE.fullmatch(lines[1])
    assert m is not None, lines[1]
    doc = json.loads(out.read_text())
    totals: dict[str, int] = doc["partitions"][0]["runs"][0]["totals"]
    return m, totals, doc["host"]["mmu"]


@pytest.mark.parametrize("pattern", ["seq", "rand", "shared"])
def test_ptstress_maps_touches_and_switches_address_spaces(tmp_path: Path, pattern: str) -> None:
    pages, spaces, iters = 128, 3, 6
    m, totals, mmu = _run(
        tmp_path, f"pages={pages} spaces={spaces} iters={iters} pattern={pattern}"
    )
    assert int(m[1]) == iters and int(m[4]) == iters * spaces
    ns_iter, ns_page, khz = int(m[2]), int(m[3]), int(m[5])
    assert khz > 0 and ns_iter > 0 and ns_page == ns_iter // (spaces * pages)
    if mmu == "shadow":
        # one warm-up and `iters` timed iterations, each page freshly mapped per visit
        assert totals["pf_fixed"] >= (iters + 1) * spaces * pages


def test_ptstress_says_what_it_ran(tmp_path: Path) -> None:
    r = corevisor("run", "ptstress", "--cmdline", "pages=16 spaces=2 iters=1 warm=0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "ptstress: pages=16 spaces=2 iters=1 pattern=seq"


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        (
            "pattern=zigzag",
            "ptstress: bad parameters (pages=1..65536 spaces=1..64 pattern=seq|rand|shared)",
        ),
        ("spaces=65", "ptstress: bad parameters"),
        ("pages=65536 spaces=8", "ptstress: needs 2"),  # ~2 GiB, in a 64 MiB guest
    ],
)
def test_ptstress_refuses_what_it_cannot_do(cmdline: str, message: str) -> None:
    r = corevisor("run", "ptstress", "--cmdline", cmdline)
    assert r.returncode == 2, r.stderr
    assert any(x.startswith(message) for x in r.stdout.splitlines()), r.stdout


@pytest.mark.lab
def test_lab_ptstress_faults_only_under_shadow_paging(tmp_path: Path) -> None:
    pages, spaces, iters = 256, 4, 20
    _, totals, mmu = _run(tmp_path, f"pages={pages} spaces={spaces} iters={iters}")
    touched = (iters + 1) * spaces * pages
    if mmu == "npt":
        assert totals["pf_taken"] < touched // 10  # the pool's first touches, not each visit
    else:
        assert mmu == "shadow" and totals["pf_fixed"] >= touched
