"""virtio-net against a real TAP, in a network namespace of the test's own.

The test creates namespace cvtestPID, opens the TAP inside it (from a thread that
joined the namespace), gives the TAP 10.0.0.1/24 there and removes the namespace at the
end: no address outside it is touched. A UDP datagram the "guest" transmits must reach
a socket in the namespace; one the namespace sends to the guest's address must land in
a posted receive buffer, with the device's I/O thread doing the work and raising the
interrupt eventfd.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from corevisor.memory import GuestMemory
from corevisor.virtio.mmio import REG, VirtioMmio
from corevisor.virtio.net import VNET_HDR_SIZE, Net, open_tap
from corevisor.virtio.worker import IoThread
from tests.unit.virtio_driver import MIB, FakeDriver

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun (network namespace + TAP)",
)

NS = f"cvtest{os.getpid()}"
TAP = "cvtap0"
HOST_IP, GUEST_IP = "10.0.0.1", "10.0.0.2"
GUEST_MAC = bytes.fromhex("525400123456")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _ip(*args: str) -> None:
    subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True, timeout=30)


def _in_netns(fn: Callable[[], T]) -> T:
    """Run fn on a thread that joined the test namespace (setns is per thread)."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{NS}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            err.append(e)
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


@pytest.fixture
def netns() -> Iterator[int]:
    subprocess.run(["ip", "netns", "add", NS], check=True, capture_output=True, timeout=30)
    try:
        tap_fd = _in_netns(lambda: open_tap(TAP))
        _ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        _ip("link", "set", TAP, "up")
        _ip("neigh", "add", GUEST_IP, "lladdr", "52:54:00:12:34:56", "dev", TAP)
        yield tap_fd
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, timeout=30)


def _csum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data[: len(data) // 2 * 2]))
    s = (s & 0xFFFF) + (s >> 16)
    return ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF


def _udp_frame(dst_mac: bytes, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 5555, 7777, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0,
        64,
        17,
        0,
        socket.inet_aton(GUEST_IP),
        socket.inet_aton(HOST_IP),
    )
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip + udp


def test_tx_and_rx_through_a_tap(netns: int) -> None:
    mem = GuestMemory.anonymous([(0, 2 * MIB)])
    dev = VirtioMmio(Net(netns, GUEST_MAC), mem, lambda msg: None)
    worker = IoThread(dev, "net-test")
    worker.start()
    sock = _in_netns(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.bind((HOST_IP, 7777))
        sock.settimeout(5)
        drv = FakeDriver(dev, mem)
        drv.start()
        rx, tx = drv.queues
        assert dev.read(REG.CONFIG, 6) == GUEST_MAC
        tap_mac = bytes.fromhex(_tap_mac().replace(":", ""))
        # Transmit: header + frame, split over two descriptors.
        frame = _udp_frame(tap_mac, b"ping from the guest")
        mem.write(0x80000, bytes(VNET_HDR_SIZE))
        mem.write(0x81000, frame)
        tx.add_chain([(0x80000, VNET_HDR_SIZE, False), (0x81000, len(frame), False)])
        dev.write(REG.QUEUE_NOTIFY, struct.pack("<I", 1))
        data, addr = sock.recvfrom(2048)
        assert data == b"ping from the guest" and addr == (GUEST_IP, 5555)
        # Receive: post buffers, then the namespace sends to the guest.
        heads = [rx.add_chain([(0x100000 + i * 0x1000, 0x1000, True)]) for i in range(8)]
        dev.write(REG.QUEUE_NOTIFY, struct.pack("<I", 0))
        sock.sendto(b"pong from the host", (GUEST_IP, 5555))
        deadline = time.monotonic() + 5
        got = b""
        while b"pong from the host" not in got and time.monotonic() < deadline:
            select.select([dev.interrupt.fd], [], [], 0.5)
            for head, length in rx.get_used():
                buf = mem.read(0x100000 + heads.index(head) * 0x1000, length)
                assert struct.unpack_from("<H", buf, 10)[0] == 1  # num_buffers
                got += buf[VNET_HDR_SIZE:]
        assert b"pong from the host" in got
        assert not dev.status & 0x40
    finally:
        sock.close()
        worker.close()
        dev.close()
        mem.close()


def _tap_mac() -> str:
    out = subprocess.run(
        ["ip", "-n", NS, "-o", "link", "show", TAP],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split("link/ether ")[1].split()[0]
