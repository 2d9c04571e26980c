"""HTTP/1.1 on a unix socket: the transport of the API, and its limits on hostile clients.

The socket file is created with mode 0600 before any client can see it (console.
listen_unix), so only its owner (and root) may connect. One thread accepts ("api-accept")
and each connection gets a thread of its own ("api-conn-N", both through signals.
start_thread, so no signal lands on them), so a client that sends its request slowly, or
never, delays nobody else. The stdlib's http.server parses requests (request line,
headers: at most 100 of them, 64 KiB a line); everything it answers is JSON here.

Limits, each answered with a JSON error and the connection closed (a 4xx keeps nothing
of the client's): a request's line, headers and body must all arrive within
REQUEST_TIMEOUT (408; an idle keep-alive connection is closed after it too); a body is
at most MAX_BODY bytes (413) and must come with Content-Length (411; no chunked
uploads); at most MAX_CONNECTIONS at once (503 to the next, written without waiting).
A response (or a stream) whose client stops reading is dropped after WRITE_TIMEOUT.

A handler returns a Response, or a Stream whose chunks are sent with chunked transfer
encoding until the handler's iterator ends, the client goes away, or the server closes.
An iterator yields b"" when it has nothing to send, which lets the connection check
whether its client is still there. What does not live here: the endpoints (routes.py),
the daemon around it (daemon.py).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import itertools
import json
import os
import select
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from typing import Any

from corevisor.console import listen_unix
from corevisor.errors import CorevisorError, show
from corevisor.signals import start_thread

__all__ = [
    "ApiServer",
    "Request",
    "Response",
    "Stream",
    "HttpError",
    "json_response",
    "MAX_BODY",
    "REQUEST_TIMEOUT",
    "WRITE_TIMEOUT",
    "MAX_CONNECTIONS",
]

MAX_BODY = 1 << 20  # a partition's document is a few hundred bytes
REQUEST_TIMEOUT = 10.0  # seconds for a whole request (line, headers, body) to arrive
WRITE_TIMEOUT = 10.0  # seconds a client may leave a response unread
MAX_CONNECTIONS = 64
SOCKET_MODE = 0o600
_ACCEPT_BACKLOG = 64
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: 58\r\n\r\n"
    b'{"error": "too many connections to the corevisor daemon"}\n'
)


class HttpError(CorevisorError):
    """An answer other than success: status and the one-line message of the JSON error."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass
class Request:
    """One parsed request: method, path (decoded), query parameters, headers, body."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)  # from the route's {name} parts

    def flag(self, name: str) -> bool:
        """A boolean query parameter: ?follow, ?follow=1, ?follow=true (0/false: off)."""
        values = self.query.get(name)
        if not values:
            return False
        value = values[-1].lower()
        if value in ("", "1", "true", "yes"):
            return True
        if value in ("0", "false", "no"):
            return False
        raise HttpError(400, f"query parameter {name}: {show(values[-1])} is not true or false")

    def number(self, name: str, default: int) -> int:
        """A non-negative integer query parameter."""
        values = self.query.get(name)
        if not values:
            return default
        text = values[-1]
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise HttpError(400, f"query parameter {name}: {show(text)} is not a number")
        return int(text)

    def json(self) -> Any:
        """The body as JSON (400 if it is not; 415 if it says it is something else)."""
        kind = self.headers.get_content_type()
        if self.headers.get("Content-Type") is not None and kind != "application/json":
            raise HttpError(415, f"request body: expected application/json, got {show(kind)}")
        if not self.body:
            raise HttpError(400, "request body: expected a JSON object, got nothing")
        try:
            return json.loads(self.body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise HttpError(400, f"request body: not UTF-8 (byte {e.start})") from None
        except RecursionError:
            raise HttpError(400, "request body: JSON nested too deeply") from None
        except json.JSONDecodeError as e:
            raise HttpError(400, f"request body: invalid JSON: {e.msg} at byte {e.pos}") from None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stream:
    """A response sent as it is produced (chunked): serial output, events."""

    chunks: Iterator[bytes]  # b"": nothing now (lets the connection check its client)
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(value, indent=1) + "\n").encode())


Router = Callable[[Request], Response | Stream]


class _DeadlineReader(io.RawIOBase):
    """The connection's reading side, bounded by one deadline for a whole request."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = time.monotonic() + REQUEST_TIMEOUT

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection: requests in turn (keep-alive), answered by the server's router."""

    protocol_version = "HTTP/1.1"
    server_version = "corevisor"
    sys_version = ""
    server: ApiServer  # type: ignore[assignment]

    def setup(self) -> None:
        self.connection = self.request
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = self.connection.makefile("wb", buffering=0)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "request line longer than 64 KiB")
                return
            if not self.raw_requestline:
                return
            if not self.parse_request():
                return  # parse_request answered with send_error
            if self.headers.defects:  # e.g. a header line without a colon
                raise HttpError(400, "malformed request headers (a line without a colon?)")
            self.close_connection = self.close_connection or self.server.closing.is_set()
            request = self._request()
            self.connection.settimeout(WRITE_TIMEOUT)
            self._answer(self.server.route(request))
        except HttpError as e:
            self._send_json_error(e.status, str(e), e.headers)
        except TimeoutError:
            if self.raw_requestline:
                with contextlib.suppress(OSError):
                    self.connection.settimeout(0.1)
                    self._send_json_error(408, "request timed out")
            self.close_connection = True
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug here must cost one answer, not the daemon
            traceback.print_exc(file=sys.stderr)
            self._send_json_error(500, f"internal error in the daemon: {e!r}")

    # --- the request ----------------------------------------------------------------
    def _request(self) -> Request:
        try:
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path, errors="strict") if url.path else "/"
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True,
                                          strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, f"request target {show(self.path)}: not valid UTF-8 "
                                 "once decoded") from None
        return Request(self.command, path, query, self.headers, self._body())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            raise HttpError(411, "a request body needs Content-Length (no chunked uploads)")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        length_text = length_text.strip()
        if not length_text.isascii() or not length_text.isdigit():
            raise HttpError(400, f"Content-Length: {show(length_text)} is not a number")
        length = int(length_text)
        if length > MAX_BODY:
            raise HttpError(413, f"request body of {length} bytes (at most {MAX_BODY})")
        body = self.rfile.read(length)
        if len(body) < length:
            raise HttpError(400, f"request body: {len(body)} of {length} bytes, then the end")
        return body

    # --- the answer -----------------------------------------------------------------
    def _answer(self, result: Response | Stream) -> None:
        if isinstance(result, Stream):
            self._stream(result)
            return
        self.send_response(result.status)
        self._headers(result.content_type, result.headers)
        self.send_header("Content-Length", str(len(result.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(result.body)

    def _headers(self, content_type: str, extra: dict[str, str]) -> None:
        self.send_header("Content-Type", content_type)
        for name, value in extra.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")

    def _stream(self, stream: Stream) -> None:
        self.close_connection = True  # a stream ends the connection
        self.send_response(stream.status)
        self._headers(stream.content_type, {"Cache-Control": "no-cache", **stream.headers})
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        closing = self.server.closing
        try:
            for chunk in stream.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if closing.is_set():
                    break  # the daemon stops: end the stream properly
                if not chunk and self._client_gone():
                    return
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(stream.chunks, "close", None)
            if close is not None:
                close()

    def _client_gone(self) -> bool:
        """Whether the client closed its end (a stream's client sends nothing more)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True

    # --- errors, logging ------------------------------------------------------------
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, bad headers), as JSON."""
        text = message or HTTPStatus(code).phrase
        self._send_json_error(code, text.rstrip(".").lower() if message else text)

    def _send_json_error(self, status: int, message: str, headers: dict[str, str] | None = None
                         ) -> None:
        self.close_connection = status >= 500 or status in (400, 408, 411, 413, 414, 431) \
            or self.close_connection
        body = (json.dumps({"error": message}) + "\n").encode()
        if self.request_version == "HTTP/0.9":  # http.server's guess for a broken line:
            self.request_version = "HTTP/1.1"  # answered with a status line all the same
        with contextlib.suppress(OSError):
            self.send_response(status)
            self._headers("application/json", headers or {})
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    def version_string(self) -> str:
        return "corevisor"

    def log_message(self, format: str, *args: Any) -> None:
        """No access log (a daemon's stderr is for events)."""


class ApiServer:
    """The listening socket, its accept thread and one thread per connection."""

    def __init__(self, path: str, router: Router) -> None:
        """Listen at path now (mode 0600); serving starts with start()."""
        self.path = path
        self._router = router
        self.closing = threading.Event()
        self._sock = listen_unix(path, _ACCEPT_BACKLOG, self._error, mode=SOCKET_MODE)
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._numbers = itertools.count(1)
        self._accepter: threading.Thread | None = None
        self._closed = False

    def _error(self, reason: str) -> CorevisorError:
        return CorevisorError(f"--socket {show(self.path)}: {reason}")

    def start(self) -> None:
        if self._accepter is None:
            self._accepter = start_thread(self._accept_loop, "api-accept")

    def route(self, request: Request) -> Response | Stream:
        """The router's answer; a bug in a handler is a 500 (with its traceback on stderr)."""
        try:
            return self._router(request)
        except HttpError:
            raise
        except Exception as e:  # noqa: BLE001 - a handler bug must not end the daemon
            traceback.print_exc(file=sys.stderr)
            raise HttpError(500, f"internal error in the daemon: {e!r}") from None

    # --- accepting ------------------------------------------------------------------
    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == self._wake_r for fd, _ in events):
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with self._lock:
                busy = len(self._connections) >= MAX_CONNECTIONS or self.closing.is_set()
                if not busy:
                    self._connections.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    conn.send(_BUSY, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                conn.close()
                continue
            name = f"api-conn-{next(self._numbers)}"
            thread = start_thread(lambda c=conn: self._serve(c), name)  # type: ignore[misc]
            with self._lock:
                self._threads.add(thread)

    def _serve(self, conn: socket.socket) -> None:
        try:
            _Handler(conn, "", self)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - one connection's failure is its own
            traceback.print_exc(file=sys.stderr)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())

    @property
    def connections(self) -> int:
        """Connections open right now."""
        with self._lock:
            return len(self._connections)

    # --- closing --------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every stream, close every connection, remove the socket."""
        if self._closed:
            return
        self._closed = True
        self.closing.set()
        os.write(self._wake_w, b"x")
        if self._accepter is not None:
            self._accepter.join(timeout)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with self._lock:
            threads = list(self._threads)
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)  # a reader blocked on it wakes up
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0))
        os.close(self._wake_r)
        os.close(self._wake_w)
