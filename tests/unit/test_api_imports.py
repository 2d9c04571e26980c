"""`corevisor run` imports nothing of the daemon and its clients (their start-up is not
run's to pay): the CLI hands serve, ctl and top to corevisor.api only."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("corevisor.api", "http.server", "http.client", "rich", "prometheus_client",
         "msgspec", "socketserver")


def _loaded_after(code: str) -> set[str]:
    probe = (
        "import sys\n" + code + "\n"
        f"print(' '.join(m for m in sys.modules if m.startswith({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_run_path_imports_no_api() -> None:
    code = (
        "from corevisor import cli\n"
        "args = cli._parser().parse_args(['run', 'hello', '--cpus', '1'])\n"
        "import corevisor.system, corevisor.builder, corevisor.console\n"
    )
    assert _loaded_after(code) == set()


def test_ctl_imports_the_client_but_not_the_server() -> None:
    code = (
        "from corevisor.api import commands\n"
        "commands._parser().parse_args(['ctl', 'ps'])\n"
        "import corevisor.api.ctl\n"
    )
    loaded = _loaded_after(code)
    assert "http.client" in loaded
    assert not loaded & {"http.server", "corevisor.api.server", "rich", "socketserver"}
