"""The `corevisor run --restore DIR` and `corevisor run --incoming ADDR` options.

Both start a partition that continues a saved guest instead of booting an image, in
this fresh process: --restore from a snapshot directory (docs/snapshot-format.md),
--incoming from a live migration that a source sends to ADDR (snapshot/migrate.py).
What must differ from what was saved comes from the usual options, as overrides:

    --name NAME       the partition's name (default: the saved one)
    --serial SPEC     where its serial line goes (default stdout, as for any run)
    --net TAP         one per saved virtio-net, in order (a clone needs its own TAP)
    --disk PATH       one per saved virtio-blk, in order (a clone needs its own disk)
    --pin CORES       host cores for its vCPUs
    --copy-memory     copy the memory file into fresh RAM (default: map it copy-on-write)

Every other partition option describes the guest itself (its image, vCPUs, RAM,
command line), which the saved guest already has: combining one with --restore or
--incoming is a user error, as is a snapshot that does not pass every check (one line,
nothing started). cli.py only calls add_arguments(), wanted() and run().

What does not live here: the snapshot files (snapshot/format.py), the restore itself
(snapshot/partition.py, builder.restore), the migration protocol (snapshot/migrate.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corevisor.errors import CorevisorError, show

if TYPE_CHECKING:
    from corevisor.snapshot.partition import Overrides

__all__ = ["add_arguments", "wanted", "run", "make_overrides", "ProgressBar"]

# run options that may go with --restore / --incoming (the overrides), by dest
OVERRIDES = ("serial", "net", "disk", "pin", "name", "copy_memory", "timeout", "restore",
             "incoming")
# the other run options: what they would change is the saved guest's (dest -> flag)
GUEST_OPTIONS = {
    "target": "IMAGE", "cpus": "--cpus", "memory": "--memory", "cmdline": "--cmdline",
    "gdb": "--gdb", "gdb_attach": "--gdb-attach", "rng": "--rng", "module": "--module",
    "kernel": "--kernel", "initrd": "--initrd", "initramfs_dir": "--initramfs-dir",
}


def add_arguments(run: argparse.ArgumentParser) -> None:
    """The provisioning options of `corevisor run`."""
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--restore", metavar="DIR", default=None,
        help="continue the guest saved in snapshot directory DIR (instead of IMAGE)",
    )
    where.add_argument(
        "--incoming", metavar="ADDR", default=None,
        help="wait for a live migration on tcp:HOST:PORT or unix:PATH, then run the guest",
    )
    run.add_argument("--name", default=None, help="with --restore/--incoming: the partition's name")
    run.add_argument(
        "--copy-memory", action="store_true",
        help="with --restore: copy the saved RAM (default: map it copy-on-write)",
    )


def wanted(args: argparse.Namespace) -> bool:
    """Whether this run restores or receives a guest; refuses options that conflict."""
    mode = "--restore" if args.restore is not None else "--incoming"
    if args.restore is None and args.incoming is None:
        for dest, flag in (("name", "--name"), ("copy_memory", "--copy-memory")):
            if getattr(args, dest):
                raise CorevisorError(f"{flag} goes with --restore or --incoming")
        return False
    for dest, flag in GUEST_OPTIONS.items():
        if getattr(args, dest, None) not in (None, False, []):
            raise CorevisorError(
                f"{flag} cannot be combined with {mode}: the saved guest has its own "
                "(give only --name, --serial, --net, --disk, --pin, --copy-memory)"
            )
    if getattr(args, "stats", False) or getattr(args, "stats_json", None) is not None:
        raise CorevisorError(f"--stats and --stats-json do not go with {mode} yet")
    if args.incoming is not None and args.copy_memory:
        raise CorevisorError("--copy-memory goes with --restore (a migration always copies)")
    return True


def overrides(args: argparse.Namespace) -> Overrides:
    """The Overrides the options give (parsed and checked as the same options of a run)."""
    return make_overrides(
        name=args.name, serial=args.serial if args.serial is not None else "stdout",
        nets=args.net, disks=args.disk, pin=args.pin, copy_memory=args.copy_memory,
    )


def make_overrides(
    *,
    name: str | None = None,
    serial: str | None = None,
    nets: list[str] | None = None,
    disks: list[str] | None = None,
    pin: str | None = None,
    copy_memory: bool = False,
) -> Overrides:
    """Overrides from their written forms (the run options, the API's restore body),
    each checked as the option of that name would be; None keeps the saved value."""
    from corevisor.config.parse import NAME_RE, parse_cpu_list, parse_path, parse_serial
    from corevisor.snapshot.partition import Overrides
    from corevisor.virtio.config import check_tap

    if name is not None and NAME_RE.fullmatch(name) is None:
        raise CorevisorError(f"--name: bad partition name {show(name)}")
    return Overrides(
        name=name,
        serial=parse_serial(serial, "--serial", None) if serial is not None else None,
        taps=tuple(check_tap(t, "--net") for t in nets) if nets else None,
        disks=tuple(parse_path(d, "--disk", None).absolute() for d in disks) if disks else None,
        pin=parse_cpu_list(pin, "--pin") if pin is not None else None,
        copy_memory=copy_memory,
    )


def run(args: argparse.Namespace) -> int:
    """Restore or receive the guest, run it under the health monitor; the exit status
    is the guest's, as for any run (system.py)."""
    from corevisor.signals import stop_signals
    from corevisor.spec import SystemSpec
    from corevisor.system import System

    if args.timeout is not None and not args.timeout > 0:
        raise CorevisorError(f"--timeout: {args.timeout:g} s (give a positive number of seconds)")
    from corevisor.snapshot.system import is_system

    o = overrides(args)
    whole = args.restore is not None and is_system(Path(args.restore))
    if whole and (args.name or args.net or args.disk or args.pin or args.copy_memory):
        raise CorevisorError(f"{show(args.restore)} is a system snapshot: its partitions "
                             "keep their names, devices and cores")
    system = System(SystemSpec(partitions=()), shared_console=whole)
    with stop_signals(system.request_stop):
        if args.restore is not None:
            return system.run(args.timeout, restore=(Path(args.restore), o))
        return system.run(args.timeout, incoming=(args.incoming, o, ProgressBar()))


class ProgressBar:
    """A migration's progress on stderr, as the source reports it (round, bytes, what
    is left, the downtime it expects, the throttle): a rich bar pinned to the bottom of
    a terminal while it lasts, else nothing; then one line with the outcome."""

    def __init__(self, label: str = "migrating in") -> None:
        self._label = label
        self._bar: Any = None
        self._task: Any = None
        self._last: dict[str, object] = {}

    def __call__(self, p: dict[str, object]) -> None:
        phase = p.get("phase")
        if phase in ("done", "failed"):
            self._close(phase == "done")
            return
        self._last = p
        if not sys.stderr.isatty():
            return
        if self._bar is None:
            self._open()
        ram = _num(p.get("ram_bytes"))
        sent = _num(p.get("sent_bytes"))
        left = _num(p.get("remaining_bytes"))
        detail = (f"round {_num(p.get('round')):.0f}, {left / 2**20:.1f} MiB dirty, "
                  f"downtime ~{_num(p.get('expected_downtime_ms')):.0f} ms")
        if _num(p.get("throttle")):
            detail += f", throttled {_num(p.get('throttle')) * 100:.0f} %"
        self._bar.update(self._task, total=max(ram, sent + left, 1), completed=sent,
                         detail=detail)

    def _open(self) -> None:
        from rich.console import Console  # only a migration in a terminal pays for rich
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn(self._label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TextColumn("{task.fields[detail]}"), console=Console(stderr=True), transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("migration", total=1, detail="")

    def _close(self, done: bool) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        p = self._last
        if done and p and self._label == "migrating in":
            print(f"corevisor: migration in: {_num(p.get('round')):.0f} rounds, "
                  f"{_num(p.get('sent_bytes')) / 2**20:.1f} MiB received", file=sys.stderr,
                  flush=True)


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
