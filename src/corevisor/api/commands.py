"""The command lines of `corevisor serve`, `corevisor ctl` and `corevisor top`.

cli.py hands any command line starting with one of them to ``main`` here, so `corevisor
run` never imports this package. Exit statuses: 0; 1 when the daemon answered with an
error or could not be reached (its one line on stderr as ``corevisor: ...``); 2 for a
user error on this side (a bad option, a bad system file, a socket path in use), as
for `corevisor run`; 130 when Ctrl-C ends `ctl logs -f`, `ctl events -f` or `top`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from corevisor.errors import ApiError

__all__ = ["main", "COMMANDS"]

COMMANDS = ("serve", "ctl", "top")
EXIT_API_ERROR = 1


def _socket(parser: argparse.ArgumentParser) -> None:
    from corevisor.api.client import default_socket

    parser.add_argument(
        "--socket", metavar="PATH", default=default_socket(),
        help="the daemon's unix socket (default $COREVISOR_SOCKET, else %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    from corevisor.api.ctl import VERBS
    from corevisor.cli import _Parser

    top = _Parser(prog="corevisor")
    sub = top.add_subparsers(dest="tool", required=True)
    serve = sub.add_parser("serve", help="run a daemon holding a system, with an API")
    _socket(serve)
    serve.add_argument("system", nargs="?", metavar="SYSTEM.toml",
                       help="partitions to start with (default: none)")
    serve.add_argument("--sandbox", action=argparse.BooleanOptionalAction, default=None,
                       help="seccomp per thread role, as for run (default: on, or the "
                       "file's [system] sandbox)")

    ctl = sub.add_parser("ctl", help="drive a running daemon")
    _socket(ctl)
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="the API's JSON instead of a table")
    ctl.add_argument("--json", action="store_true", default=False,
                     help="the API's JSON instead of a table")
    cmds = ctl.add_subparsers(dest="command", required=True)
    cmds.add_parser("ps", parents=[as_json], help="list partitions")
    add = cmds.add_parser("add", parents=[as_json], help="create the partitions of a file")
    add.add_argument("file", metavar="FILE", nargs="?", help="a system TOML file")
    add.add_argument("--start", action="store_true", help="start each one at once")
    from corevisor.api.ctl import add_provision_arguments

    add_provision_arguments(cmds, add, as_json)
    for verb in VERBS:
        p = cmds.add_parser(verb, parents=[as_json], help=f"{verb} partitions")
        p.add_argument("names", nargs="+", metavar="NAME")
    rm = cmds.add_parser("rm", parents=[as_json], help="remove created or stopped partitions")
    rm.add_argument("names", nargs="+", metavar="NAME")
    inspect = cmds.add_parser("inspect", help="one partition, as JSON")
    inspect.add_argument("name", metavar="NAME")
    logs = cmds.add_parser("logs", help="a partition's serial output")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing")
    events = cmds.add_parser("events", parents=[as_json], help="the event log")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing")
    cmds.add_parser("metrics", parents=[as_json], help="Prometheus metrics")

    view = sub.add_parser("top", help="a live view of a running daemon's partitions")
    _socket(view)
    view.add_argument("--interval", type=float, default=1.0, metavar="S",
                      help="seconds between updates (default 1)")
    view.add_argument("--once", action="store_true", help="print one view and exit")
    return top


def main(argv: Sequence[str]) -> int:
    """Run serve, ctl or top; CorevisorErrors other than ApiError reach cli.main (exit 2)."""
    args = _parser().parse_args(argv)
    try:
        if args.tool == "serve":
            return _serve(args)
        if args.tool == "top":
            from corevisor.api.top import run_top

            return run_top(args.socket, args.interval, args.once)
        from corevisor.api.ctl import run_command

        return run_command(args)
    except ApiError as e:
        from corevisor.cli import _err

        _err(str(e))
        return EXIT_API_ERROR
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from corevisor.api.daemon import serve

    config = None
    if args.system is not None:
        from corevisor.config.toml import load_config

        config = load_config(Path(args.system))
    sandboxed = args.sandbox if args.sandbox is not None else (config is None or config.sandbox)
    if sandboxed:  # as `run` does (docs/sandbox.md): every daemon thread under control's
        from corevisor import sandbox

        sandbox.enable()
    return serve(args.socket, config, err=sys.stderr)
