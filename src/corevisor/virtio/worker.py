"""The I/O thread of one virtio device: where all of its host-side work runs.

It blocks in poll(2) on the device's queue eventfds (the ioeventfds KVM signals when the
guest writes a queue's notify register), the device's own host fds (a TAP, console
input), the transport's own (a level-triggered interrupt's resample fd) and a wake
eventfd, and calls the transport for each that is ready. So a guest's kick costs the
vCPU no exit to userspace, and a slow disk or a busy TAP never delays a vCPU.

A bug in a device model must not take the VMM down: anything that escapes the
transport is reported with its traceback and the device is put into NEEDS_RESET.

What does not live here: what the work is (the device types), register handling
(mmio.py, pci.py), the eventfd/irqfd wiring (attach.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import traceback

from corevisor.signals import start_thread
from corevisor.virtio.common import VirtioTransport

__all__ = ["IoThread"]

_JOIN_TIMEOUT = 5.0


class IoThread:
    """A daemon thread serving one transport (common.py) from start() until close()."""

    def __init__(self, transport: VirtioTransport, name: str) -> None:
        self.transport = transport
        self.name = name
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._thread: threading.Thread | None = None
        transport.device.wake = self.wake

    def start(self) -> None:
        """Start serving (once; the machine's start() calls this)."""
        if self._thread is None and not self._stopping:
            self._thread = start_thread(self._run, f"virtio-{self.name}")

    def wake(self) -> None:
        """Make the thread re-read the device's fd set (called from any thread)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        t = self.transport
        queue_of = {fd: i for i, fd in enumerate(t.notify_fds)}
        own = t.host_fds()
        while not self._stopping:
            device_fds = t.device.fds()
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            for fd in (*queue_of, *own, *device_fds):
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if self._stopping:
                    return
                try:
                    if fd == self._wake:
                        _drain(fd)
                    elif fd in queue_of:
                        _drain(fd)
                        t.handle_queue(queue_of[fd])
                    elif fd in own:
                        _drain(fd)
                        own[fd]()
                    else:
                        t.handle_fd(fd)
                except Exception as e:  # noqa: BLE001 - a device bug must not kill the VMM
                    t.report(traceback.format_exc())
                    t.fail(f"internal error in the device model: {e!r}")

    def close(self) -> None:
        """Stop the thread (then the transport may close its fds); idempotent."""
        if self._wake < 0:
            return
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
            if self._thread.is_alive():
                return  # stuck in a device call: leave its wake fd open rather than reuse
        os.close(self._wake)
        self._wake = -1


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)
