"""KVM binary statistics on real VMs: the reader, and `run --stats` / `--stats-json`.

The reader is checked on the stats fds of a real VM and vCPU; the CLI on real guests
whose behaviour fixes a lower bound for the counters (N port writes are at least N
exits), and on a system file whose restarting partition must show one run per boot.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest

from corevisor.kvm.ioctls import Kvm
from corevisor.kvm.stats import StatsFile
from tests.kvm.conftest import corevisor

GUESTS = Path(__file__).resolve().parents[2] / "guests"


def test_reader_decodes_a_real_vm_and_vcpu_stats_fd() -> None:
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        with StatsFile(vm.stats_fd()) as vms, StatsFile(vcpu.stats_fd()) as cpus:
            assert vms.id == f"kvm-{os.getpid()}"
            assert cpus.id == f"kvm-{os.getpid()}/vcpu-0"
            for f in (vms, cpus):
                names = [d.name for d in f.descriptors]
                assert len(names) == len(set(names)) == f.header.num_desc
                values = f.read()
                assert set(values) == set(names)
                for d in f.descriptors:
                    v = values[d.name]
                    # every value matches an independent pread at its documented place
                    raw = os.pread(f.fd, 8 * d.size, f.header.data_offset + d.offset)
                    assert (v if isinstance(v, tuple) else (v,)) == struct.unpack(
                        f"={d.size}Q", raw
                    )
            exits = cpus.by_name["exits"]
            assert (exits.type, exits.unit, exits.size) == ("cumulative", "none", 1)
            assert cpus.read()["exits"] == 0  # the vCPU never ran
            wait = cpus.by_name["halt_wait_ns"]
            assert (wait.unit, wait.base, wait.exponent, wait.scale) == ("seconds", 10, -9, 1e-9)
            hist = cpus.by_name["halt_wait_hist"]
            assert hist.type == "log-histogram" and hist.size == len(cpus.read()[hist.name])
            edges = hist.buckets()
            assert edges[0] == (0.0, 1.0) and edges[1] == (1.0, 2.0) and edges[2] == (2.0, 4.0)
            assert edges[-1][1] == math.inf
            assert vms.by_name["pages_4k"].type == "instant"
            assert vms.by_name["max_mmu_rmap_size"].type == "peak"
        vcpu.close()
    finally:
        vm.close()
        kvm.close()


def test_run_stats_counts_port_writes(tmp_path: Path) -> None:
    n = 3000
    out = tmp_path / "stats.json"
    r = corevisor("run", "pio", "--cmdline", f"count={n}", "--stats", "--stats-json", str(out))
    assert r.returncode == 0, r.stderr
    assert f"pio: {n} writes" in r.stdout
    host = json.loads(corevisor("host", "--json").stdout)
    err = r.stderr.splitlines()
    head = f"corevisor: stats: pio: 1 vCPU; KVM {host['kvm']}, MMU {host['mmu']}"
    assert head in err
    own = next(x for x in err if x.strip().startswith("exits to corevisor"))
    assert int(own.split()[3].rstrip(":")) >= n
    assert any(x.strip().startswith("page faults") for x in err)
    assert any(x.strip().startswith("exits in KVM") for x in err)

    doc = json.loads(out.read_text())
    assert (doc["format"], doc["version"]) == ("corevisor-stats", 1)
    assert doc["host"]["kvm"] == host["kvm"] and doc["host"]["mmu"] == host["mmu"]
    (part,) = doc["partitions"]
    assert part["name"] == "pio"
    (run,) = part["runs"]
    assert run["outcome"] == {"kind": "exit", "message": "guest exited with status 0", "code": 0}
    (vcpu,) = run["vcpus"]
    assert vcpu["index"] == 0 and vcpu["id"].endswith("/vcpu-0")
    assert run["vm"]["id"] == vcpu["id"].split("/")[0]
    own_counts = vcpu["corevisor"]
    assert own_counts["io"] >= n and own_counts["mmio"] == 0
    assert own_counts["exits"] == own_counts["io"] + sum(own_counts["other"].values())
    stats = vcpu["stats"]
    assert stats["exits"]["type"] == "cumulative" and stats["exits"]["value"] >= n
    assert stats["halt_wait_hist"]["type"] == "log-histogram"
    assert isinstance(stats["halt_wait_hist"]["value"], list)
    assert stats["halt_wait_ns"]["unit"] == "seconds" and stats["halt_wait_ns"]["exponent"] == -9
    assert "mmu_shadow_zapped" in run["vm"]["stats"]
    totals = run["totals"]
    assert totals["exits"] == stats["exits"]["value"]
    assert totals["corevisor.io"] == own_counts["io"]
    assert totals["mmu_cache_miss"] == run["vm"]["stats"]["mmu_cache_miss"]["value"]


def test_run_stats_with_more_exits_shows_more(tmp_path: Path) -> None:
    def io_exits(n: int) -> int:
        out = tmp_path / f"{n}.json"
        r = corevisor("run", "pio", "--cmdline", f"count={n}", "--stats-json", str(out))
        assert r.returncode == 0, r.stderr
        assert "corevisor: stats:" not in r.stderr  # JSON only without --stats
        run = json.loads(out.read_text())["partitions"][0]["runs"][0]
        kvm_exits: int = run["totals"]["exits"]
        assert kvm_exits >= run["totals"]["corevisor.exits"]
        return int(run["totals"]["corevisor.io"])

    small, big = io_exits(100), io_exits(2100)
    assert big - small >= 2000


def test_stats_of_each_vcpu_and_their_sum(tmp_path: Path) -> None:
    out = tmp_path / "smp.json"
    r = corevisor("run", "smp", "--cpus", "2", "--stats", "--stats-json", str(out))
    assert r.returncode == 0, r.stderr
    assert "smp: 2/2 cpus checked in" in r.stdout
    run = json.loads(out.read_text())["partitions"][0]["runs"][0]
    v0, v1 = run["vcpus"]
    assert (v0["index"], v1["index"]) == (0, 1) and v1["id"].endswith("/vcpu-1")
    assert v1["stats"]["exits"]["value"] > 0  # the AP the guest started ran too
    totals = run["totals"]
    for name in ("exits", "pf_fixed", "insn_emulation"):
        assert totals[name] == v0["stats"][name]["value"] + v1["stats"][name]["value"]
    assert totals["corevisor.exits"] == v0["corevisor"]["exits"] + v1["corevisor"]["exits"]
    per = next(x for x in r.stderr.splitlines() if x.strip().startswith("per vCPU"))
    assert f"vcpu0 {v0['corevisor']['exits']}, vcpu1 {v1['corevisor']['exits']}" in per


def test_stats_per_partition_and_per_restart_of_a_system_file(tmp_path: Path) -> None:
    out = tmp_path / "crash.json"
    r = corevisor(
        "run", str(GUESTS / "systems" / "crash.toml"), "--stats", "--stats-json", str(out)
    )
    assert r.returncode == 1, r.stderr  # rtos ends down after its restarts
    doc = json.loads(out.read_text())
    names = [p["name"] for p in doc["partitions"]]
    assert names == ["rtos", "peer"]
    rtos, peer = doc["partitions"]
    # first boot and three restarts, each triple-faulting: one record per machine
    assert [x["outcome"]["kind"] for x in rtos["runs"]] == ["fault"] * 4
    assert all("SHUTDOWN" in x["vcpus"][0]["corevisor"]["other"] for x in rtos["runs"])
    assert [x["outcome"]["kind"] for x in peer["runs"]] == ["exit"]
    assert r.stderr.count("corevisor: stats: rtos: 1 vCPU") == 4
    assert r.stderr.count("corevisor: stats: peer: 1 vCPU") == 1


def test_stats_json_into_a_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    r = corevisor("run", "hello", "--stats-json", str(tmp_path / "no" / "s.json"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"corevisor: --stats-json {tmp_path}/no/s.json: directory {tmp_path}/no does not exist"
    ]
    assert "Hello" not in r.stdout  # refused before the guest ran


@pytest.mark.lab
def test_lab_stats_see_the_hardware_mmu(tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    r = corevisor("run", "pio", "--cmdline", "count=500", "--stats", "--stats-json", str(out))
    assert r.returncode == 0, r.stderr
    assert "KVM kvm_amd" in r.stderr
    run = json.loads(out.read_text())["partitions"][0]["runs"][0]
    stats = run["vcpus"][0]["stats"]
    # on SVM a port write is an IOIO intercept KVM counts, unlike PVM's emulated out
    assert stats["io_exits"]["value"] >= 500
    assert run["totals"]["corevisor.io"] >= 500
