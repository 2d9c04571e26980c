"""The 16550A UART model: the PC serial port every x86 guest knows how to drive.

Eight byte-wide registers at offsets 0-7 (THR/RBR, IER, IIR/FCR, LCR, MCR, LSR, MSR,
SCR, with the divisor latch DLL/DLM behind LCR.DLAB), a 16-byte receive FIFO, loopback
mode and the interrupt-identification logic with the datasheet priorities. Transmission
is instantaneous: a byte written to THR goes straight to the ``output`` callback, so LSR
always reports THRE|TEMT and there is no transmit FIFO to model.

The interrupt line is level-triggered from the model's point of view: ``irq(level)`` is
called only when the computed level changes, and MCR.OUT2 gates the line as the PC
glue logic does (OUT2 clear means the line is low whatever the UART wants).

Host input arrives from another thread through ``enqueue_input``. Bytes wait in a host-side
queue and move into the receive FIFO as the guest drains it, which is the backpressure
QEMU's ``can_receive`` gives: a paste of a few kilobytes is not lost to overruns.

What does not live here: where the port sits (bus.py), where output goes (console.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, fields

from corevisor.errors import DeviceError

__all__ = ["Uart16550", "Uart16550State", "RX_FIFO_SIZE", "PENDING_INPUT_LIMIT"]

# Register offsets.
_RBR_THR = 0  # DLL when LCR.DLAB
_IER = 1  # DLM when LCR.DLAB
_IIR_FCR = 2
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C  # character timeout (FIFO mode)
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER = 0xC0
_FCR_STORED = FCR_ENABLE | FCR_TRIGGER
_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
_MCR_WRITABLE = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERROR = 0x80
_LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# Outside loopback a terminal is "connected": carrier, data set ready, clear to send.
_MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

_LSR_READY = bytes((LSR_THRE | LSR_TEMT,))
_LSR_READY_DATA = bytes((LSR_THRE | LSR_TEMT | LSR_DR,))

RX_FIFO_SIZE = 16
# Host input waiting for FIFO room; beyond this it is dropped (and LSR.OE says so), so a
# runaway producer cannot grow the VMM without bound.
PENDING_INPUT_LIMIT = 64 * 1024

# The power-on divisor is undefined on real parts; 12 (9600 baud at 1.8432 MHz) is the
# value firmware traditionally programs, so reading it before setting it looks sane.
_DEFAULT_DIVISOR = 12


@dataclass(frozen=True)
class Uart16550State:
    """Everything a guest can observe of a 16550A, as plain values.

    Derived bits (LSR.DR/THRE/TEMT, MSR status bits, IIR) are not stored: they follow
    from the fields below, so a state cannot contradict itself there.
    """

    dll: int = _DEFAULT_DIVISOR
    dlm: int = 0
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    fcr: int = 0
    scr: int = 0
    lsr_errors: int = 0
    msr_deltas: int = 0
    thr_ipending: bool = False
    rbr: int = 0
    rx_fifo: bytes = b""
    pending_input: bytes = b""


class Uart16550:
    """A 16550A UART as pure register logic (see the module docstring).

    ``output`` and ``irq`` are called with the internal lock held, so their order is the
    order the guest caused them; they must not call back into this UART.
    """

    def __init__(self, output: Callable[[bytes], None], irq: Callable[[bool], None]) -> None:
        self._output = output
        self._irq = irq
        # vCPU thread (register accesses) and input thread (enqueue_input) both mutate.
        self._lock = threading.Lock()
        self._level = False
        self._dll = _DEFAULT_DIVISOR
        self._dlm = 0
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._thr_ipending = False
        self._rbr = 0  # last byte read, returned again when the FIFO is empty
        self._rx = bytearray()
        self._pending = bytearray()

    # ------------------------------------------------------------------ bus interface

    def read(self, offset: int, size: int) -> bytes:
        """Read registers; a wide access reads consecutive ports, as the ISA bus splits it."""
        with self._lock:
            if size == 1:
                # LSR is what a polling driver reads before every byte it sends.
                if offset == _LSR and not self._lsr_errors:
                    return _LSR_READY_DATA if self._rx else _LSR_READY
                return bytes((self._read_reg(offset),))
            return bytes([self._read_reg(offset + i) for i in range(max(size, 0))])

    def write(self, offset: int, data: bytes) -> None:
        """Write registers; a single THR byte takes a short path (guest printing)."""
        with self._lock:
            if (
                offset == _RBR_THR
                and len(data) == 1
                and not self._lcr & LCR_DLAB
                and not self._mcr & MCR_LOOP
            ):
                self._output(data)
                # Writing THR clears the THRE interrupt, but the byte leaves at once and THR
                # is empty again, so the net effect is "pending" (no pulse on the line).
                if self._ier & IER_THRI and not self._thr_ipending:
                    self._thr_ipending = True
                    self._update_irq()
                return
            for i, value in enumerate(data):
                self._write_reg(offset + i, value)

    def enqueue_input(self, data: bytes) -> None:
        """Feed bytes received from the host side (any thread)."""
        if not data:
            return
        with self._lock:
            room = PENDING_INPUT_LIMIT - len(self._pending)
            if len(data) > room:
                data = data[: max(room, 0)]
                self._lsr_errors |= LSR_OE
            self._pending += data
            self._refill()
            self._update_irq()

    @property
    def irq_line(self) -> bool:
        """The level the model last drove onto the interrupt line."""
        return self._level

    # ------------------------------------------------------------------ snapshot

    def save(self) -> Uart16550State:
        """Capture the register state (call while the vCPUs are paused)."""
        with self._lock:
            return Uart16550State(
                dll=self._dll,
                dlm=self._dlm,
                ier=self._ier,
                lcr=self._lcr,
                mcr=self._mcr,
                fcr=self._fcr,
                scr=self._scr,
                lsr_errors=self._lsr_errors,
                msr_deltas=self._msr_deltas,
                thr_ipending=self._thr_ipending,
                rbr=self._rbr,
                rx_fifo=bytes(self._rx),
                pending_input=bytes(self._pending),
            )

    def restore(self, state: Uart16550State) -> None:
        """Load a saved state after checking it; the line is re-driven only if it differs."""
        _validate(state)
        with self._lock:
            self._dll = state.dll
            self._dlm = state.dlm
            self._ier = state.ier
            self._lcr = state.lcr
            self._mcr = state.mcr
            self._fcr = state.fcr
            self._scr = state.scr
            self._lsr_errors = state.lsr_errors
            self._msr_deltas = state.msr_deltas
            self._thr_ipending = state.thr_ipending
            self._rbr = state.rbr
            self._rx = bytearray(state.rx_fifo)
            self._pending = bytearray(state.pending_input)
            self._update_irq()

    # ------------------------------------------------------------------ registers

    def _read_reg(self, offset: int) -> int:
        if offset == _RBR_THR:
            return self._dll if self._lcr & LCR_DLAB else self._read_rbr()
        if offset == _IER:
            return self._dlm if self._lcr & LCR_DLAB else self._ier
        if offset == _IIR_FCR:
            return self._read_iir()
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _LSR:
            return self._read_lsr()
        if offset == _MSR:
            return self._read_msr()
        if offset == _SCR:
            return self._scr
        return 0xFF  # not ours: a floating ISA bus reads all ones

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == _RBR_THR:
            if self._lcr & LCR_DLAB:
                self._dll = value
            else:
                self._write_thr(value)
        elif offset == _IER:
            if self._lcr & LCR_DLAB:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == _IIR_FCR:
            self._write_fcr(value)
        elif offset == _LCR:
            self._lcr = value
        elif offset == _MCR:
            self._write_mcr(value)
        elif offset == _SCR:
            self._scr = value
        # LSR and MSR are read-only; anything else is not ours.

    def _read_rbr(self) -> int:
        if self._rx:
            self._rbr = self._rx.pop(0)
            self._refill()
            self._update_irq()
        return self._rbr

    def _read_iir(self) -> int:
        iid = self._interrupt_id()
        if iid == IIR_THRI:
            # Reading IIR acknowledges a THRE interrupt (and only that one).
            self._thr_ipending = False
            self._update_irq()
        return iid | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)

    def _read_lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= LSR_DR
        if self._fcr & FCR_ENABLE and self._lsr_errors & (LSR_PE | LSR_FE | LSR_BI):
            value |= LSR_FIFO_ERROR
        if self._lsr_errors:
            self._lsr_errors = 0  # error bits clear on read
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        value = self._msr_status() | self._msr_deltas
        if self._msr_deltas:
            self._msr_deltas = 0  # delta bits clear on read
            self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            self._receive(value)
        else:
            self._output(bytes((value,)))
        if self._ier & IER_THRI:
            self._thr_ipending = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        value &= 0x0F  # bits 4-7 are reserved and read as 0 on the 16550A
        changed = self._ier ^ value
        self._ier = value
        if changed & IER_THRI:
            # Enabling THRI with THR empty raises the interrupt even if an IIR read had
            # acknowledged it before; Linux's THRE test and Windows rely on this.
            self._thr_ipending = bool(value & IER_THRI)
        if changed:
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = value & FCR_ENABLE
        if enable != self._fcr & FCR_ENABLE or value & FCR_CLEAR_RX:
            self._rx.clear()  # switching FIFO mode clears the FIFOs, as on the part
        # The other FCR bits only take effect while the FIFO is enabled.
        self._fcr = value & _FCR_STORED if enable else 0
        self._refill()
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        old = self._msr_status()
        self._mcr = value & _MCR_WRITABLE
        new = self._msr_status()
        changed = old ^ new
        deltas = 0
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            deltas |= MSR_TERI  # trailing edge only
        self._msr_deltas |= deltas
        self._refill()  # leaving loopback reconnects the host input
        self._update_irq()

    # ------------------------------------------------------------------ internals

    def _msr_status(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return _MSR_CONNECTED
        # Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
        return (
            (mcr & MCR_RTS) << 3
            | (mcr & MCR_DTR) << 5
            | (mcr & MCR_OUT1) << 4
            | (mcr & MCR_OUT2) << 4
        )

    def _capacity(self) -> int:
        return RX_FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _receive(self, value: int) -> None:
        """Put one byte into the receive FIFO the way the wire would (loopback)."""
        if len(self._rx) < self._capacity():
            self._rx.append(value)
            return
        self._lsr_errors |= LSR_OE
        if not self._fcr & FCR_ENABLE:
            self._rx[0] = value  # 16450 mode: the unread byte is destroyed

    def _refill(self) -> None:
        """Move waiting host input into the FIFO (not in loopback: the pin is cut off)."""
        if not self._pending or self._mcr & MCR_LOOP:
            return
        room = self._capacity() - len(self._rx)
        if room > 0:
            self._rx += self._pending[:room]
            del self._pending[:room]

    def _interrupt_id(self) -> int:
        """The highest-priority pending source, as IIR bits 0-3 report it."""
        ier = self._ier
        if ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            # Below the trigger level real hardware raises a character timeout after four
            # character times; with no timers here the timeout is taken to have expired.
            if self._fcr & FCR_ENABLE and len(self._rx) < _TRIGGER_LEVELS[self._fcr >> 6]:
                return IIR_CTI
            return IIR_RDI
        if ier & IER_THRI and self._thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = bool(self._mcr & MCR_OUT2) and self._interrupt_id() != IIR_NO_INT
        if level != self._level:
            self._level = level
            self._irq(level)


def _validate(state: object) -> None:
    """Reject a state no 16550A could be in, with a one-line reason."""
    if not isinstance(state, Uart16550State):
        raise DeviceError(f"uart16550: cannot restore from {type(state).__name__}")
    limits = {
        "dll": 0xFF,
        "dlm": 0xFF,
        "ier": 0x0F,
        "lcr": 0xFF,
        "mcr": _MCR_WRITABLE,
        "fcr": _FCR_STORED,
        "scr": 0xFF,
        "lsr_errors": _LSR_ERRORS,
        "msr_deltas": 0x0F,
        "rbr": 0xFF,
    }
    for f in fields(state):
        value = getattr(state, f.name)
        if f.name in limits:
            mask = limits[f.name]
            if type(value) is not int or value < 0 or value & ~mask:
                raise DeviceError(
                    f"uart16550 state: {f.name}={value!r} is not a value within mask {mask:#04x}"
                )
        elif f.name == "thr_ipending":
            if type(value) is not bool:
                raise DeviceError(f"uart16550 state: thr_ipending={value!r} is not a bool")
        elif type(value) is not bytes:
            raise DeviceError(f"uart16550 state: {f.name} is {type(value).__name__}, not bytes")
    if state.thr_ipending and not state.ier & IER_THRI:
        raise DeviceError("uart16550 state: thr_ipending is set while IER.THRI is clear")
    capacity = RX_FIFO_SIZE if state.fcr & FCR_ENABLE else 1
    if len(state.rx_fifo) > capacity:
        raise DeviceError(
            f"uart16550 state: rx_fifo holds {len(state.rx_fifo)} bytes (at most {capacity})"
        )
    if len(state.pending_input) > PENDING_INPUT_LIMIT:
        raise DeviceError(
            f"uart16550 state: pending_input holds {len(state.pending_input)} bytes "
            f"(at most {PENDING_INPUT_LIMIT})"
        )
