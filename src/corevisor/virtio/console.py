"""virtio-console (virtio 1.x, 5.3) with a single port: receiveq 0, transmitq 1.

Output (transmitq) goes to a serial backend's ``write`` (console.py), the same kind of
sink a UART writes to. Input arrives from any thread through ``enqueue_input``: it waits
in a bounded host-side buffer (oldest bytes dropped beyond INPUT_LIMIT) and moves into
the guest's receive buffers on the I/O thread, when there are buffers; an eventfd tells
the I/O thread that input is waiting. No MULTIPORT, no console size, no emergency write:
a single hvc0 is what guests need.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corevisor.snapshot import require_bytes, require_state
from corevisor.virtio.device import VirtioDevice
from corevisor.virtio.queue import DescriptorChain, QueueError

__all__ = ["Console", "ConsoleState", "VIRTIO_ID_CONSOLE", "INPUT_LIMIT"]

VIRTIO_ID_CONSOLE = 3
QUEUE_SIZE = 64
RX, TX = 0, 1
INPUT_LIMIT = 64 << 10
_OUT_CHUNK = 64 << 10


@dataclass(frozen=True)
class ConsoleState:
    """Host input the guest has not taken yet (it waits for receive buffers)."""

    pending: bytes


class Console(VirtioDevice):
    """hvc0: guest output to ``output``, host input from ``enqueue_input``."""

    device_type = VIRTIO_ID_CONSOLE
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-console"

    def __init__(self, output: Callable[[bytes], None]) -> None:
        super().__init__()
        self.output = output
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._input_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def config(self) -> bytes:
        return struct.pack("<HHII", 0, 0, 1, 0)  # cols, rows, max_nr_ports, emerg_wr

    def enqueue_input(self, data: bytes) -> None:
        """Host input for the guest (any thread); oldest bytes go beyond INPUT_LIMIT."""
        with self._lock:
            self._pending += data
            del self._pending[:-INPUT_LIMIT]
        with contextlib.suppress(OSError):
            os.eventfd_write(self._input_fd, 1)

    def fds(self) -> tuple[int, ...]:
        return (self._input_fd,)

    def process_fd(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        self._receive()

    def process_queue(self, index: int) -> None:
        if index == TX:
            self._transmit()
        else:
            self._receive()

    def _transmit(self) -> None:
        self.serve(TX, self._send)

    def _send(self, chain: DescriptorChain) -> int:
        reader = chain.reader()
        while reader.remaining:
            data = reader.read(min(reader.remaining, _OUT_CHUNK))
            self.bytes_from_guest += len(data)
            self.output(data)
        return 0

    def _receive(self) -> None:
        ctx = self.ctx
        if ctx is None or not ctx.queues[RX].ready:
            return
        q = ctx.queues[RX]
        done = False
        while True:
            with self._lock:
                if not self._pending:
                    break
                chain = q.pop()
                if chain is None:
                    break  # input waits for the driver's next buffers (its kick wakes us)
                writer = chain.writer()
                if not writer.remaining:
                    raise QueueError(f"console receive buffer {chain.head} is not device-writable")
                data = bytes(self._pending[: writer.remaining])
                writer.write(data)
                del self._pending[: len(data)]
            q.add_used(chain.head, writer.written)
            self.requests += 1
            self.bytes_to_guest += writer.written
            done = True
        if done:
            ctx.notify_used(q)

    # --- save / restore ---------------------------------------------------------------
    def save(self) -> ConsoleState:
        with self._lock:
            return ConsoleState(bytes(self._pending))

    def check_state(self, state: object) -> None:
        st = require_state(self.name, state, ConsoleState)
        require_bytes(self.name, "pending", st.pending, INPUT_LIMIT)

    def load_state(self, state: object) -> None:
        assert isinstance(state, ConsoleState)
        with self._lock:
            self._pending = bytearray(state.pending)
        if state.pending and self._input_fd >= 0:
            os.eventfd_write(self._input_fd, 1)  # the I/O thread delivers it when it can

    def close(self) -> None:
        if self._input_fd >= 0:
            os.close(self._input_fd)
            self._input_fd = -1
