"""The I/O thread of one virtio device: where all of its host-side work runs.

It blocks in poll(2) on the device's queue eventfds (the ioeventfds KVM signals when the
guest writes a queue's notify register), the device's own host fds (a TAP, console
input), the transport's own (a level-triggered interrupt's resample fd) and a wake
eventfd, and calls the transport for each that is ready. So a guest's kick costs the
vCPU no exit to userspace, and a slow disk or a busy TAP never delays a vCPU.

A bug in a device model must not take the VMM down: anything that escapes the
transport is reported with its traceback and the device is put into NEEDS_RESET.

``park``/``unpark`` quiesce the thread for a snapshot or a migration: park returns once
the request being served (if any) is complete and the thread waits, serving nothing
(no kick, no TAP frame, no console input touches guest RAM or the device) until unpark.
Kicks that arrive meanwhile stay counted in their eventfds and are served afterwards.

What does not live here: what the work is (the device types), register handling
(mmio.py, pci.py), the eventfd/irqfd wiring (attach.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import traceback

from corevisor import sandbox
from corevisor.errors import CorevisorError
from corevisor.signals import start_thread
from corevisor.virtio.common import VirtioTransport

__all__ = ["IoThread"]

_JOIN_TIMEOUT = 5.0
PARK_TIMEOUT = 10.0  # seconds a request in progress may take to complete before a park fails


class IoThread:
    """A daemon thread serving one transport (common.py) from start() until close()."""

    def __init__(self, transport: VirtioTransport, name: str) -> None:
        self.transport = transport
        self.name = name
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._hold = False  # park asked for
        self._parked = False  # the thread is waiting in _wait_parked
        transport.device.wake = self.wake

    def start(self) -> None:
        """Start serving (once; the machine's start() calls this)."""
        if self._thread is None and not self._stopping:
            self._thread = start_thread(self._run, f"virtio-{self.name}", sandbox.VIRTIO)

    def wake(self) -> None:
        """Make the thread re-read the device's fd set (called from any thread)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def park(self, timeout: float = PARK_TIMEOUT) -> None:
        """Quiesce: return once the thread serves nothing until unpark (acknowledged).

        A thread that never started has nothing in flight: it only records the hold.
        """
        with self._cond:
            self._hold = True
            if self._thread is None or not self._thread.is_alive():
                return
        self.wake()
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._parked or not self._alive(), timeout
            )
        if not done:
            self.unpark()
            raise CorevisorError(
                f"virtio {self.name}: its I/O thread did not complete its request within "
                f"{timeout:g} s (a slow disk?)"
            )

    def unpark(self) -> None:
        """Serve again (what was kicked meanwhile is served at once)."""
        with self._cond:
            self._hold = False
            self._cond.notify_all()

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _wait_parked(self) -> None:
        """Acknowledge a park and wait for unpark (or close)."""
        with self._cond:
            if not self._hold:
                return
            self._parked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._hold or self._stopping)
            self._parked = False

    def _run(self) -> None:
        t = self.transport
        queue_of = {fd: i for i, fd in enumerate(t.notify_fds)}
        own = t.host_fds()
        while not self._stopping:
            self._wait_parked()
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
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
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
