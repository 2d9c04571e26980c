"""Hostile clients get errors; the daemon and every partition keep running.

Malformed HTTP, oversized and chunked bodies, invalid JSON, requests that never finish,
more connections than the daemon takes, and random requests from hypothesis are sent
on raw sockets to a real daemon whose two partitions count; afterwards both still
count and the API still answers.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corevisor.api.client import Client
from corevisor.api.daemon import Daemon
from corevisor.api.server import MAX_BODY, MAX_CONNECTIONS
from tests.kvm.apihelp import daemon, system_file, until

FOREVER = "mode=counter ticks=1000000 period=10"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, guests: dict[str, Path]
           ) -> Iterator[tuple[Daemon, Client, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    body = "".join(
        f'[partitions.{n}]\nimage = "{guests["peer"]}"\nmemory = "16M"\n'
        f'cmdline = "{FOREVER}"\nserial = "null"\n\n' for n in ("a", "b"))
    with daemon(tmp, system_file(tmp, "two", body)) as (d, client):
        yield d, client, tmp / "api.sock"


def _exchange(path: Path, data: bytes, *, shut: bool = True) -> bytes:
    """Send data, half-close, read the whole answer (until the daemon closes)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(path))
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused it before reading it all
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got


def _status(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1."), answer[:200]
    return int(line.split()[1])


def _error_json(answer: bytes) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head, head
    message = json.loads(body.split(b"\r\n\r\n")[0])["error"]
    assert isinstance(message, str) and "\n" not in message
    return message


def _alive(client: Client) -> None:
    counts = {n: _ticks(client, n) for n in "ab"}
    until(lambda: all(_ticks(client, n) > counts[n] for n in "ab"), "both partitions count")
    states = [p["state"] for p in client.json("GET", "/partitions")["partitions"]]
    assert states == ["running", "running"]


def _ticks(client: Client, name: str) -> int:
    return client.request("GET", f"/partitions/{name}/serial").count(b"peer: tick ")


BAD = [
    (b"\x00\x01\x02garbage\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /partitions HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /partitions HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /partitions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /partitions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
    (b"POST /partitions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     411),
    (b"POST /partitions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\": ", 400),
    (b"POST /partitions HTTP/1.1\r\nContent-Length: 7\r\n\r\n\xff\xfe{}{}x", 400),
    (b"POST /partitions HTTP/1.1\r\nContent-Length: 200001\r\n\r\n" + b"[" * 100000
     + b"]" * 100001, 400),
    (b"GET /partitions/%ff%fe HTTP/1.1\r\n\r\n", 400),
    (b"GET /events?since=-3 HTTP/1.1\r\n\r\n", 400),
    (b"DELETE /metrics HTTP/1.1\r\n\r\n", 405),
    (b"POST /partitions/nope/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404),
    (b"POST /partitions/a/resume HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 409),
]


@pytest.mark.parametrize(("request_bytes", "status"), BAD, ids=range(len(BAD)))
def test_malformed_requests_get_json_errors(
    served: tuple[Daemon, Client, Path], request_bytes: bytes, status: int
) -> None:
    _, client, path = served
    answer = _exchange(path, request_bytes)
    assert _status(answer) == status, answer[:300]
    _error_json(answer)


def test_slow_and_surplus_clients_block_nobody(served: tuple[Daemon, Client, Path]) -> None:
    d, client, path = served
    slow = []
    for _ in range(MAX_CONNECTIONS):  # each sends half a request and then nothing
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(str(path))
        s.sendall(b"GET /partitions HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    try:
        until(lambda: d.server.connections == MAX_CONNECTIONS, "every slow client is held")
        busy = _exchange(path, b"GET /partitions HTTP/1.1\r\n\r\n")
        assert _status(busy) == 503
        assert _error_json(busy) == "too many connections to the corevisor daemon"
        for s in slow[: MAX_CONNECTIONS // 2]:
            s.close()
        until(lambda: d.server.connections <= MAX_CONNECTIONS // 2, "closed ones are freed")
        assert [p["name"] for p in client.json("GET", "/partitions")["partitions"]] == ["a", "b"]
        # The others are answered 408 once their request time is up, whatever they send.
        answer = b""
        s = slow[-1]
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            assert chunk, answer
            answer += chunk
        assert _status(answer) == 408
    finally:
        for s in slow:
            s.close()
    _alive(client)


def test_a_stream_reader_that_stops_reading_loses_only_its_stream(
    served: tuple[Daemon, Client, Path]
) -> None:
    d, client, path = served
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(path))
    s.sendall(b"GET /partitions/a/serial?follow=1 HTTP/1.1\r\n\r\n")  # and never reads
    try:
        until(lambda: d.server.connections >= 1, "the stream is open")
        _alive(client)
    finally:
        s.close()


_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "G\x00T"])
_PATHS = st.one_of(
    st.sampled_from(["/partitions", "/partitions/a", "/partitions/a/pause", "/events",
                     "/metrics", "/openapi.json", "/system", "/partitions/a/serial"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(
        lambda t: "/" + t),
)
_BODIES = st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(method=_METHODS, path=_PATHS, body=_BODIES,
       headers=st.lists(st.tuples(st.sampled_from(["Content-Type", "X-Junk", "Accept",
                                                    "Connection"]),
                                  st.text(alphabet=st.characters(min_codepoint=32,
                                                                 max_codepoint=126),
                                          max_size=30)), max_size=3))
def test_random_requests_get_answers_not_crashes(
    served: tuple[Daemon, Client, Path], method: str, path: str, body: bytes,
    headers: list[tuple[str, str]],
) -> None:
    d, client, sock = served
    if "follow" in path:
        path = path.replace("follow", "f")  # a stream would never end
    if method in ("POST", "DELETE", "PUT") and path.rstrip("/") in (
            "/partitions/a", "/partitions/b", "/partitions/a/pause", "/partitions/a/stop"):
        path = "/x" + path  # keep the partitions under test running
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close"]
    answer = _exchange(sock, "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
    status = _status(answer)
    assert status < 500 or status in (501, 503, 505), answer[:300]
    if status >= 400 and method != "HEAD":
        _error_json(answer)


def test_everything_still_runs_afterwards(served: tuple[Daemon, Client, Path]) -> None:
    d, client, _ = served
    _alive(client)
    until(lambda: d.server.connections == 0, "no connection is left behind")
    assert threading.active_count() < 40
