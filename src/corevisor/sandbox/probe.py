"""The sandbox's test hook: a POST-code port that makes a forbidden call (tests only).

With COREVISOR_SANDBOX_PROBE=CALL in the environment (CALL one of PROBES), the builder
puts a Probe on port 0x80 instead of the plain POST-code sink. The guest's first write
there makes its vCPU thread try CALL, as a device model gone wrong would: under the
sandbox the call never happens and the run ends with the report (exit status 159);
without it the call is made, and the probe says so on stderr and exits 1. The `pio`
guest writes port 0x80 (`pio count=1`). The variable changes nothing else: it is a
way to make a run fail, never a way to get past a filter.

What does not live here: the filters (policy.py), the report (_sigsys.c).
"""

from __future__ import annotations

import os
import socket
import sys

from corevisor.devices.postcode import PostCode

__all__ = ["ENV", "PROBES", "Probe", "probe_from_env"]

ENV = "COREVISOR_SANDBOX_PROBE"


def _open() -> None:
    os.close(os.open("/etc/hostname", os.O_RDONLY))


def _execve() -> None:
    os.execv("/bin/true", ["true"])


def _socket() -> None:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()


def _fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


PROBES = {"open": _open, "execve": _execve, "socket": _socket, "fork": _fork}


class Probe(PostCode):
    """A POST-code sink whose first write tries a call no vCPU may make."""

    def __init__(self, call: str) -> None:
        super().__init__()
        self._call = PROBES[call]
        self._name = call

    def write(self, offset: int, data: bytes) -> None:
        """The first write makes the call (later ones are plain POST codes)."""
        first = self.writes == 0
        super().write(offset, data)
        if first:
            self._call()
            print(f"corevisor: sandbox probe: {self._name} was allowed", file=sys.stderr,
                  flush=True)
            os._exit(1)


def probe_from_env() -> PostCode:
    """The port-0x80 device: a Probe if the environment asks for one, else a PostCode."""
    call = os.environ.get(ENV)
    if not call:
        return PostCode()
    if call not in PROBES:
        from corevisor.errors import ConfigError

        raise ConfigError(f"{ENV}={call}: not one of {', '.join(PROBES)}")
    return Probe(call)
