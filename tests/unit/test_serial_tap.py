"""SerialTap: the daemon's copy of a partition's serial output, for API readers."""

from __future__ import annotations

import threading

from corevisor.console import WATCH_LIMIT, SerialTap


class Sink:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def start_input(self, feed: object) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_backlog_then_every_later_byte_once() -> None:
    sink = Sink()
    tap = SerialTap(sink, keep=8)
    tap.write(b"0123456789")
    backlog, watch = tap.watch()
    assert backlog == b"23456789"  # the newest `keep` bytes
    tap.write(b"ab")
    tap.write(b"c")
    assert watch.take(0) == b"abc"
    assert watch.take(0) == b""
    assert sink.data == b"0123456789abc" and tap.written == 13
    tap.close()
    assert watch.take(0) is None and sink.closed
    late_backlog, late = tap.watch()
    assert late_backlog == b"789abc"[-8:] or late_backlog.endswith(b"abc")
    assert late.take(0) is None


def test_a_reader_that_falls_behind_loses_output_not_the_guest() -> None:
    tap = SerialTap(Sink())
    _, watch = tap.watch()
    chunk = b"x" * 4096
    for _ in range(WATCH_LIMIT // len(chunk) + 10):
        tap.write(chunk)  # never blocks, however far behind the reader is
    assert watch.dropped == 10 * len(chunk)
    assert len(watch.take(0) or b"") == WATCH_LIMIT


def test_take_waits_for_output_from_another_thread() -> None:
    tap = SerialTap(Sink())
    _, watch = tap.watch()
    writer = threading.Timer(0.05, tap.write, args=(b"hi",))
    writer.start()
    assert watch.take(60) == b"hi"
    writer.join()
    watch.close()
    tap.write(b"more")
    assert watch.take(0) is None
