"""The `corevisor` command: run a guest, a system file or the bundled demo; list guests.

User errors (bad config, bad image, missing /dev/kvm) print one line prefixed with
"corevisor:" and exit 2; a guest that stops abnormally prints a report with its
registers and exits 1; a guest that writes its status to the exit port makes corevisor
exit with that status. With several partitions: 0 if all of them ended with 0, else the
first non-zero status (system.py). Only bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from corevisor import bundled, linuxboot
from corevisor.config import PartitionConfig, SystemConfig, load_config, partition_from_args
from corevisor.errors import CorevisorError

if TYPE_CHECKING:
    from corevisor.runstats import MachineRun

EXIT_USER_ERROR = 2



def _err(msg: str) -> None:
    print(f"corevisor: {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corevisor", description="A multicore partitioning hypervisor on Linux KVM."
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a guest image, a system TOML file, a bundled guest by name, or the demo",
    )
    run.add_argument("target", nargs="?", help="IMAGE, SYSTEM.toml or a bundled guest name")
    run.add_argument("--cpus", type=int, default=None, help="vCPUs (default 1)")
    run.add_argument("--memory", default=None, help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--pin", default=None, help="host cores for the vCPUs, e.g. 0,1 or 0-3")
    run.add_argument("--cmdline", default=None, help="guest command line")
    run.add_argument("--serial", default="stdout", help="stdout | file:PATH | unix:PATH | null")
    run.add_argument("--timeout", type=float, default=None, help="stop the guest after S s")
    run.add_argument(
        "--gdb",
        metavar="HOST:PORT",
        default=None,
        help="serve GDB's remote protocol there, halted before the first instruction",
    )
    run.add_argument(
        "--gdb-attach",
        action="store_true",
        help="with --gdb (or gdb keys): run at once; stop when GDB connects or sends Ctrl-C",
    )
    run.add_argument(
        "--gdb-allow-remote",
        action="store_true",
        help="allow a GDB address that is not loopback (whoever reaches it controls the guest)",
    )
    run.add_argument(
        "--disk", action="append", metavar="PATH[,ro]", help="a virtio-blk raw image (repeatable)"
    )
    run.add_argument("--net", action="append", metavar="TAP", help="a virtio-net on a host TAP")
    run.add_argument("--rng", action="store_true", help="a virtio-rng entropy device")
    run.add_argument(
        "--stats",
        action="store_true",
        help="at exit, print each machine's exit, page-fault, MMU, TLB and halt-poll counts",
    )
    run.add_argument(
        "--stats-json",
        metavar="PATH",
        type=Path,
        default=None,
        help="at exit, write those numbers and all of KVM's statistics as JSON (docs/stats.md)",
    )
    linuxboot.add_arguments(run)
    guests = sub.add_parser("guests", help="list the bundled guests and their image paths")
    guests.add_argument("--build", action="store_true", help="(re)build them first")
    host = sub.add_parser(
        "host", help="what this host's KVM is: flavour, MMU mode, capabilities, cores"
    )
    host.add_argument("--json", action="store_true", help="print it as one JSON object")
    return p


def _resolve(args: argparse.Namespace) -> SystemConfig:
    """Turn the run arguments into a validated SystemConfig."""
    linuxboot.apply(args)  # --kernel/--initrd/--initramfs-dir and the defaults they change
    target = args.target
    cpus = args.cpus
    cmdline = args.cmdline
    if args.timeout is not None and not args.timeout > 0:
        raise CorevisorError(f"--timeout: {args.timeout:g} s (give a positive number of seconds)")
    if target is None:
        # The demo (examples/demo.toml): build its guests if they are missing.
        for name in bundled.DEMO_GUESTS:
            bundled.ensure_built(name)
        target = str(bundled.DEMO_SYSTEM)
    if target.endswith(".toml"):
        flags = [f for f in ("cpus", "pin", "gdb", "disk", "net") if getattr(args, f) is not None]
        flags += ["rng"] if args.rng else []
        if flags:
            hint = " (give each partition a gdb key instead)" if flags[0] == "gdb" else ""
            raise CorevisorError(f"--{flags[0]} cannot be combined with a system file{hint}")
        system = load_config(Path(target), gdb_allow_remote=args.gdb_allow_remote)
        if args.gdb_attach:
            parts = tuple(replace(p, gdb_attach=p.gdb is not None) for p in system.partitions)
            system = replace(system, partitions=parts)
        return system
    if args.gdb_attach and args.gdb is None:
        raise CorevisorError("--gdb-attach needs --gdb HOST:PORT")
    if target in bundled.GUESTS and not Path(target).exists():
        target = str(bundled.ensure_built(target))
    part = partition_from_args(
        target,
        cpus=1 if cpus is None else cpus,
        memory=args.memory,
        pin=args.pin,
        cmdline=cmdline,
        serial=args.serial,
        initrd=args.initrd,
        gdb=args.gdb,
        gdb_attach=args.gdb_attach,
        gdb_allow_remote=args.gdb_allow_remote,
        disks=args.disk,
        nets=args.net,
        rng=args.rng,
    )
    return SystemConfig(partitions=(part,))


def _run_system(system: SystemConfig, args: argparse.Namespace) -> int:
    """Run every partition under the health monitor; see system.py for the exit status.
    With --stats/--stats-json, report every machine's statistics once all have closed."""
    from corevisor.system import System  # KVM imports only when running

    stats_json: Path | None = args.stats_json
    if stats_json is not None and not stats_json.parent.is_dir():
        where = stats_json.parent
        raise CorevisorError(f"--stats-json {stats_json}: directory {where} does not exist")
    sys_ = System(system, collect_stats=args.stats or stats_json is not None)
    try:
        return sys_.run(args.timeout)
    finally:
        if sys_.stats is not None:
            _report_stats(sys_.stats, system, args.stats, stats_json)


def _report_stats(
    runs: list[MachineRun], system: SystemConfig, text: bool, path: Path | None
) -> None:
    from corevisor import runstats

    host = runstats.host_summary()
    if text:
        for r in runs:
            lines = runstats.summary(r, host.get("kvm", ""), host.get("mmu", ""))
            print(lines, file=sys.stderr, flush=True)
    if path is not None:
        names = [p.name for p in system.partitions]
        runstats.write_json(path, runstats.document(runs, names, host))


def _list_guests(build: bool) -> int:
    if build:
        bundled.build_guests()
    for name, what in bundled.GUESTS.items():
        path = bundled.image_path(name)
        state = "" if path.exists() else "  (not built: corevisor guests --build)"
        print(f"{name:10} {path}{state}\n{'':10} {what}")
    return 0


def _host_report(as_json: bool) -> int:
    """`corevisor host`: 0 if corevisor can run here, 1 if /dev/kvm or a required
    capability is missing (the report says which)."""
    import json

    from corevisor.kvm import host

    info = host.detect()
    if as_json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print(host.format_report(info))
    usable = not info.dev_kvm and all(info.cap(c) for c in host.REQUIRED)
    return 0 if usable else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "guests":
            return _list_guests(args.build)
        if args.command == "host":
            return _host_report(args.json)
        system = _resolve(args)
        return _run_system(system, args)
    except CorevisorError as e:
        _err(str(e))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader went away (e.g. `| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def describe(part: PartitionConfig) -> str:
    """One line describing a partition, for logs."""
    pin = ",".join(map(str, part.pin)) or "any"
    return f"{part.name}: {part.image} cpus={part.cpus} memory={part.memory >> 20}M pin={pin}"


if __name__ == "__main__":
    sys.exit(main())
