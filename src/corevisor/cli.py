"""The `corevisor` command: run a guest, a system file or the bundled demo; list guests.

User errors (bad config, bad image, missing /dev/kvm, a bad option: argparse's usage
dump is replaced by the same one line) print one line prefixed with "corevisor:", safe
to print whatever the user typed (errors.show), and exit 2; a guest that stops
abnormally (including one halted with interrupts off) prints a report with its
registers and exits 1; a guest that writes its status to the exit port makes corevisor
exit with that status (255 for any value above 255: devices/debug_exit.py). Output the
host cannot take (a closed stdout, a full disk, an unwritable stderr) changes neither
the guest nor the status (outputs.py). With several partitions: 0 if all of them ended
with 0, else the first non-zero status (system.py). SIGINT (Ctrl-C), SIGTERM and SIGHUP
stop the run cleanly and exit 128 + the signal number: 130, 143, 129 (signals.py). Only
bugs keep their traceback. `serve`, `ctl` and `top` (the daemon and its clients) live in
corevisor/api/, which `run` never imports.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from corevisor import bundled, linuxboot, provisioning
from corevisor.errors import CorevisorError, show
from corevisor.outputs import ensure_std_fds, notice
from corevisor.spec import SystemSpec

if TYPE_CHECKING:
    from corevisor.runstats import MachineRun

EXIT_USER_ERROR = 2
# The `run` options that describe one partition, and the partition key a system file
# has for each: with a system file they would be ambiguous, so they are refused.
PARTITION_OPTIONS = {
    "cpus": "cpus",
    "memory": "memory",
    "pin": "pin",
    "cmdline": "cmdline",
    "serial": "serial",
    "gdb": "gdb",
    "disk": "blk",
    "net": "net",
    "rng": "rng",
    "module": "modules",
    "device": "devices",
    "transport": "transport",
    "bios": "bios",
    "vfio": "vfio",
}


class UsageError(CorevisorError):
    """A command line argparse refused: one line, with where to find the usage."""

    def __init__(self, prog: str, message: str) -> None:
        command = prog.removeprefix("corevisor").strip()
        where = f"{command}: " if command else ""
        super().__init__(f"{where}{message} (see {prog} --help)")


class _Parser(argparse.ArgumentParser):
    """argparse, failing as a UsageError instead of printing its usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _err(msg: str) -> None:
    # an unwritable stderr loses the line, not the status (outputs.py)
    notice(f"corevisor: {show(msg, limit=None)}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="corevisor", description="A multicore partitioning hypervisor on Linux KVM.")
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
    run.add_argument(
        "--serial", default=None, help="stdout | file:PATH | unix:PATH | null (default stdout)"
    )
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
        "--transport",
        choices=("mmio", "pci"),
        default=None,
        help="how the virtio devices are attached: virtio-mmio windows (default) or "
        "virtio-pci functions with MSI-X (the default with --bios)",
    )
    run.add_argument(
        "--bios",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="boot the first --disk through a BIOS instead of an IMAGE (default PATH: "
        "Debian's SeaBIOS, /usr/share/seabios/bios-256k.bin)",
    )
    run.add_argument(
        "--vfio",
        action="append",
        metavar="DOMAIN:BUS:DEV.FN",
        help="pass a host PCI device bound to vfio-pci through to the guest, its DMA "
        "confined to the guest's RAM by the IOMMU (repeatable; e.g. 0000:00:04.0)",
    )
    run.add_argument(
        "--module",
        action="append",
        metavar="FILE[,STRING]",
        help="a multiboot module, with its string (default FILE); repeatable",
    )
    run.add_argument(
        "--device",
        action="append",
        metavar="CLASS[,KEY=VALUE...]",
        help="a device model written in Python, 'package.module:Class' or 'FILE.py:Class', "
        "with its parameters (docs/devices.md); repeatable",
    )
    run.add_argument(
        "--sandbox",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="confine every VMM thread to its seccomp allowlist (default: on, or the "
        "system file's [system] sandbox); --no-sandbox turns it off",
    )
    run.add_argument(
        "--jail",
        metavar="DIR",
        default=None,
        help="(root) run in new mount/PID/IPC namespaces, pivoted into DIR holding only "
        "what the run needs, as --uid/--gid (docs/sandbox.md)",
    )
    run.add_argument("--uid", default=None, help="with --jail: the user to run as (id or name)")
    run.add_argument("--gid", default=None, help="with --jail: the group to run as (id or name)")
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
    provisioning.add_arguments(run)
    guests = sub.add_parser("guests", help="list the bundled guests and their image paths")
    guests.add_argument("--build", action="store_true", help="(re)build them first")
    host = sub.add_parser(
        "host", help="what this host's KVM is: flavour, MMU mode, capabilities, cores"
    )
    host.add_argument("--json", action="store_true", help="print it as one JSON object")
    # Parsed by corevisor/api/commands.py (main hands them over first); listed for --help.
    sub.add_parser("serve", help="run a daemon holding a system, controlled by an API")
    sub.add_parser("ctl", help="drive a running daemon (ps, add, start, pause, logs, ...)")
    sub.add_parser("top", help="a live view of a running daemon's partitions")
    return p


def _given(args: argparse.Namespace) -> list[str]:
    """The per-partition options the user gave (before any default is filled in)."""
    return [
        flag
        for flag in PARTITION_OPTIONS
        if getattr(args, flag) not in (None, False)
    ]


def _resolve(args: argparse.Namespace) -> SystemSpec:
    """Turn the run arguments into a validated SystemSpec."""
    given = _given(args)
    linuxboot.apply(args)  # --kernel/--initrd/--initramfs-dir and the defaults they change
    target = args.target
    cpus = args.cpus
    cmdline = args.cmdline
    if args.timeout is not None and not args.timeout > 0:
        raise CorevisorError(f"--timeout: {args.timeout:g} s (give a positive number of seconds)")
    if args.bios is not None:
        return _bios_system(args, target)
    if target is None:
        # The demo (examples/demo.toml): build its guests if they are missing.
        for name in bundled.DEMO_GUESTS:
            bundled.ensure_built(name)
        target = str(bundled.DEMO_SYSTEM)
    if target.endswith(".toml"):
        if given:
            flag = given[0]
            raise CorevisorError(
                f"--{flag} cannot be combined with a system file ({show(target)}): give "
                f"each partition a {PARTITION_OPTIONS[flag]} key instead"
            )
        from corevisor.config.toml import load_config  # the readers only when needed

        system = load_config(Path(target), gdb_allow_remote=args.gdb_allow_remote)
        if args.gdb_attach:
            parts = tuple(replace(p, gdb_attach=p.gdb is not None) for p in system.partitions)
            system = replace(system, partitions=parts)
        return system
    if args.gdb_attach and args.gdb is None:
        raise CorevisorError("--gdb-attach needs --gdb HOST:PORT")
    if target in bundled.GUESTS and not Path(target).exists():
        target = str(bundled.ensure_built(target))
    from corevisor.config.args import partition_from_args

    part = partition_from_args(
        target, cmdline=cmdline, initrd=args.initrd, modules=args.module,
        **_machine_options(args, cpus),
    )
    return SystemSpec(partitions=(part,))


def _machine_options(args: argparse.Namespace, cpus: int | None) -> dict[str, Any]:
    """The `run` options an image machine and a BIOS machine take alike."""
    return {
        "cpus": 1 if cpus is None else cpus,
        "memory": args.memory,
        "pin": args.pin,
        "serial": args.serial if args.serial is not None else "stdout",
        "gdb": args.gdb,
        "gdb_attach": args.gdb_attach,
        "gdb_allow_remote": args.gdb_allow_remote,
        "disks": args.disk,
        "nets": args.net,
        "rng": args.rng,
        "devices": args.device,
        "transport": args.transport,
        "vfio": args.vfio,
    }


def _bios_system(args: argparse.Namespace, target: str | None) -> SystemSpec:
    """`run --bios [PATH] --disk IMG`: one machine booting its disk through the BIOS."""
    from corevisor.config.args import bios_partition_from_args
    from corevisor.config.files import DEFAULT_BIOS

    if target is not None:
        raise CorevisorError(f"--bios boots from its disk: IMAGE {show(target)} is not used "
                             "(give the disk with --disk)")
    for flag in ("cmdline", "initrd", "module"):
        if getattr(args, flag, None):
            raise CorevisorError(f"--{flag} cannot be combined with --bios: the BIOS boots "
                                 "from the disk, with no kernel of corevisor's")
    part = bios_partition_from_args(args.bios or str(DEFAULT_BIOS),
                                    **_machine_options(args, args.cpus))
    return SystemSpec(partitions=(part,))


def _run_system(config: SystemSpec, args: argparse.Namespace) -> int:
    """Run every partition under the health monitor; see system.py for the exit status.

    SIGINT, SIGTERM and SIGHUP stop every partition cleanly (terminal restored, unix:
    sockets removed) and the run exits with 128 + the signal's number. With --stats /
    --stats-json, every machine's statistics are reported once all have closed.
    """
    from corevisor.signals import stop_signals  # KVM imports only when running
    from corevisor.system import System

    stats_json: Path | None = args.stats_json
    if stats_json is not None and not stats_json.parent.is_dir():
        where = stats_json.parent
        raise CorevisorError(f"--stats-json {stats_json}: directory {where} does not exist")
    system = System(config, collect_stats=args.stats or stats_json is not None)
    try:
        with stop_signals(system.request_stop):
            return system.run(args.timeout)
    finally:
        if system.stats is not None:
            _report_stats(system.stats, config, args.stats, stats_json)


def _report_stats(
    runs: list[MachineRun], config: SystemSpec, text: bool, path: Path | None
) -> None:
    from corevisor import runstats

    host = runstats.host_summary()
    if text:
        for r in runs:
            lines = runstats.summary(r, host.get("kvm", ""), host.get("mmu", ""))
            print(lines, file=sys.stderr, flush=True)
    if path is not None:
        names = [p.name for p in config.partitions]
        runstats.write_json(path, runstats.document(runs, names, host))


def _id(value: str, flag: str, lookup: Callable[[str], int]) -> int:
    """A numeric id, or a name looked up in the user or group database."""
    if value.isdigit():
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise CorevisorError(f"{flag} {show(value)}: no such user or group") from None


def _jail(system: SystemSpec, args: argparse.Namespace) -> SystemSpec:
    """--jail DIR --uid U --gid G: continue inside the jail (sandbox/jail.py)."""
    if args.jail is None:
        raise CorevisorError("--uid and --gid go with --jail DIR")
    if args.uid is None or args.gid is None:
        raise CorevisorError("--jail needs --uid and --gid (the unprivileged user to run as)")
    import grp
    import pwd

    from corevisor.sandbox import jail

    uid = _id(args.uid, "--uid", lambda n: pwd.getpwnam(n).pw_uid)
    gid = _id(args.gid, "--gid", lambda n: grp.getgrnam(n).gr_gid)
    return jail.enter(system, Path(args.jail), uid, gid)


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


API_COMMANDS = ("serve", "ctl", "top")  # corevisor/api/: never imported by `run`


def main(argv: Sequence[str] | None = None) -> int:
    ensure_std_fds()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in API_COMMANDS:
            from corevisor.api.commands import main as api_main

            return api_main(argv)
        args = _parser().parse_args(argv)
        if args.command == "guests":
            return _list_guests(args.build)
        if args.command == "host":
            return _host_report(args.json)
        if provisioning.wanted(args):
            return provisioning.run(args)
        system = _resolve(args)
        if args.sandbox is not None:
            system = replace(system, sandbox=args.sandbox)
        if args.jail is not None or args.uid is not None or args.gid is not None:
            system = _jail(system, args)
        if system.sandbox:
            from corevisor import sandbox

            sandbox.enable()
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


if __name__ == "__main__":
    sys.exit(main())
