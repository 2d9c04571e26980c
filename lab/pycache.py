"""Bytecode for the L1 guest, compiled on the host before it boots.

In the L1 guest Python runs ~30x slower and every stat over 9p costs milliseconds, so
compiling a module there costs seconds, and on the read-only root the result could not
even be kept. So before each boot the lab compiles, on the host and with the
interpreter the command will use, everything it is likely to import (the repository's
src/, tests/, lab/ and bench/, the venv's site-packages, the interpreter's standard
library without its tests) into one directory, and the guest's PYTHONPYCACHEPREFIX
points there, shared writable: whatever was missed is compiled once in the guest and
kept on the host for the next run (pytest's rewritten test modules go there too).
compileall skips what is up to date, so the step costs well under a second after the
first time.

What does not live here: sharing the directory with the guest (vm.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["precompile", "REPO", "default_python"]

REPO = Path(__file__).resolve().parent.parent
# Run by the command's interpreter (it may be another Python version than lab/run's).
_COMPILE = r"""
import compileall, re, sys, sysconfig, site
skip = re.compile(r"/(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip|site-packages)/")
ok = True
for d in sys.argv[1:]:
    ok &= compileall.compile_dir(d, quiet=2, workers=1)
ok &= compileall.compile_dir(sysconfig.get_paths()["stdlib"], quiet=2, workers=1, rx=skip)
for d in site.getsitepackages():
    ok &= compileall.compile_dir(d, quiet=2, workers=1)
"""


def default_python() -> Path:
    """The repository's venv interpreter if it exists, else the one running the lab."""
    venv = REPO / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def precompile(prefix: Path, python: Path | None = None) -> None:
    """Compile the repository, the venv and the stdlib into prefix, for python."""
    prefix.mkdir(parents=True, exist_ok=True)
    dirs = [str(REPO / d) for d in ("src", "tests", "lab", "bench") if (REPO / d).is_dir()]
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(prefix.resolve()))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # Files that do not compile (a syntax error in a test) are the command's business,
    # and the guest will say so; the lab does not fail on them.
    subprocess.run([str(python or default_python()), "-c", _COMPILE, *dirs], env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False)
