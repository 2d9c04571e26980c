"""The one exception hierarchy of corevisor.

Everything the project raises on purpose derives from CorevisorError, so the CLI can
tell a user error (print one line, exit non-zero) from a bug (keep the traceback).
Nothing else lives here.
"""

from __future__ import annotations

import errno as _errno
import os


class CorevisorError(Exception):
    """Base of every error corevisor raises on purpose."""


class ConfigError(CorevisorError):
    """A configuration (TOML file or command line) is invalid; the message names the key."""


class KvmError(CorevisorError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed; names the ioctl and the errno."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {name} ({os.strerror(err)})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class StateError(CorevisorError):
    """An operation the target's lifecycle state does not allow, e.g.
    ``cannot pause partition rtos: it is stopped`` (an API answers 409 Conflict)."""


class NotFoundError(CorevisorError):
    """No partition (or other named object) by that name (an API answers 404)."""


class GuestMemoryError(CorevisorError):
    """A guest-physical access fell outside guest RAM (the software IOMMU said no)."""


class LoaderError(CorevisorError):
    """A guest image could not be loaded; the message names the file and the reason."""


class DeviceError(CorevisorError):
    """A device model was misused or given invalid state."""


class SnapshotError(CorevisorError):
    """A snapshot file is corrupt, of the wrong version, or does not fit the machine."""


class GuestStopped(CorevisorError):
    """A guest stopped abnormally (triple fault, emulation failure, ...).

    Carries a human-readable reason and a register dump, so the CLI can print a report
    without a Python traceback.
    """

    def __init__(self, reason: str, registers: str = "") -> None:
        self.reason = reason
        self.registers = registers
        super().__init__(reason)
