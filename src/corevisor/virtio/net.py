"""virtio-net (virtio 1.x, 5.1) over a host TAP device: receiveq 0, transmitq 1.

The TAP is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a 12-byte vnet header,
the size of virtio 1.x's virtio_net_hdr, so a frame crosses between the TAP and the
guest's buffers with a header in the same place on both sides. No checksum or
segmentation offload is offered (and TUNSETOFFLOAD 0 tells the kernel so), which keeps
every header all-zero: the device writes a fresh one on receive (num_buffers = 1) and
sends a zeroed one on transmit, so a guest cannot hand the host kernel GSO metadata it
never negotiated.

Receive is flow-controlled the way Firecracker does it: the TAP is polled only while the
guest has posted receive buffers; when they run out the device stops polling (frames
wait in the TAP's own queue) until the driver's next kick. A frame larger than the
posted buffer is dropped and counted, the buffer kept for the next one. Transmit errors
from the host (TAP down, queue full) drop the frame and are counted: a network loses
packets, a device does not fail for it.

What does not live here: creating TAP interfaces or addresses (the host's job; the
tests make theirs in a private network namespace).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib
from dataclasses import dataclass

from corevisor.errors import ConfigError, DeviceError
from corevisor.snapshot import require_bool, require_bytes, require_state, require_uint
from corevisor.virtio.device import DeviceContext, VirtioDevice
from corevisor.virtio.queue import DescriptorChain, QueueError

__all__ = [
    "Net",
    "NetState",
    "open_tap",
    "VIRTIO_ID_NET",
    "VIRTIO_NET_F_MAC",
    "VIRTIO_NET_F_STATUS",
    "VNET_HDR_SIZE",
    "MAX_FRAME",
]

VIRTIO_ID_NET = 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (with num_buffers)
MAX_FRAME = 65550  # 64 KiB of payload + an Ethernet header and VLAN tag
QUEUE_SIZE = 256
RX, TX = 0, 1

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


@dataclass(frozen=True)
class NetState:
    """The NIC as the guest knows it, and its counters.

    mac is what the guest read from the config space: a restored NIC keeps it whatever
    its new TAP would have derived (a clone that must differ is given a new MAC by its
    caller, not by the restore). rx_wanted says the guest has posted receive buffers
    the TAP should fill. Frames waiting in the TAP are host state and are not saved:
    a network may lose packets across a snapshot, as across any pause.
    """

    mac: bytes
    rx_wanted: bool
    rx_frames: int
    tx_frames: int
    rx_dropped: int
    tx_dropped: int


def open_tap(name: str, where: str = "net") -> int:
    """Attach to TAP interface name (created if missing) and return its non-blocking fd."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise ConfigError(f"{where}: {name!r} is not a valid interface name")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{where}: cannot open /dev/net/tun: {e.strerror or e}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as e:
        os.close(fd)
        why = e.strerror or str(e)
        if e.errno == errno.EPERM:  # creating a TAP, or using one that is not ours
            why += (" (needs root, or a TAP made for this user: "
                    f"ip tuntap add {name} mode tap user {os.getuid()})")
        raise ConfigError(f"{where}: cannot attach to TAP {name}: {why}") from None
    return fd


def default_mac(seed: str) -> bytes:
    """A stable locally administered MAC (52:54:00:xx:xx:xx) derived from seed."""
    return b"\x52\x54\x00" + zlib.crc32(seed.encode()).to_bytes(4, "little")[:3]


class Net(VirtioDevice):
    """A NIC whose wire is a host TAP fd (owned by the device from now on)."""

    device_type = VIRTIO_ID_NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-net"

    def __init__(self, tap_fd: int, mac: bytes, name: str = "virtio-net") -> None:
        super().__init__()
        if len(mac) != 6:
            raise ConfigError(f"{name}: a MAC address is 6 bytes, not {len(mac)}")
        self.tap_fd = tap_fd
        self.mac = mac
        self.name = name
        self._rx_wanted = False
        self.rx_frames = self.tx_frames = 0
        self.rx_dropped = self.tx_dropped = 0

    def features(self) -> int:
        return VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS

    def config(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP)

    def activate(self, ctx: DeviceContext) -> None:
        super().activate(ctx)
        self._rx_wanted = True

    def reset(self) -> None:
        super().reset()
        self._rx_wanted = False

    def fds(self) -> tuple[int, ...]:
        return (self.tap_fd,) if self._rx_wanted and self.ctx is not None else ()

    def process_fd(self, fd: int) -> None:
        self._receive()

    def process_queue(self, index: int) -> None:
        if index == TX:
            self._transmit()
        else:
            self._rx_wanted = True
            self._receive()
            self.wake()  # the I/O thread must poll the TAP again

    def _receive(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        q = ctx.queues[RX]
        if not q.ready:
            return
        done = False
        while True:
            chain = q.pop()
            if chain is None:
                self._rx_wanted = False  # wait for buffers; the driver's kick re-arms us
                break
            writer = chain.writer()
            if writer.remaining == 0:
                raise QueueError(f"net receive buffer {chain.head} is not device-writable")
            try:
                frame = os.read(self.tap_fd, VNET_HDR_SIZE + MAX_FRAME)
            except BlockingIOError:
                q.undo_pop()
                break
            except OSError:
                q.undo_pop()
                self.rx_dropped += 1
                break
            if len(frame) <= VNET_HDR_SIZE or len(frame) > writer.remaining:
                self.rx_dropped += 1
                q.undo_pop()
                continue
            # num_buffers = 1 (the field the kernel skips over); the rest stays as read.
            writer.write(frame[:10] + b"\x01\x00" + frame[VNET_HDR_SIZE:])
            q.add_used(chain.head, writer.written)
            self.rx_frames += 1
            self.requests += 1
            self.bytes_to_guest += writer.written
            done = True
        if done:
            ctx.notify_used(q)

    def _transmit(self) -> None:
        self.serve(TX, self._send)

    def _send(self, chain: DescriptorChain) -> int:
        reader = chain.reader()
        if reader.remaining < VNET_HDR_SIZE:
            raise QueueError(
                f"net transmit chain {chain.head} is shorter than the {VNET_HDR_SIZE}-byte header"
            )
        reader.read(VNET_HDR_SIZE)
        if reader.remaining > MAX_FRAME or reader.remaining == 0:
            self.tx_dropped += 1
            return 0
        frame = bytes(VNET_HDR_SIZE) + reader.read(reader.remaining)
        try:
            os.write(self.tap_fd, frame)
            self.tx_frames += 1
            self.bytes_from_guest += len(frame) - VNET_HDR_SIZE
        except OSError:
            self.tx_dropped += 1
        return 0

    # --- save / restore ---------------------------------------------------------------
    def save(self) -> NetState:
        return NetState(
            self.mac, self._rx_wanted, self.rx_frames, self.tx_frames, self.rx_dropped,
            self.tx_dropped,
        )

    def check_state(self, state: object) -> None:
        st = require_state(self.name, state, NetState)
        if len(require_bytes(self.name, "mac", st.mac, 6)) != 6:
            raise DeviceError(f"{self.name} state: mac is {len(st.mac)} bytes, not 6")
        require_bool(self.name, "rx_wanted", st.rx_wanted)
        for name in ("rx_frames", "tx_frames", "rx_dropped", "tx_dropped"):
            require_uint(self.name, name, getattr(st, name))

    def load_state(self, state: object) -> None:
        assert isinstance(state, NetState)
        self.mac = state.mac
        self._rx_wanted = state.rx_wanted
        self.rx_frames, self.tx_frames = state.rx_frames, state.tx_frames
        self.rx_dropped, self.tx_dropped = state.rx_dropped, state.tx_dropped

    def close(self) -> None:
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
