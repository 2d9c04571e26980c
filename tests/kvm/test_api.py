"""The daemon's API on real KVM: partitions driven over HTTP on its unix socket.

A real Daemon serves a real socket (in this process, so the test can also look at the
System); the client is the one `corevisor ctl` uses. Judged: HTTP statuses and the
one-line JSON errors, what the guests print (through the serial endpoint), the event
log, and that the other partitions keep running throughout.
"""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest

from corevisor.api.client import Client
from corevisor.errors import ApiError
from tests.kvm.apihelp import daemon, system_file, until

FOREVER = "mode=counter ticks=1000000 period=10"


def _two_counters(tmp_path: Path, guests: dict[str, Path]) -> Path:
    body = "".join(
        f'[partitions.{n}]\nimage = "{guests["peer"]}"\nmemory = "16M"\n'
        f'cmdline = "{FOREVER}"\nserial = "null"\n\n'
        for n in ("a", "b")
    )
    return system_file(tmp_path, "two", body)


def _serial(client: Client, name: str) -> str:
    return client.request("GET", f"/partitions/{name}/serial").decode()


def _ticks(client: Client, name: str) -> int:
    return _serial(client, name).count("peer: tick ")


def _error(call: object, *args: object) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.status, str(info.value)


def _one(name: str, image: Path, cmdline: str, **extra: object) -> dict[str, object]:
    table: dict[str, object] = {"image": str(image), "memory": "16M", "cmdline": cmdline,
                                "serial": "null", **extra}
    return {"partitions": {name: table}}


def test_partitions_are_driven_by_name_while_the_others_run(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    with daemon(tmp_path, _two_counters(tmp_path, guests)) as (d, client):
        mode = stat.S_IMODE((tmp_path / "api.sock").stat().st_mode)
        assert mode == 0o600
        listed = client.json("GET", "/partitions")["partitions"]
        assert [(p["name"], p["state"]) for p in listed] == [("a", "running"), ("b", "running")]
        until(lambda: _ticks(client, "a") >= 3 and _ticks(client, "b") >= 3, "both tick")

        paused = client.json("POST", "/partitions/a/pause")
        assert paused["state"] == "paused"
        assert _error(client.json, "POST", "/partitions/a/pause") == (
            409, "cannot pause partition a: it is paused")
        frozen, b_then = _ticks(client, "a"), _ticks(client, "b")
        until(lambda: _ticks(client, "b") >= b_then + 10, "b ticks while a is paused")
        assert _ticks(client, "a") == frozen
        assert client.json("POST", "/partitions/a/resume")["state"] == "running"
        until(lambda: _ticks(client, "a") > frozen, "a ticks again")

        assert _error(client.json, "GET", "/partitions/nope") == (404, "no partition named nope")
        assert _error(client.request, "DELETE", "/partitions/a") == (
            409, "cannot remove partition a: it is running")

        created = client.json("POST", "/partitions?start=true",
                              _one("c", guests["peer"], "mode=counter ticks=3 period=10"))
        assert created["name"] == "c" and created["config"]["memory"] == 16 << 20
        until(lambda: client.json("GET", "/partitions/c")["state"] == "stopped", "c ends")
        c = client.json("GET", "/partitions/c")
        assert (c["status"], c["last"]) == (0, "guest exited with status 0")
        assert _ticks(client, "c") == 3
        client.request("DELETE", "/partitions/c")
        assert _error(client.json, "GET", "/partitions/c")[0] == 404

        assert client.json("POST", "/partitions/a/stop")["state"] == "stopped"
        restarted = client.json("POST", "/partitions/a/restart")
        assert (restarted["state"], restarted["restarts"]) == ("running", 1)
        until(lambda: _serial(client, "a").count("peer: tick 1\n") == 2, "a boots again")
        b_then = _ticks(client, "b")
        until(lambda: _ticks(client, "b") > b_then, "b ran throughout")

        events = client.json("GET", "/events")["events"]
        seen = [(e["partition"], e["kind"], e["message"]) for e in events if e["kind"] != "state"]
        assert ("c", "exit", "guest exited with status 0") in seen
        assert ("c", "removed", "removed") in seen
        assert ("a", "stopped", "stopped: stopped by the host") in seen
        ids = [e["id"] for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        later = client.json("GET", f"/events?since={ids[-2]}")["events"]
        assert [e["id"] for e in later] == [ids[-1]]


def test_bad_input_is_a_400_with_one_line(tmp_path: Path, guests: dict[str, Path]) -> None:
    with daemon(tmp_path, _two_counters(tmp_path, guests)) as (d, client):
        raw = _raw(tmp_path)
        assert raw(b"POST /partitions HTTP/1.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 5\r\n\r\n{nope") == (
            400, {"error": "request body: invalid JSON: Expecting property name enclosed in "
                           "double quotes at byte 1"})
        assert raw(b"POST /partitions HTTP/1.1\r\nContent-Type: text/plain\r\n"
                   b"Content-Length: 2\r\n\r\n{}")[0] == 415
        cases = [
            ({"partitions": {}}, "partitions: expected one partition table by name, got 0 tables"),
            ({"system": {}, "partitions": {}}, 'request body: unknown key "system" (known: '
             "partitions, channels) (log_dir is the daemon's)"),
            (_one("x", guests["peer"], "", memory="64Q"),
             'partitions.x.memory: bad size "64Q" '
             "(use a number of bytes or a suffix K, M, G: 64M)"),
            (_one("x", tmp_path / "missing.elf", ""),
             f"partitions.x.image: {tmp_path / 'missing.elf'} does not exist"),
            (_one("X", guests["peer"], ""),
             'partitions."X": bad partition name "X" (use [a-z][a-z0-9_-]{0,31})'),
            (_one("x", guests["peer"], "", cpus=500),
             "partitions.x.cpus: 500 is more than the 64 vCPUs corevisor allows"),
            ([1, 2], "request body: expected a JSON object, got an array"),
        ]
        for body, message in cases:
            status, text = _error(client.json, "POST", "/partitions", body)
            assert (status, text) == (400, message)
        assert _error(client.json, "POST", "/partitions", _one("a", guests["peer"], "")) == (
            409, "cannot add partition a: a partition of that name exists")
        assert _error(client.json, "GET", "/partitions/a/serial?follow=maybe") == (
            400, "query parameter follow: maybe is not true or false")
        assert _error(client.json, "PUT", "/partitions/a")[0] == 405
        assert [p["state"] for p in client.json("GET", "/partitions")["partitions"]] == [
            "running", "running"]


def _raw(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Send raw bytes on a fresh connection; (status, JSON body) of the answer."""

    def send(data: bytes) -> tuple[int, object]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(str(tmp_path / "api.sock"))
            s.sendall(data)
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            head, body = got.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += s.recv(65536)
            return int(head.split()[1]), json.loads(body)

    return send


def test_serial_and_event_streams(tmp_path: Path, guests: dict[str, Path]) -> None:
    with daemon(tmp_path, _two_counters(tmp_path, guests)) as (d, client):
        seen = b""
        stream = client.stream("/partitions/a/serial?follow=true")
        for chunk in stream:
            seen += chunk
            if b"peer: tick 5\n" in seen:
                break
        assert seen.startswith(b"peer: start mode=counter\n")
        events = client.stream("/events?follow=true&since=0")
        client.json("POST", "/partitions/a/stop")
        client.request("DELETE", "/partitions/a")
        rest = b"".join(stream)  # ends when the partition is removed
        assert seen + rest in _serial_log(d, "a", seen + rest)
        text = b""
        for chunk in events:
            text += chunk
            if b'"kind": "removed"' in text:
                break
        events.close()
        kinds = [json.loads(line[6:])["kind"] for line in text.decode().splitlines()
                 if line.startswith("data: ") and '"partition": "a"' in line]
        assert kinds[-3:] == ["state", "stopped", "removed"]
        assert "event: removed\n" in text.decode()


def _serial_log(d: object, name: str, got: bytes) -> bytes:
    """What the stream must have been: every tick in order, nothing repeated."""
    lines = got.decode().splitlines()
    ticks = [int(x.split()[-1]) for x in lines if x.startswith("peer: tick ")]
    assert ticks == list(range(1, len(ticks) + 1)), ticks[:20]
    return got


def test_channels_are_wired_at_create_time(tmp_path: Path, guests: dict[str, Path]) -> None:
    """A new partition's channel to an existing one that is not running: the peer gets
    it when it starts again; to a running one it is refused (a guest finds its channels
    at boot)."""
    rtos = system_file(tmp_path, "rtos", (
        f'[partitions.rtos]\nimage = "{guests["rtos"]}"\nmemory = "32M"\n'
        'cmdline = "msgs=3"\nserial = "null"\n'
    ))
    with daemon(tmp_path, rtos) as (d, client):
        until(lambda: client.json("GET", "/partitions/rtos")["state"] == "stopped", "rtos ends")
        assert "using an in-guest loopback" in _serial(client, "rtos")
        body = _one("peer", guests["peer"], "mode=pong msgs=3")
        body["channels"] = {"link": {"between": ["rtos", "peer"]}}
        client.json("POST", "/partitions/rtos/restart")
        status, text = _error(client.json, "POST", "/partitions", body)
        assert status == 409
        assert text.startswith("cannot add channel to partition peer: partition rtos is ")
        until(lambda: client.json("GET", "/partitions/rtos")["state"] == "stopped", "ends")
        peer = client.json("POST", "/partitions?start=true", body)
        assert peer["channels"] == ["link"]
        client.json("POST", "/partitions/rtos/restart")
        until(lambda: client.json("GET", "/partitions/peer")["state"] == "stopped", "peer ends")
        until(lambda: client.json("GET", "/partitions/rtos")["state"] == "stopped", "rtos ends")
        out = _serial(client, "rtos")
        assert "rtos: channel 0 gpa=0xd0000000 size=4096 gsi=16 flags=0x2 path=kernel" in out
        assert 'rtos: received "pong 3"' in out
        assert 'peer: received "ping 3"' in _serial(client, "peer")
        assert client.json("GET", "/partitions/peer")["status"] == 0
        client.json("POST", "/partitions/rtos/restart")
        assert _error(client.request, "DELETE", "/partitions/peer")[0] == 409
