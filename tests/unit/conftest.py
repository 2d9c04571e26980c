"""Fixtures the unit tests share: a small guest RAM and a small disk image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corevisor.memory import GuestMemory
from tests.unit.virtio_driver import MIB


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """2 MiB of guest RAM at guest-physical 0."""
    m = GuestMemory.anonymous([(0, 2 * MIB)])
    yield m
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An 8-sector disk image whose bytes count 0..255 over and over."""
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * 16)
    return p
