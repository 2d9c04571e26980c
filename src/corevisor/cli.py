"""The `corevisor` command: run a guest, a system file or the bundled demo; list guests.

User errors (bad config, bad image, missing /dev/kvm) print one line prefixed with
"corevisor:" and exit 2; a guest that stops abnormally prints a report with its
registers and exits 1; a guest that writes its status to the exit port makes corevisor
exit with that status (255 for any value above 255: devices/debug_exit.py). Output the
host cannot take (a closed stdout, a full disk, an unwritable stderr) changes neither
the guest nor the status (outputs.py). With several partitions: 0 if all of them ended
with 0, else the first non-zero status (system.py). Only bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from corevisor import bundled, linuxboot
from corevisor.config import PartitionConfig, SystemConfig, load_config, partition_from_args
from corevisor.errors import CorevisorError
from corevisor.outputs import ensure_std_fds, notice

EXIT_USER_ERROR = 2



def _err(msg: str) -> None:
    notice(f"corevisor: {msg}")  # an unwritable stderr loses the line, not the status


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
    linuxboot.add_arguments(run)
    guests = sub.add_parser("guests", help="list the bundled guests and their image paths")
    guests.add_argument("--build", action="store_true", help="(re)build them first")
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


def _run_system(system: SystemConfig, timeout: float | None) -> int:
    """Run every partition under the health monitor; see system.py for the exit status."""
    from corevisor.system import System  # KVM imports only when running

    return System(system).run(timeout)


def _list_guests(build: bool) -> int:
    if build:
        bundled.build_guests()
    for name, what in bundled.GUESTS.items():
        path = bundled.image_path(name)
        state = "" if path.exists() else "  (not built: corevisor guests --build)"
        print(f"{name:10} {path}{state}\n{'':10} {what}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ensure_std_fds()
    args = _parser().parse_args(argv)
    try:
        if args.command == "guests":
            return _list_guests(args.build)
        system = _resolve(args)
        return _run_system(system, args.timeout)
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
