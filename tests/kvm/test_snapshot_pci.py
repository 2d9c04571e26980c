"""Snapshots of machines with PCI on real KVM: what a restored machine must get back is
more than registers — its BARs mapped where the guest (or its BIOS) put them, the
doorbells' ioeventfds at their notify addresses, the MSI routes its MSI-X table asks
for, and for a BIOS machine its shadow RAM mapped as the PAM registers say.

Each test pauses a guest at a point it prints, snapshots it, lets it finish, restores
the snapshot into a fresh machine built from the same spec and lets that finish too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from corevisor.spec import BlkSpec, PartitionSpec, SerialSpec, Transport, VirtioSpec
from tests.kvm.test_bios import SEABIOS, lines
from tests.kvm.test_snapshot import _paused_at, _restore, _snapshot

GREETING = b"corevisor blk test: sector zero"


def _run_both(config: PartitionSpec, marker: str, tmp_path: Path) -> tuple[str, str]:
    """(output of the first run, of the restored run): both must exit with status 0."""
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    first = replace(config, serial=SerialSpec.file(a))
    with _paused_at(first, a, marker) as (m, _):
        _snapshot(m, first, tmp_path / "snap")
        m.resume()
        report = m.outcome(150)
    assert (report.kind, report.code) == ("exit", 0), (report, a.read_text())
    restored, _ = _restore(replace(config, serial=SerialSpec.file(b)), tmp_path / "snap")
    with restored:
        report = restored.run(150)
    assert (report.kind, report.code) == ("exit", 0), (report, b.read_text())
    return a.read_text(), b.read_text()


def test_a_virtio_pci_disk_with_msix_keeps_working_after_a_restore(
    guests: dict[str, Path], tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(GREETING.ljust(1 << 20, b"\0"))
    config = PartitionSpec(
        name="snap", image=guests["blk"], memory=32 << 20, cmdline="mode=check irq=msix",
        virtio=VirtioSpec(blk=(BlkSpec(disk),), transport=Transport.PCI),
    )
    _, after = _run_both(config, "blk: capacity 2048 sectors\n", tmp_path)
    assert after.startswith(f'blk: sector 0 "{GREETING.decode()}"\n'), after
    assert "blk: ok 64 sectors\n" in after
    assert "blk: msix: 4 requests completed by" in after  # vectors routed again


def test_a_bios_machine_restored_mid_post_boots_its_disk(
    guests: dict[str, Path], tmp_path: Path
) -> None:
    boot = Path(__file__).parents[2] / "guests" / "build" / "bootsect.img"
    disk = tmp_path / "disk.img"
    disk.write_bytes(boot.read_bytes())
    config = PartitionSpec(
        name="snap", bios=SEABIOS, memory=64 << 20,
        virtio=VirtioSpec(blk=(BlkSpec(disk),), transport=Transport.PCI),
    )
    before, after = _run_both(config, "Booting from Hard Disk...", tmp_path)
    assert "boot: exit 0" in lines(before)
    assert "boot: stage 1 from drive 0x80" in lines(after), after
    assert "boot: exit 0" in lines(after)
