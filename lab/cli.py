"""`lab/run [--npt 0|1] [--cpus N] [--memory SIZE] [--iommu] [--timeout S] -- COMMAND...`

Prints the command's stdout and stderr as they come and exits with its status; every
failure of the lab itself is one line starting "lab:" and its own exit status
(lab.vm.Exit, listed in lab/README.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lab.vm import Exit, LabError, run

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lab/run",
        description="Run COMMAND in an L1 Linux guest with a hardware-assisted KVM "
        "(QEMU-TCG, emulated AMD SVM), chrooted into this host's root, in this directory.",
    )
    p.add_argument("--npt", type=int, choices=(0, 1), default=1,
                   help="kvm_amd nested paging: 1 (default) or 0 (shadow paging)")
    p.add_argument("--cpus", type=int, default=2, help="L1 vCPUs (default 2)")
    p.add_argument("--memory", default="4G", help="L1 RAM, QEMU syntax (default 4G)")
    p.add_argument("--iommu", action="store_true",
                   help="an Intel IOMMU (intel_iommu=on) and QEMU's edu PCI device (1234:11e8)")
    p.add_argument("--cpu", default="max",
                   help="QEMU's CPU model (default max: AMD with SVM and nested paging)")
    p.add_argument("--l1-cmdline", default="", metavar="ARGS",
                   help="more L1 kernel parameters, e.g. kvm_amd.vgif=0 (MODULE.x=y reach modules)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="kill QEMU after S seconds (default 1800)")
    p.add_argument("--writable", action="append", default=[], metavar="DIR",
                   help="a host directory the command may write (repeatable)")
    p.add_argument("--console", metavar="FILE", default=None,
                   help="save the L1 kernel's console there (to see why a boot failed)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM (a CI timeout, kill): unwind, so QEMU is killed and the share removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise LabError("no command (lab/run [OPTIONS] -- COMMAND...)", Exit.SETUP)
        if args.cpus < 1 or args.timeout <= 0:
            raise LabError("--cpus and --timeout must be positive", Exit.SETUP)
        result = run(command, npt=bool(args.npt), cpus=args.cpus, memory=args.memory,
                     iommu=args.iommu, cpu=args.cpu, l1_cmdline=args.l1_cmdline,
                     timeout=args.timeout,
                     writable=[Path(w) for w in args.writable],
                     stdout=sys.stdout.buffer, stderr=sys.stderr.buffer)
    except LabError as e:
        _save(args.console, e.console)
        print(f"lab: {e}", file=sys.stderr, flush=True)
        return e.status
    except KeyboardInterrupt:
        return 130
    _save(args.console, result.console)
    return result.status


def _save(path: str | None, console: bytes) -> None:
    if path is not None:
        Path(path).write_bytes(console)
