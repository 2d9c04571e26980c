"""The one exception hierarchy of corevisor.

Everything the project raises on purpose derives from CorevisorError, so the CLI can
tell a user error (print one line, exit non-zero) from a bug (keep the traceback).
Beside it, the one way a message shows what a user typed: ``show`` (bare, for paths) and
``quote`` (in double quotes, for values), both safe to print on a terminal whatever the
input held (a newline, an ESC sequence, a NUL, bytes that are not UTF-8). Nothing else
lives here.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "CorevisorError",
    "ConfigError",
    "KvmError",
    "GuestMemoryError",
    "LoaderError",
    "DeviceError",
    "SnapshotError",
    "MigrationError",
    "ApiError",
    "GuestStopped",
    "show",
    "quote",
]

# C0 and C1 control characters, DEL, and the lone surrogates that os.fsdecode makes of
# bytes that are not UTF-8: printed raw they move the cursor, recolour the terminal or
# raise UnicodeEncodeError on the way out.
SHOW_LIMIT = 240
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0", "\x1b": "\\e"}


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape of a byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _unsafe(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code < 0xE000 or ch in "\u2028\u2029"


def show(value: object, limit: int | None = SHOW_LIMIT) -> str:
    """A user's text (a path, a name) as it may appear in a message: control characters,
    newlines and undecodable bytes escaped (\\n, \\e, \\x00, \\xff), the rest as is;
    longer than limit characters, its middle is elided (a 5000-byte path stays readable;
    limit None: a whole message, whose values were shown already)."""
    text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
    if limit is not None and len(text) > limit:
        keep = limit // 2
        text = f"{text[:keep]}...({len(text)} characters)...{text[-keep // 2:]}"
    if not any(_unsafe(ch) for ch in text):
        return text
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)


def quote(value: object) -> str:
    """A user value in a message: strings in double quotes (escaped like show, plus \\"
    and \\\\), booleans as true/false, the rest as repr (as TOML would write them)."""
    if isinstance(value, str):
        return '"' + show(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return show(repr(value))


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


class VfioError(CorevisorError):
    """A host PCI device cannot be passed through (vfio/): not bound to vfio-pci, its
    IOMMU group not viable, no IOMMU or no VFIO on the host; names the device."""


class SnapshotError(CorevisorError):
    """A snapshot file is corrupt, of the wrong version, or does not fit the machine."""


class MigrationError(CorevisorError):
    """A live migration failed or was refused; the source partition runs on."""


class ApiError(CorevisorError):
    """A corevisor daemon answered a client (corevisor ctl, top) with an error, or could not
    be reached; the message is the daemon's one line. status: the HTTP status (0: no
    answer at all)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class GuestStopped(CorevisorError):
    """A guest stopped abnormally (triple fault, emulation failure, ...).

    Carries a human-readable reason and a register dump, so the CLI can print a report
    without a Python traceback.
    """

    def __init__(self, reason: str, registers: str = "") -> None:
        self.reason = reason
        self.registers = registers
        super().__init__(reason)
