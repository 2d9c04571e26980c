"""The fuzz corpus, replayed: every seed and every kept crash input of every target that
needs no /dev/kvm runs through its target's one_input (fuzz/targets/), so a crash the
fuzzer once found stays fixed. Plus the regressions the fuzzer found, each stated
directly through the interface a guest uses.
"""

from __future__ import annotations

import importlib
import struct
from pathlib import Path

import pytest

from corevisor.memory import GuestMemory
from corevisor.virtio.mmio import REG, VirtioMmio
from corevisor.virtio.rng import Rng
from fuzz.run import CORPUS
from fuzz.targets import KVM, TARGETS

CASES = [
    (t, f) for t in TARGETS if t not in KVM for f in sorted((CORPUS / t).glob("*"))
]


def test_every_target_has_a_corpus() -> None:
    for target in TARGETS:
        assert list((CORPUS / target).glob("seed-*")), target


@pytest.mark.parametrize("target, path", CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_replays_clean(target: str, path: Path) -> None:
    importlib.import_module(f"fuzz.targets.{target}").one_input(path.read_bytes())


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.anonymous([(0, 1 << 20)])


def _w32(dev: VirtioMmio, reg: int, value: int) -> None:
    dev.write(reg, struct.pack("<I", value))


@pytest.mark.parametrize("num", [0, 3, 512, 0xFFFFFFFF])
def test_a_queue_size_the_driver_may_write_survives_save_restore(
    mem: GuestMemory, num: int
) -> None:
    """Found by the virtqueue target: QUEUE_NUM takes any 32-bit value before the queue
    is enabled, but restore() refused every size outside 1..max, so saving such a
    transport produced a state it could not restore."""
    dev = VirtioMmio(Rng(), mem, lambda msg: None)
    _w32(dev, REG.QUEUE_SEL, 0)
    _w32(dev, REG.QUEUE_NUM, num)
    twin = VirtioMmio(Rng(), mem, lambda msg: None)
    twin.restore(dev.save())
    assert twin.save() == dev.save()


def test_features_written_before_features_ok_survive_save_restore(mem: GuestMemory) -> None:
    """Found by the virtio_mmio target: a driver may write unoffered bits to
    DRIVER_FEATURES (FEATURES_OK is then refused); restore() refused that state."""
    dev = VirtioMmio(Rng(), mem, lambda msg: None)
    for status in (1, 3):
        _w32(dev, REG.STATUS, status)
    _w32(dev, REG.DRIVER_FEATURES_SEL, 0)
    _w32(dev, REG.DRIVER_FEATURES, 1)  # VIRTIO_F_NOTIFY_ON_EMPTY-era bit, never offered
    twin = VirtioMmio(Rng(), mem, lambda msg: None)
    twin.restore(dev.save())
    assert twin.save() == dev.save()
