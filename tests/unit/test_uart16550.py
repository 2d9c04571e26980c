"""Register-level behaviour of the 16550A model, as a guest driver would see it."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corevisor.devices import Device
from corevisor.devices.uart16550 import (
    PENDING_INPUT_LIMIT,
    RX_FIFO_SIZE,
    Uart16550,
    Uart16550State,
)
from corevisor.errors import DeviceError

THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

OUT2 = 0x08
LOOP = 0x10


class Wire:
    """The host side of the UART: collects output and the irq line's transitions."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.irqs: list[bool] = []

    def output(self, data: bytes) -> None:
        self.out += data

    def irq(self, level: bool) -> None:
        self.irqs.append(level)

    @property
    def level(self) -> bool:
        return self.irqs[-1] if self.irqs else False


def make() -> tuple[Uart16550, Wire]:
    wire = Wire()
    return Uart16550(wire.output, wire.irq), wire


def rd(uart: Uart16550, offset: int) -> int:
    return uart.read(offset, 1)[0]


def wr(uart: Uart16550, offset: int, value: int) -> None:
    uart.write(offset, bytes([value]))


def test_is_a_device() -> None:
    uart, _ = make()
    assert isinstance(uart, Device)


def test_reset_values() -> None:
    uart, wire = make()
    assert rd(uart, IER) == 0
    assert rd(uart, IIR) == 0x01  # no interrupt, FIFO off
    assert rd(uart, LCR) == 0
    assert rd(uart, MCR) == 0
    assert rd(uart, LSR) == 0x60  # THRE | TEMT
    assert rd(uart, MSR) == 0xB0  # DCD | DSR | CTS
    assert wire.irqs == []


def test_thr_write_goes_to_output() -> None:
    uart, wire = make()
    for ch in b"hello\n":
        wr(uart, THR, ch)
    assert bytes(wire.out) == b"hello\n"
    assert rd(uart, LSR) & 0x60 == 0x60  # transmit is instantaneous


def test_scratch_register() -> None:
    uart, _ = make()
    wr(uart, SCR, 0x5A)
    assert rd(uart, SCR) == 0x5A


def test_divisor_latch() -> None:
    uart, wire = make()
    wr(uart, IER, 0x05)
    wr(uart, LCR, 0x83)  # DLAB + 8N1
    wr(uart, DLL, 0x01)
    wr(uart, DLM, 0x00)
    assert rd(uart, DLL) == 0x01
    assert rd(uart, DLM) == 0x00
    wr(uart, LCR, 0x03)
    assert rd(uart, IER) == 0x05  # IER untouched by the DLM write
    assert wire.out == b""  # the DLL write did not transmit


def test_thre_interrupt_needs_out2() -> None:
    uart, wire = make()
    wr(uart, IER, 0x02)
    assert wire.irqs == []  # OUT2 clear: line held low
    assert rd(uart, IIR) == 0x02  # the source is pending all the same
    wr(uart, IER, 0x00)
    wr(uart, MCR, OUT2)
    wr(uart, IER, 0x02)
    assert wire.irqs == [True]
    assert rd(uart, IIR) == 0x02  # THRE is the source
    assert wire.irqs == [True, False]  # acknowledged by the IIR read
    assert rd(uart, IIR) == 0x01


def test_thr_write_rearms_thre_interrupt() -> None:
    uart, wire = make()
    wr(uart, MCR, OUT2)
    wr(uart, IER, 0x02)
    assert rd(uart, IIR) == 0x02
    assert wire.irqs == [True, False]
    wr(uart, THR, ord("x"))  # the byte leaves at once: THR empty again
    assert wire.irqs == [True, False, True]
    wr(uart, THR, ord("y"))  # still pending: no change, no call
    assert wire.irqs == [True, False, True]
    assert bytes(wire.out) == b"xy"


def test_out2_gates_line() -> None:
    uart, wire = make()
    wr(uart, IER, 0x02)
    wr(uart, MCR, OUT2)
    assert wire.irqs == [True]
    wr(uart, MCR, 0)
    assert wire.irqs == [True, False]


def test_reenabling_thri_resamples_thre() -> None:
    """Linux's UART_BUG_THRE probe: IER 0 -> THRI must raise THRE again."""
    uart, _ = make()
    wr(uart, MCR, OUT2)
    wr(uart, IER, 0x02)
    assert rd(uart, IIR) & 0x01 == 0
    wr(uart, IER, 0x00)
    wr(uart, IER, 0x02)
    assert rd(uart, IIR) & 0x01 == 0


def test_input_sets_dr_and_reads_in_order() -> None:
    uart, _ = make()
    wr(uart, FCR, 0x01)  # FIFO on
    uart.enqueue_input(b"abc")
    assert rd(uart, LSR) & 0x01
    assert bytes(rd(uart, RBR) for _ in range(3)) == b"abc"
    assert not rd(uart, LSR) & 0x01


def test_rx_interrupt_and_clear() -> None:
    uart, wire = make()
    wr(uart, MCR, OUT2)
    wr(uart, IER, 0x01)
    uart.enqueue_input(b"k")
    assert wire.irqs == [True]
    assert rd(uart, IIR) == 0x04  # received data available
    assert wire.irqs == [True]  # IIR read does not clear rx data
    assert rd(uart, RBR) == ord("k")
    assert wire.irqs == [True, False]
    assert rd(uart, IIR) == 0x01


def test_fifo_trigger_level_and_timeout_id() -> None:
    uart, _ = make()
    wr(uart, FCR, 0x81)  # FIFO on, trigger 8
    wr(uart, IER, 0x01)
    uart.enqueue_input(b"1234")
    assert rd(uart, IIR) == 0xCC  # FIFO bits + character timeout below the trigger
    uart.enqueue_input(b"5678")
    assert rd(uart, IIR) == 0xC4  # at the trigger: data available


def test_priorities_line_status_over_rx_over_thre() -> None:
    uart, _ = make()
    wr(uart, MCR, OUT2 | LOOP)
    wr(uart, IER, 0x0F)
    # Overrun: in 16450 mode (FIFO off) a second loopback byte overruns the first.
    wr(uart, THR, 1)
    wr(uart, THR, 2)
    assert rd(uart, IIR) == 0x06  # line status first
    assert rd(uart, LSR) & 0x02  # OE, cleared by this read
    assert rd(uart, IIR) == 0x04  # then rx data
    assert rd(uart, RBR) == 2  # the unread byte was destroyed
    assert rd(uart, IIR) == 0x02  # then THRE
    assert rd(uart, IIR) == 0x00  # then modem status (MCR loopback changed MSR)
    rd(uart, MSR)
    assert rd(uart, IIR) == 0x01


def test_loopback() -> None:
    uart, wire = make()
    wr(uart, FCR, 0x01)
    wr(uart, MCR, LOOP | 0x0F)  # DTR RTS OUT1 OUT2 looped back
    assert rd(uart, MSR) & 0xF0 == 0xF0
    wr(uart, MCR, LOOP)
    msr = rd(uart, MSR)
    assert msr & 0xF0 == 0
    assert msr & 0x0F == 0x0F  # DCTS DDSR TERI DDCD: every looped line fell
    for ch in b"loop":
        wr(uart, THR, ch)
    assert wire.out == b""  # nothing leaves the chip
    assert bytes(rd(uart, RBR) for _ in range(4)) == b"loop"


def test_host_input_waits_during_loopback() -> None:
    uart, _ = make()
    wr(uart, MCR, LOOP)
    uart.enqueue_input(b"z")
    assert not rd(uart, LSR) & 0x01
    wr(uart, MCR, 0)
    assert rd(uart, LSR) & 0x01
    assert rd(uart, RBR) == ord("z")


def test_backpressure_keeps_long_input() -> None:
    uart, _ = make()
    wr(uart, FCR, 0x01)
    data = bytes(range(256)) * 4
    uart.enqueue_input(data)
    got = bytearray()
    while rd(uart, LSR) & 0x01:
        got.append(rd(uart, RBR))
    assert bytes(got) == data
    assert not rd(uart, LSR) & 0x02  # no overrun


def test_pending_limit_reports_overrun() -> None:
    uart, _ = make()
    uart.enqueue_input(b"x" * (PENDING_INPUT_LIMIT + 10))
    assert rd(uart, LSR) & 0x02
    assert not rd(uart, LSR) & 0x02  # cleared by the read


def test_fcr_clear_rx() -> None:
    uart, _ = make()
    wr(uart, FCR, 0x01)
    uart.enqueue_input(b"abc")
    wr(uart, FCR, 0x03)
    assert not rd(uart, LSR) & 0x01


def test_wide_access_splits_into_ports() -> None:
    uart, wire = make()
    uart.write(THR, b"A\x02")  # THR then IER
    assert wire.out == b"A"
    assert rd(uart, IER) == 0x02
    assert uart.read(LCR, 2) == bytes([0, 0])  # LCR, MCR
    assert uart.read(7, 2) == b"\x00\xff"  # SCR, then not ours


def test_save_restore_round_trip() -> None:
    uart, _ = make()
    wr(uart, LCR, 0x80)
    wr(uart, DLL, 3)
    wr(uart, LCR, 0x03)
    wr(uart, FCR, 0xC1)
    wr(uart, IER, 0x03)
    wr(uart, SCR, 0x42)
    uart.enqueue_input(bytes(range(40)))
    state = uart.save()
    other, wire = make()
    other.restore(state)
    assert other.save() == state
    assert wire.irqs == []  # OUT2 clear in the state: the line stays low
    assert rd(other, RBR) == 0
    assert rd(other, SCR) == 0x42


def test_restore_drives_line_when_level_differs() -> None:
    uart, _ = make()
    wr(uart, MCR, OUT2)
    wr(uart, IER, 0x02)
    other, wire = make()
    other.restore(uart.save())
    assert wire.irqs == [True]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ier": 0x10}, "ier"),
        ({"mcr": 0x20}, "mcr"),
        ({"dll": 256}, "dll"),
        ({"lcr": -1}, "lcr"),
        ({"rx_fifo": b"x" * (RX_FIFO_SIZE + 1), "fcr": 0x01}, "rx_fifo"),
        ({"rx_fifo": b"xy"}, "rx_fifo"),
        ({"thr_ipending": True}, "thr_ipending"),
        ({"rx_fifo": "abc"}, "rx_fifo"),
        ({"scr": True}, "scr"),
    ],
)
def test_restore_rejects_bad_state(change: dict[str, object], message: str) -> None:
    uart, _ = make()
    state = dataclasses.replace(Uart16550State(), **change)  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match=message) as info:
        uart.restore(state)
    assert "\n" not in str(info.value)


def test_restore_rejects_wrong_type() -> None:
    uart, _ = make()
    with pytest.raises(DeviceError):
        uart.restore(object())  # type: ignore[arg-type]


def test_input_from_another_thread() -> None:
    uart, _ = make()
    wr(uart, FCR, 0x01)
    data = bytes(i % 251 for i in range(5000))

    def produce() -> None:
        for i in range(0, len(data), 7):
            uart.enqueue_input(data[i : i + 7])

    t = threading.Thread(target=produce)
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if rd(uart, LSR) & 0x01:
            got.append(rd(uart, RBR))
    t.join()
    assert bytes(got) == data


_access = st.one_of(
    st.tuples(st.just("r"), st.integers(-2, 12), st.sampled_from([0, 1, 2, 4, 8])),
    st.tuples(st.just("w"), st.integers(-2, 12), st.binary(min_size=0, max_size=4)),
    st.tuples(st.just("in"), st.just(0), st.binary(min_size=0, max_size=20)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_access, max_size=60))
def test_any_guest_access_is_safe(ops: list[tuple[str, int, object]]) -> None:
    uart, wire = make()
    for kind, offset, arg in ops:
        if kind == "r":
            assert isinstance(arg, int)
            assert len(uart.read(offset, arg)) == arg
        elif kind == "w":
            assert isinstance(arg, bytes)
            uart.write(offset, arg)
        else:
            assert isinstance(arg, bytes)
            uart.enqueue_input(arg)
    # The line only ever toggles, and ends where the model says it is.
    for a, b in zip(wire.irqs, wire.irqs[1:], strict=False):
        assert a != b
    assert wire.level == uart.irq_line
    if wire.irqs:
        assert wire.irqs[0] is True
    # Whatever state the guest reached saves and restores identically.
    state = uart.save()
    other, _ = make()
    other.restore(state)
    assert other.save() == state
