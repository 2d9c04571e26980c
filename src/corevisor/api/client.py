"""A client of a corevisor daemon: HTTP/1.1 over its unix socket (for ctl, top, tests).

Every error comes back as one ApiError line: the daemon's own message for an error
answer (its HTTP status kept in ``status``), or what kept the client from getting one
(``cannot reach the corevisor daemon at PATH: ...``). What does not live here: the
commands that use it (ctl.py, top.py).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from corevisor.errors import ApiError, show

__all__ = ["Client", "default_socket"]

TIMEOUT = 120.0  # seconds: a request that builds a partition takes a while on a busy host


def default_socket() -> str:
    """$COREVISOR_SOCKET, else /run/corevisor.sock for root, else one in the user's
    runtime directory (XDG_RUNTIME_DIR, else /tmp)."""
    env = os.environ.get("COREVISOR_SOCKET")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/corevisor.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(runtime, f"corevisor-{os.geteuid()}.sock")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Requests to the daemon at socket_path, one connection per request."""

    def __init__(self, socket_path: str, timeout: float | None = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _unreachable(self, e: OSError) -> ApiError:
        reason = e.strerror or str(e) or type(e).__name__
        hint = " (is `corevisor serve` running?)" if isinstance(
            e, FileNotFoundError | ConnectionRefusedError) else ""
        return ApiError(
            f"cannot reach the corevisor daemon at {show(self.socket_path)}: {reason}{hint}"
        )

    def open(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> http.client.HTTPResponse:
        """Send a request; the response with its body unread (raises ApiError on >= 400)."""
        conn = _UnixConnection(self.socket_path, timeout if timeout is not None else self.timeout)
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if isinstance(e, OSError):
                raise self._unreachable(e) from None
            raise ApiError(f"the corevisor daemon's answer was not HTTP: {show(e)}") from None
        if response.status >= 400:
            raw = response.read()
            conn.close()
            raise ApiError(_message(raw, response.status), response.status)
        return response

    def request(self, method: str, path: str, body: Any = None) -> bytes:
        """The whole answer's body."""
        response = self.open(method, path, body)
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(f"the corevisor daemon's answer broke off: {show(e)}") from None
        finally:
            response.close()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        raw = self.request(method, path, body)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError("the corevisor daemon's answer was not JSON") from None

    def stream(self, path: str) -> Iterator[bytes]:
        """A streamed answer's bytes as they arrive, until the daemon ends it."""
        response = self.open("GET", path, timeout=None)
        try:
            while True:
                try:
                    chunk = response.read1(65536)
                except (OSError, http.client.HTTPException) as e:
                    raise ApiError(f"the corevisor daemon's stream broke off: {show(e)}") from None
                if not chunk:
                    return
                yield chunk
        finally:
            response.close()


def _message(raw: bytes, status: int) -> str:
    """The error line of an error answer (its JSON "error"), else the status."""
    try:
        message = json.loads(raw)["error"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return f"the corevisor daemon answered {status} {http.client.responses.get(status, '')}"
