"""/metrics scraped with Prometheus' own text parser while guests run: the counters move.

The demo (its channel's doorbells relayed by a thread, so the VMM sees each ring), an
rng guest (virtio requests and bytes) and an RTOS that stops kicking its watchdog run in
one daemon; two scrapes while the RTOS pings must show every counter of a running
partition grown, and the ended partitions' counters kept.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from corevisor.api.client import Client
from tests.kvm.apihelp import daemon, demo_file, until

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _scrape(client: Client) -> tuple[Samples, str]:
    text = client.request("GET", "/metrics").decode()
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("corevisor_"), family.name
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out, text


def _sum(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if want <= set(k))


def _add(client: Client, name: str, table: dict[str, object]) -> None:
    client.json("POST", "/partitions?start=true", {"partitions": {name: table}})


def test_counters_move_while_guests_run(tmp_path: Path, guests: dict[str, Path]) -> None:
    with daemon(tmp_path, demo_file(tmp_path, doorbell="thread")) as (d, client):
        _add(client, "rng", {"image": str(guests["rng"]), "memory": "16M", "rng": True,
                             "serial": "null"})
        _add(client, "wd", {"image": str(guests["rtos"]), "memory": "32M", "serial": "null",
                            "cmdline": "wdfail=1 wdkicks=3", "watchdog_ms": 2000})

        def pings() -> int:
            return client.request("GET", "/partitions/rtos/serial").count(b'sent "ping')

        until(lambda: pings() >= 3, "the RTOS pings")
        first, text = _scrape(client)
        then = pings()
        until(lambda: pings() >= then + 5, "the RTOS keeps pinging")
        until(lambda: client.json("GET", "/partitions/rng")["state"] == "stopped", "rng ends")
        until(lambda: client.json("GET", "/partitions/wd")["state"] == "stopped", "wd expires")
        second, _ = _scrape(client)

        for part in ("rtos", "peer"):
            for name in ("corevisor_vcpu_exits_total", "corevisor_vcpu_cpu_seconds_total",
                         "corevisor_serial_output_bytes_total"):
                assert _sum(second, name, partition=part) > _sum(first, name, partition=part), (
                    part, name)
            assert _sum(second, "corevisor_partition_state", partition=part,
                        state="running") == 1
            assert _sum(second, "corevisor_channel_doorbells_total", channel="link",
                        partition=part) > _sum(first, "corevisor_channel_doorbells_total",
                                               channel="link", partition=part)
        assert _sum(second, "corevisor_vcpu_exits_total", partition="rtos", reason="io") > 0
        # KVM's own statistics, read live from the stats fds opened at build time.
        for part in ("rtos", "peer"):
            assert _sum(second, "corevisor_kvm_vcpu_exits_total", partition=part, vcpu="0") > (
                _sum(first, "corevisor_kvm_vcpu_exits_total", partition=part, vcpu="0"))
        assert _sum(second, "corevisor_kvm_vm_pages_4k", partition="rtos") > 0
        # Ended partitions keep their counts (their machines are gone).
        assert _sum(second, "corevisor_virtio_requests_total", partition="rng",
                    device="virtio-rng") >= 2
        assert _sum(second, "corevisor_virtio_to_guest_bytes_total", partition="rng") >= 128
        assert _sum(second, "corevisor_vcpu_exits_total", partition="rng") > 0
        assert _sum(second, "corevisor_kvm_vcpu_exits_total", partition="rng") > 0  # as it closed
        assert _sum(second, "corevisor_watchdog_expiries_total", partition="wd") == 1
        assert _sum(second, "corevisor_guest_memory_bytes", partition="rtos") == 32 << 20
        assert _sum(second, "corevisor_vmm_resident_memory_bytes") > 10 << 20
        # Counters end in _total in the text (the parser strips it).
        for line in text.splitlines():
            if line.startswith("# TYPE ") and line.endswith(" counter"):
                assert line.split()[2].endswith("_total"), line

        before = _sum(second, "corevisor_vcpu_exits_total", partition="peer")
        client.json("POST", "/partitions/peer/restart")
        third, _ = _scrape(client)
        assert _sum(third, "corevisor_partition_restarts_total", partition="peer") == 1
        assert _sum(third, "corevisor_vcpu_exits_total", partition="peer") >= before

        as_json = client.json("GET", "/metrics?format=json")["metrics"]
        assert {m["name"] for m in as_json} >= {"corevisor_vcpu_exits_total",
                                                 "corevisor_partition_state"}
