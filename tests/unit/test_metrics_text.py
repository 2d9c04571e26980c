"""The metrics' text format, read back by Prometheus' own parser (prometheus_client)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from corevisor.api.metrics import Family, to_json, to_text


def test_text_format_parses_with_a_prometheus_parser() -> None:
    exits = Family("corevisor_vcpu_exits_total", "counter", "exits by reason")
    exits.add(12, partition="rtos", vcpu="0", reason="io")
    exits.add(3, partition="rtos", vcpu="0", reason="mmio")
    exits.add(2, partition="rtos", vcpu="0", reason="io")  # adds to the same sample
    rss = Family("corevisor_vmm_resident_memory_bytes", "gauge", "a back\\slash")
    rss.add(1.5e7)
    odd = Family("corevisor_channel_doorbells_total", "counter", "odd label values")
    odd.add(1, channel='a"b\\c\nd', partition="p")
    parsed = {f.name: f for f in text_string_to_metric_families(to_text([exits, rss, odd]))}
    assert parsed["corevisor_vcpu_exits"].type == "counter"
    samples = {(s.labels["reason"], s.value) for s in parsed["corevisor_vcpu_exits"].samples}
    assert samples == {("io", 14.0), ("mmio", 3.0)}
    assert parsed["corevisor_vmm_resident_memory_bytes"].samples[0].value == 1.5e7
    assert parsed["corevisor_channel_doorbells"].samples[0].labels["channel"] == 'a"b\\c\nd'
    assert to_json([rss])["metrics"][0]["samples"] == [{"labels": {}, "value": 1.5e7}]
