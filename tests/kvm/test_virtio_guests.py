"""The virtio test guests (blk, net, rng) on real KVM through the real CLI, over both
transports: virtio-mmio and virtio-pci (found through ECAM, or ports 0xCF8/0xCFC).

blk works on a real image file the test fills and checks afterwards; net answers real
pings sent from the host side of a TAP in a network namespace of the test's own (created
here, always removed; no address outside it is touched); rng reads the host's entropy.
Over PCI, blk also completes requests by MSI-X and by INTx interrupts.

The cases marked portable (virtio-mmio and virtio-pci through ECAM, MSI-X) run again in
the lab (make lab-test), on SVM: the same guests through KVM's hardware path.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kvm.conftest import corevisor, patience, tap_in_netns

GREETING = b"corevisor blk test: sector zero"
START, SECTORS = 8, 64


def _pattern(sector: int, k: int) -> int:
    return ((sector * 64 + k) * 0x9E3779B97F4A7C15 + 1) & (2**64 - 1)


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(GREETING.ljust(1 << 20, b"\0"))
    return img


# (corevisor --transport, extra guest command line, the line a PCI guest prints first)
TRANSPORTS = {
    "mmio": ("mmio", "", []),
    "pci-ecam": ("pci", "", ["virtio-pci 00:01.0 (ECAM)"]),
    "pci-cf8": ("pci", " pci=cf8", ["virtio-pci 00:01.0 (0xCF8)"]),
}


PORTABLE = {"mmio", "pci-ecam"}


def _cases(names: list[str]) -> list[object]:
    """pytest params, the portable ones marked so."""
    return [pytest.param(n, id=n, marks=[pytest.mark.portable] if n in PORTABLE else [])
            for n in names]


@pytest.fixture(params=_cases(list(TRANSPORTS)))
def transport(request: pytest.FixtureRequest) -> tuple[str, str, list[str]]:
    return TRANSPORTS[request.param]


def test_blk_writes_flushes_and_reads_back(
    guests: dict[str, Path], tmp_path: Path, transport: tuple[str, str, list[str]]
) -> None:
    kind, extra, first = transport
    img = _image(tmp_path)
    r = corevisor("run", "blk", "--disk", str(img), "--transport", kind,
                  "--cmdline", "mode=check" + extra, timeout=60)
    assert r.stdout.splitlines() == [
        *(f"blk: {line}" for line in first),
        "blk: capacity 2048 sectors",
        f'blk: sector 0 "{GREETING.decode()}"',
        f"blk: ok {SECTORS} sectors",
    ], r.stderr
    assert r.returncode == 0, r.stderr
    # What the guest wrote really is in the file, and nothing else changed.
    data = img.read_bytes()
    assert data.startswith(GREETING)
    for s in range(START, START + SECTORS):
        words = struct.unpack_from("<64Q", data, s * 512)
        assert words == tuple(_pattern(s, k) for k in range(64)), f"sector {s}"
    assert data[(START + SECTORS) * 512 :] == bytes(len(data) - (START + SECTORS) * 512)
    assert data[len(GREETING) : START * 512] == bytes(START * 512 - len(GREETING))


def test_blk_read_only_disk_refuses_writes(guests: dict[str, Path], tmp_path: Path) -> None:
    img = _image(tmp_path)
    before = img.read_bytes()
    r = corevisor("run", "blk", "--disk", f"{img},ro", "--cmdline", "mode=check", timeout=60)
    assert "blk: capacity 2048 sectors (read-only)" in r.stdout
    assert "blk: write failed (status 1)" in r.stdout
    assert r.returncode == 1, r.stderr
    assert img.read_bytes() == before


@pytest.mark.parametrize("irq", [pytest.param("msix", marks=pytest.mark.portable), "intx"])
def test_blk_over_pci_completes_by_interrupt(
    guests: dict[str, Path], tmp_path: Path, irq: str
) -> None:
    """The queue's used buffers raise an MSI-X vector (a KVM MSI route the guest's table
    entry programmed) or INTA (level-triggered, on the line config space names)."""
    img = _image(tmp_path)
    r = corevisor("run", "blk", "--disk", str(img), "--transport", "pci",
                  "--cmdline", f"mode=check irq={irq}", timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    found = re.search(rf"blk: {irq}: 4 requests completed by (\d+) interrupts", r.stdout)
    assert found and int(found.group(1)) >= 4, r.stdout
    if irq == "intx":
        assert "blk: intx line 10" in r.stdout  # slot 1, INTA: PIRQA = IRQ 10 (layout.py)


def test_rng_reads_differ(guests: dict[str, Path], transport: tuple[str, str, list[str]]) -> None:
    kind, extra, first = transport
    r = corevisor("run", "rng", "--rng", "--transport", kind, "--cmdline", extra.strip(),
                  timeout=60)
    lines = r.stdout.splitlines()
    assert lines[-1] == "rng: ok" and r.returncode == 0, (r.stdout, r.stderr)
    assert lines[: len(first)] == [f"rng: {line}" for line in first]
    lines = lines[len(first) :]
    a, b = (x.removeprefix("rng: ") for x in lines[:2])
    assert len(a) == len(b) == 128 and a != b
    int(a, 16), int(b, 16)


NS = f"cvvio{os.getpid()}"
TAP = "cvvtap0"
HOST_IP, GUEST_IP = "10.0.0.1", "10.0.0.2"


def _ns(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", NS, *args], capture_output=True, text=True,
        timeout=patience(60), check=check,
    )


# Without iputils' ping: three echo requests from a raw socket, summarised like ping does.
_PY_PING = """
import socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s & 0xFFFF) + (s >> 16)
    return ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(5)
got = 0
for seq in (1, 2, 3):
    body = struct.pack("!HH", 0x4356, seq) + b"corevisor ping".ljust(48, b".")
    head = struct.pack("!BBH", 8, 0, csum(b"\\x08\\x00\\x00\\x00" + body))
    s.sendto(head + body, (sys.argv[1], 0))
    end = time.monotonic() + 5
    while time.monotonic() < end:
        pkt = s.recv(2048)
        icmp = pkt[(pkt[0] & 15) * 4 :]
        if icmp[0] == 0 and icmp[4:8] == body[:4]:
            assert csum(icmp) == 0, "BAD CHECKSUM"
            got += 1
            break
    time.sleep(0.2)
print(f"3 packets transmitted, {got} received")
sys.exit(0 if got == 3 else 1)
"""


def _ping(ip: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("ping"):
        return _ns("ping", "-c", "3", "-i", "0.2", "-W", "5", ip, check=False)
    return _ns(sys.executable, "-c", _PY_PING, ip, check=False)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun (network namespace + TAP)",
)
@pytest.mark.parametrize(
    ("kind", "jailed"),
    [pytest.param("mmio", False, marks=pytest.mark.portable),
     pytest.param("pci-ecam", False, marks=pytest.mark.portable),
     ("pci-cf8", False), ("mmio", True)],
    ids=["mmio", "pci-ecam", "pci-cf8", "mmio-jail"],
)
def test_net_answers_ping_in_a_private_namespace(
    guests: dict[str, Path], jail_user: tuple[int, int], tmp_path: Path, kind: str,
    jailed: bool,
) -> None:
    transport, extra, first = TRANSPORTS[kind]
    # In the jail the VMM attaches as the jail's user: the TAP is made for that user.
    jail = ["--jail", str(tmp_path), "--uid", str(jail_user[0]), "--gid", str(jail_user[1])]
    with tap_in_netns(NS, TAP, f"{HOST_IP}/24", user=jail_user[0] if jailed else None):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, "-m", "corevisor.cli", "run", "net"]
            + ["--net", TAP, "--transport", transport,
               "--cmdline", f"ip={GUEST_IP} count=3 timeout={patience(40):.0f}" + extra]
            + (jail if jailed else []),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            out: list[str] = []
            deadline = time.monotonic() + patience(30)
            while not any(x.startswith("net: up ") for x in out):
                ready, _, _ = select.select(
                    [proc.stdout], [], [], max(0.0, deadline - time.monotonic())
                )
                line = proc.stdout.readline() if ready else ""
                assert line, f"the guest never came up: {out}"
                out.append(line.rstrip("\n"))
            assert f"ip={GUEST_IP}" in out[-1]
            ping = _ping(GUEST_IP)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            assert "3 received" in ping.stdout and "BAD CHECKSUM" not in ping.stdout, ping.stdout
            rest, err = proc.communicate(timeout=patience(30))
            out += rest.splitlines()
            assert proc.returncode == 0, err
            assert out[-1] == "net: done, 3 echo replies", out
            assert out[: len(first)] == [f"net: {line}" for line in first]
            assert [x for x in out if x.startswith("net: echo reply ")] == [
                f"net: echo reply {k} to {HOST_IP} seq={k}" for k in (1, 2, 3)
            ]
            assert f"net: arp reply to {HOST_IP}" in out
        finally:
            _kill(proc)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
