"""The temperature sensor of sensor.py as a PCI function (docs/devices.md): 1234:5e50.

BAR0 (4 KiB of memory) holds its registers as 32-bit words at +0 temperature in °C
(read-only), +4 alarm threshold, +8 status (bit 0: alarm; write 1 to clear it), +0xC
control (bit 0: interrupt enable); BAR1 (16 I/O ports) the same registers as bytes at
+0..+3. The room warms by `step` °C every `period_ms`; a sample at or above the
threshold sets the alarm, and the interrupt (INTx, or MSI once the guest enables it)
is requested while the alarm is set and enabled.
"""

from corevisor.userdev import Bar, Host, Pci


class PciSensor:
    REGION = Pci(vendor=0x1234, device=0x5E50, class_code=0x118000,
                 bars=(Bar(0x1000), Bar(16, io=True)))

    def __init__(self, host: Host, celsius: int = 20, step: int = 1, period_ms: int = 20) -> None:
        self.host, self.step = host, step
        self.regs = [celsius, 0xFF, 0, 0]  # temperature, threshold, status, control
        host.timer(self.sample).start(period_ms / 1000, periodic=True)

    def sample(self) -> None:
        self.regs[0] = min(self.regs[0] + self.step, 125)
        if self.regs[0] >= self.regs[1]:
            self.regs[2] |= 1
        self.host.irq.set(bool(self.regs[2] & self.regs[3] & 1))

    def register(self, bar: int, offset: int) -> int | None:
        width = 4 if bar == 0 else 1  # words in BAR0, bytes in BAR1
        return offset // width if offset % width == 0 and offset < 4 * width else None

    def read(self, bar: int, offset: int, size: int) -> bytes:
        reg = self.register(bar, offset)
        value = self.regs[reg] if reg is not None else 0xFFFFFFFF
        return (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def write(self, bar: int, offset: int, data: bytes) -> None:
        reg, value = self.register(bar, offset), data[0]
        if reg in (1, 3):
            self.regs[reg] = value
        elif reg == 2:
            self.regs[2] &= ~value
        self.host.irq.set(bool(self.regs[2] & self.regs[3] & 1))

    def save(self) -> tuple[int, ...]:
        return tuple(self.regs)

    def restore(self, state: tuple[int, ...]) -> None:
        if type(state) is not tuple or len(state) != 4 or not all(type(r) is int for r in state):
            raise ValueError(f"not a PciSensor state: {state!r}")
        self.regs[:] = state
