"""Run the fuzz targets with atheris (libFuzzer) for a time budget each; report executions.

    python -m fuzz.run [--seconds S] [TARGET ...]     # every target by default (make fuzz)
    python -m fuzz.run --replay TARGET FILE ...       # rerun inputs, e.g. a crash file

Each target runs in a process of its own (``--child``), with corevisor's modules
instrumented for coverage as they are imported. libFuzzer reads the target's seed
corpus in ``fuzz/corpus/TARGET`` and writes the inputs it finds into a scratch corpus
(``fuzz/work/TARGET``, not in git), so the repository's corpus stays small; a crash
input lands in ``fuzz/work/crashes``. To keep one: copy it into ``fuzz/corpus/TARGET``
(the pytest replay then holds it fixed) and fix the bug at its root.

The summary gives, per target, the executions, their rate, the coverage features and
the corpus size libFuzzer ended with, and whether it crashed; ``--json`` writes it too.
The exit status is non-zero if any target crashed. Targets that need /dev/kvm are
skipped, loudly, where it is absent.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
WORK = HERE / "work"
# Per input: a target that takes longer than this has hung (libFuzzer's -timeout).
INPUT_TIMEOUT = 30
RSS_LIMIT_MB = 4096
_STAT = re.compile(r"stat::(\w+):\s+(\d+)")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


@dataclass
class Result:
    target: str
    seconds: int
    executions: int
    per_second: int
    features: int
    corpus: int
    crashed: bool
    note: str = ""


def _targets() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from fuzz.targets import KVM, TARGETS

    return TARGETS, KVM


def child(name: str, libfuzzer_args: list[str]) -> None:
    """Inside the fuzzing process: instrument corevisor, then hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["corevisor", "fuzz"]):
        module = importlib.import_module(f"fuzz.targets.{name}")
    atheris.Setup([sys.argv[0], *libfuzzer_args], module.one_input)
    atheris.Fuzz()


def _run_one(name: str, seconds: int) -> Result:
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    crashes = WORK / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / name
    seeds.mkdir(parents=True, exist_ok=True)
    log = WORK / f"{name}.log"
    args = [
        f"-max_total_time={seconds}",
        f"-timeout={INPUT_TIMEOUT}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        "-print_final_stats=1",
        f"-artifact_prefix={crashes}/{name}-",
        str(work),
        str(seeds),
    ]
    cmd = [sys.executable, "-m", "fuzz.run", "--child", name, "--", *args]
    start = time.monotonic()
    with log.open("w") as out:
        # Generous wall limit: libFuzzer stops itself at max_total_time; this only
        # catches a target wedged outside an input (then it counts as a crash).
        try:
            rc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=seconds * 2 + 300, check=False, cwd=HERE.parent,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    elapsed = max(int(time.monotonic() - start), 1)
    text = log.read_text(errors="replace")
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    done = _DONE.findall(text)
    runs = stats.get("number_of_executed_units") or (int(done[-1][0]) if done else 0)
    fuzz_seconds = int(done[-1][1]) if done else elapsed
    features = re.findall(r"ft: (\d+)", text)
    corpus = re.findall(r"corp: (\d+)/", text)
    return Result(
        target=name,
        seconds=fuzz_seconds,
        executions=runs,
        per_second=runs // max(fuzz_seconds, 1),
        features=int(features[-1]) if features else 0,
        corpus=int(corpus[-1]) if corpus else 0,
        crashed=rc != 0,
        note=f"exit {rc}, see {log}" if rc != 0 else "",
    )


def replay(name: str, files: list[str]) -> int:
    """Feed files to one target without the fuzzer (a crash reproduces with a traceback)."""
    module = importlib.import_module(f"fuzz.targets.{name}")
    for f in files:
        module.one_input(Path(f).read_bytes())
        print(f"{name}: {f}: ok")
    return 0


def _table(results: list[Result]) -> str:
    rows = [f"{'target':14} {'seconds':>7} {'executions':>11} {'exec/s':>7} "
            f"{'features':>8} {'corpus':>6}  result"]
    for r in results:
        rows.append(
            f"{r.target:14} {r.seconds:>7} {r.executions:>11} {r.per_second:>7} "
            f"{r.features:>8} {r.corpus:>6}  {'CRASH ' + r.note if r.crashed else 'ok'}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", help="targets to run (default: all)")
    p.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "180")))
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--replay", nargs="+", metavar=("TARGET", "FILE"), default=None)
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay[0], args.replay[1:])
    names, kvm = _targets()
    chosen = args.targets or list(names)
    unknown = [t for t in chosen if t not in names]
    if unknown:
        p.error(f"unknown target {unknown[0]} (known: {', '.join(names)})")
    results = []
    for name in chosen:
        if name in kvm and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            print(f"fuzz: SKIPPING {name}: /dev/kvm is not usable here", file=sys.stderr)
            continue
        print(f"fuzz: {name} for {args.seconds} s ...", file=sys.stderr, flush=True)
        results.append(_run_one(name, args.seconds))
    print(_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 1 if any(r.crashed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
