"""The `corevisor` command: run a guest, a system file or the bundled demo; list guests.

User errors (bad config, bad image, missing /dev/kvm) print one line prefixed with
"corevisor:" and exit 2; a guest that stops abnormally prints a report with its
registers and exits 1; a guest that writes its status to the exit port makes corevisor
exit with that status. Only bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from corevisor import bundled
from corevisor.config import PartitionConfig, SystemConfig, load_config, partition_from_args
from corevisor.errors import CorevisorError
from corevisor.vcpu import StopReport

EXIT_USER_ERROR = 2
EXIT_GUEST_FAULT = 1

# The demo: the SMP guest on two vCPUs, each CPU started by the guest and checking in.
DEMO_GUEST, DEMO_CPUS, DEMO_CMDLINE = "smp", 2, "demo"


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
    run.add_argument("--memory", default="64M", help="guest RAM, e.g. 64M or 1G")
    run.add_argument("--pin", default=None, help="host cores for the vCPUs, e.g. 0,1 or 0-3")
    run.add_argument("--cmdline", default="", help="guest command line")
    run.add_argument(
        "--serial", default="stdout", help="stdout | file:PATH | unix:PATH | null"
    )
    run.add_argument("--timeout", type=float, default=None, help="stop the guest after S s")
    guests = sub.add_parser("guests", help="list the bundled guests and their image paths")
    guests.add_argument("--build", action="store_true", help="(re)build them first")
    return p


def _resolve(args: argparse.Namespace) -> SystemConfig:
    """Turn the run arguments into a validated SystemConfig."""
    target = args.target
    cpus = args.cpus
    cmdline = args.cmdline
    if target is None:
        target, cpus, cmdline = DEMO_GUEST, cpus or DEMO_CPUS, cmdline or DEMO_CMDLINE
    if target.endswith(".toml"):
        flags = [f for f in ("cpus", "pin") if getattr(args, f) is not None]
        if flags:
            raise CorevisorError(f"--{flags[0]} cannot be combined with a system file")
        return load_config(Path(target))
    if target in bundled.GUESTS and not Path(target).exists():
        target = str(bundled.ensure_built(target))
    part = partition_from_args(
        target,
        cpus=cpus or 1,
        memory=args.memory,
        pin=args.pin,
        cmdline=cmdline,
        serial=args.serial,
    )
    return SystemConfig(partitions=(part,))


def _outcome(name: str, report: StopReport) -> int:
    """Print why a partition stopped and return its exit status."""
    if report.kind == "exit":
        _err(f"{name}: {report.message}")
        return report.code or 0
    if report.kind == "reset":
        _err(f"{name}: {report.message}")
        return 0
    if report.kind == "stopped":
        _err(f"{name}: stopped: {report.message}")
        return report.code if report.code is not None else EXIT_GUEST_FAULT
    _err(f"{name}: guest stopped: {report.message}")
    if report.registers:
        print(report.registers, file=sys.stderr, flush=True)
    return EXIT_GUEST_FAULT


def _run_system(system: SystemConfig, timeout: float | None) -> int:
    """Build every partition, run them side by side, return the first non-zero status."""
    from corevisor.builder import build  # KVM imports only when running

    machines = []
    try:
        for part in system.partitions:
            machines.append((part, build(part)))
        for _, m in machines:
            m.start()
        status = 0
        for part, m in machines:
            report = m.outcome(timeout)
            status = status or _outcome(part.name, report)
        return status
    finally:
        for _, m in machines:
            m.close()


def _list_guests(build: bool) -> int:
    if build:
        bundled.build_guests()
    for name, what in bundled.GUESTS.items():
        path = bundled.image_path(name)
        state = "" if path.exists() else "  (not built: corevisor guests --build)"
        print(f"{name:10} {path}{state}\n{'':10} {what}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
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
