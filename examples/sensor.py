"""A temperature sensor to write a driver against before the chip exists (docs/devices.md).

Ports +0 temperature in °C (read-only), +1 alarm threshold, +2 status (bit 0: alarm;
write 1 to clear it), +3 control (bit 0: interrupt enable). The room warms by `step` °C
every `period_ms`; a sample at or above the threshold sets the alarm, and the
level-triggered IRQ 5 is high while the alarm is set and enabled.
"""

from corevisor.userdev import Host, Irq, Ports


class TempSensor:
    REGION = Ports(0x700, 4)
    IRQ = Irq(5, "level")

    def __init__(self, host: Host, celsius: int = 20, step: int = 1, period_ms: int = 20) -> None:
        self.host, self.step = host, step
        self.regs = bytearray([celsius, 0xFF, 0, 0])  # temperature, threshold, status, control
        host.timer(self.sample).start(period_ms / 1000, periodic=True)

    def sample(self) -> None:
        self.regs[0] = min(self.regs[0] + self.step, 125)
        if self.regs[0] >= self.regs[1]:
            self.regs[2] |= 1
        self.update()

    def update(self) -> None:
        self.host.irq.set(bool(self.regs[2] & self.regs[3] & 1))

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.regs[offset : offset + size]).ljust(size, b"\xff")

    def write(self, offset: int, data: bytes) -> None:
        for reg, value in enumerate(data, offset):
            if reg in (1, 3):
                self.regs[reg] = value
            elif reg == 2:
                self.regs[2] &= ~value
        self.update()

    def save(self) -> bytes:
        return bytes(self.regs)

    def restore(self, state: bytes) -> None:
        if type(state) is not bytes or len(state) != 4:
            raise ValueError(f"not a TempSensor state: {state!r}")
        self.regs[:] = state
