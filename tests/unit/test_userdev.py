"""User devices without KVM: reading their tables and --device options (every mistake one
line naming the file and the key), their claims in the machine's map, the schema and the
document round trip, the public API's values, guest RAM through the facade, and the timer
thread. What they do in a running machine is tests/kvm/test_userdev.py."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from corevisor.config import load_config, partition_from_args
from corevisor.config.document import system_document
from corevisor.config.schema import system_schema
from corevisor.config.toml import read_system, system_from_document
from corevisor.errors import ConfigError, DeviceError, GuestMemoryError
from corevisor.memory import GuestMemory
from corevisor.spec import DeviceSpace, DeviceSpec
from corevisor.userdev import GuestRam, Irq, IrqLine, Mmio, Ports, Timer, Trigger
from corevisor.userdev.attach import DeviceTimers
from tests.kvm.images import pvh_elf

ROOT = Path(__file__).resolve().parents[2]

DEVICES = '''
from corevisor.userdev import Host, Irq, Mmio, Ports

class Sensor:
    REGION = Ports(0x700, 4)
    IRQ = Irq(5, "level")
    def __init__(self, host: Host, celsius: int = 20, gain: float = 1.0, label: str = "t",
                 on: bool = True, taps: tuple[int, ...] = ()) -> None:
        pass
    def read(self, offset, size): return bytes(size)
    def write(self, offset, data): pass

class Window:
    REGION = Mmio(0xC1000000, 0x1000)
    def __init__(self, host, size): pass
    def read(self, offset, size): return bytes(size)
    def write(self, offset, data): pass

class NoRegion:
    def __init__(self, host): pass
    def read(self, offset, size): return bytes(size)
    def write(self, offset, data): pass

class BadRegion(NoRegion):
    REGION = (0x700, 4)

class NoWrite:
    REGION = Ports(0x700, 1)
    def __init__(self, host): pass
    def read(self, offset, size): return bytes(size)

class SaveOnly(Sensor):
    def save(self): return 1

class NoHost:
    REGION = Ports(0x700, 1)
    def __init__(self): pass
    def read(self, offset, size): return bytes(size)
    def write(self, offset, data): pass

class Reserved(Sensor):
    def __init__(self, host, base=0): pass

class Anything(Sensor):
    def __init__(self, host, **kw): pass

def function(): pass
'''


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "hello.elf").write_bytes(pvh_elf(b"\xf4"))
    (tmp_path / "devs.py").write_text(DEVICES)
    (tmp_path / "broken.py").write_text("x = 1 +\n")
    (tmp_path / "needy.py").write_text("import no_such_dependency_here\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('not today')\n")
    return tmp_path


HEAD = '[partitions.demo]\nimage = "hello.elf"\n'


def device(body: str, more: str = "") -> str:
    return f"{HEAD}{more}[[partitions.demo.devices]]\n{body}\n"


def load(tree: Path, text: str) -> tuple[DeviceSpec, ...]:
    (tree / "s.toml").write_text(text)
    devices: tuple[DeviceSpec, ...] = load_config(tree / "s.toml").partitions[0].devices
    return devices


def error(tree: Path, text: str) -> str:
    path = tree / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


# ---------------------------------------------------------------------- reading


def test_a_device_gets_its_class_s_place_line_and_parameters(tree: Path) -> None:
    (d,) = load(tree, device('class = "devs.py:Sensor"\ncelsius = 25\ngain = 2\ntaps = [1, 2]'))
    assert d == DeviceSpec(
        cls=f"{tree / 'devs.py'}:Sensor",
        name="sensor",
        space=DeviceSpace.PORT,
        base=0x700,
        size=4,
        gsi=5,
        level=True,
        params=(("celsius", 25), ("gain", 2.0), ("taps", (1, 2))),
    )
    assert type(dict(d.params)["gain"]) is float  # an int for a float parameter
    assert d.where == "ports 0x700-0x703"


def test_the_table_moves_a_device_and_names_it(tree: Path) -> None:
    text = device('class = "devs.py:Sensor"\nname = "t0"\nbase = 0x780\ngsi = 7')
    (d,) = load(tree, text)
    assert (d.name, d.base, d.gsi) == ("t0", 0x780, 7)
    (w,) = load(tree, device('class = "devs.py:Window"\nsize = 3'))
    assert (w.space, w.base, w.size, w.gsi, w.params) == (
        DeviceSpace.MMIO, 0xC100_0000, 0x1000, None, (("size", 3),)
    )
    assert w.where == "MMIO 0xc1000000+0x1000"


def test_a_module_on_python_s_path_is_imported_by_name(tree: Path) -> None:
    (d,) = load(tree, device('class = "tests.unit.userdev_module:Plain"'))
    assert d.cls == "tests.unit.userdev_module:Plain" and d.base == 0x720


KEY = "partitions.demo.devices[0]"
ERRORS = {
    'class = "nowhere_module:X"': f'{KEY}.class: no module named "nowhere_module" '
    '(class = "nowhere_module:X")',
    'class = "needy.py:X"': f"{KEY}.class: loading needy.py failed: ModuleNotFoundError: "
    "No module named 'no_such_dependency_here'",
    'class = "broken.py:X"': f"{KEY}.class: loading broken.py failed: SyntaxError: "
    "invalid syntax (broken.py, line 1)",
    'class = "raises.py:X"': f"{KEY}.class: loading raises.py failed: RuntimeError: not today",
    'class = "missing.py:X"': f"{KEY}.class: missing.py does not exist",
    'class = "devs.py:Nope"': f"{KEY}.class: devs.py has no Nope (it has: Anything, BadRegion, "
    "NoHost, NoRegion, NoWrite, Reserved, SaveOnly, Sensor, Window)",
    'class = "devs.py:function"': f"{KEY}.class: function is a function, not a class",
    'class = "devs.py"': f'{KEY}.class: "devs.py" is not "package.module:Class" or '
    '"FILE.py:Class"',
    'class = "devs.py:NoRegion"': f"{KEY}.class: NoRegion has no REGION (a Ports, Mmio or Pci: "
    "where its registers sit)",
    'class = "devs.py:BadRegion"': f"{KEY}.class: BadRegion has REGION = (1792, 4) (a Ports, "
    "Mmio or Pci: where its registers sit)",
    'class = "devs.py:NoWrite"': f"{KEY}.class: NoWrite has no write() method (a device "
    "answers read(offset, size) -> bytes and write(offset, data))",
    'class = "devs.py:SaveOnly"': f"{KEY}.class: SaveOnly has save() but no restore() "
    "(give both or neither)",
    'class = "devs.py:NoHost"': f"{KEY}.class: NoHost's constructor takes no host "
    "(def __init__(self, host, ...))",
    'class = "devs.py:Reserved"': f"{KEY}.class: Reserved's parameter base has the name of a "
    "devices key (class, name, base, gsi): rename it",
    'class = "devs.py:Sensor"\ncolour = 1': f'{KEY}: unknown key "colour" (Sensor takes '
    "celsius, gain, label, on, taps; and class, name, base, gsi)",
    'class = "devs.py:Window"': f'{KEY}: missing key "size" (a parameter of Window without a '
    "default)",
    'class = "devs.py:Sensor"\ncelsius = "hot"': f"{KEY}.celsius: expected an integer "
    "(Sensor's parameter celsius: int), got a string \"hot\"",
    'class = "devs.py:Sensor"\non = 1': f"{KEY}.on: expected a boolean (Sensor's parameter "
    "on: bool), got an integer 1",
    'class = "devs.py:Sensor"\ncelsius = true': f"{KEY}.celsius: expected an integer "
    "(Sensor's parameter celsius: int), got a boolean true",
    'class = "devs.py:Anything"\nx = {a = 1}': f"{KEY}.x: a table is not a device parameter "
    "(use a string, number, boolean or an array of them)",
    'class = "devs.py:Anything"\nx = [[1]]': f"{KEY}.x[0]: expected a string, number or "
    "boolean, got an array",
    'class = "devs.py:Sensor"\nname = "Big"': f'{KEY}.name: bad device name "Big" '
    "(use [a-z][a-z0-9_-]{0,31})",
    'class = "devs.py:Sensor"\nbase = "0x700"': f"{KEY}.base: expected a non-negative "
    'integer, got a string "0x700"',
    'class = "devs.py:Sensor"\nbase = 0xFFFE': f"{KEY}.base: ports 0xfffe+4 are not within "
    "0x0-0xffff",
    'class = "devs.py:Window"\nsize = 1\ngsi = 5': f"{KEY}.gsi: Window declares no IRQ "
    "(give the class one)",
    'class = 5': f"{KEY}.class: expected a string, got an integer",
    'name = "x"': f'{KEY}: missing key "class" ("package.module:Class" or "FILE.py:Class")',
}


@pytest.mark.parametrize("body", ERRORS, ids=range(len(ERRORS)))
def test_each_mistake_is_one_line_naming_the_file_and_key(tree: Path, body: str) -> None:
    assert error(tree, device(body)) == ERRORS[body]


def test_devices_must_be_an_array_of_tables(tree: Path) -> None:
    message = error(tree, HEAD + 'devices = "sensor"\n')
    assert message == (
        "partitions.demo.devices: expected an array of tables ([[partitions.NAME.devices]]), "
        "got a string"
    )
    assert error(tree, HEAD + "devices = [1]\n") == f"{KEY}: expected a table, got an integer"


# ---------------------------------------------------------------------- the machine's map

OVERLAPS = {
    "base = 0x3FA": f"{KEY}: port 0x3fa+4 overlaps com1 (0x3f8-0x3ff)",
    "base = 0x20": f"{KEY}: port 0x20+4 overlaps the in-kernel PIC (master) (0x20-0x21)",
    "base = 0x40": f"{KEY}: port 0x40+4 overlaps the in-kernel PIT (0x40-0x43)",
    "base = 0x4CE": f"{KEY}: port 0x4ce+4 overlaps the in-kernel PIC's ELCR (0x4d0-0x4d1)",
    "base = 0x60A": f"{KEY}: port 0x60a+4 overlaps pm-timer (0x608-0x60b)",
    "gsi = 4": f"{KEY}: GSI 4 overlaps COM1 (4)",
    "gsi = 9": f"{KEY}: GSI 9 overlaps the ACPI SCI (9)",
    "gsi = 1": f"{KEY}: GSI 1 is not a line a device may use (the free ISA lines: 3, 5, 6, 7, "
    "10, 11, 12, 14, 15)",
    "gsi = 16": f"{KEY}: GSI 16 is not a line a device may use (the free ISA lines: 3, 5, 6, "
    "7, 10, 11, 12, 14, 15)",
}


@pytest.mark.parametrize("where", OVERLAPS, ids=range(len(OVERLAPS)))
def test_a_device_over_a_fixed_one_is_refused_naming_both(tree: Path, where: str) -> None:
    assert error(tree, device(f'class = "devs.py:Sensor"\n{where}')) == OVERLAPS[where]


def test_mmio_over_ram_or_the_virtio_windows_is_refused(tree: Path) -> None:
    ram = device('class = "devs.py:Window"\nsize = 1\nbase = 0x3000000')
    assert error(tree, ram) == (
        f"{KEY}: 0x3000000+4K overlaps partition demo's RAM (0x0-0x4000000)"
    )
    virtio = device('class = "devs.py:Window"\nsize = 1\nbase = 0xC0001000')
    assert error(tree, virtio) == (
        f"{KEY}: 0xc0001000+4K overlaps the virtio-mmio device windows (0xc0000000-0xc0009000)"
    )


PCI = 'transport = "pci"\n'  # a machine with a PCI host bridge (its windows claimed)
PCI_OVERLAPS = {
    'class = "devs.py:Sensor"\nbase = 0xCF8': f"{KEY}: port 0xcf8+4 overlaps pci-config "
    "(0xcf8-0xcff)",
    'class = "devs.py:Sensor"\nbase = 0xC010': f"{KEY}: port 0xc010+4 overlaps the PCI I/O "
    "port window (0xc000-0xffff)",
    'class = "devs.py:Sensor"\ngsi = 10': f"{KEY}: GSI 10 overlaps PCI INTx (10)",
    'class = "devs.py:Sensor"\ngsi = 11': f"{KEY}: GSI 11 overlaps PCI INTx (11)",
    'class = "devs.py:Window"\nsize = 1\nbase = 0xE0000000': f"{KEY}: 0xe0000000+4K overlaps "
    "the PCI ECAM window (0xe0000000-0xe0100000)",
    'class = "devs.py:Window"\nsize = 1\nbase = 0xE0100000': f"{KEY}: 0xe0100000+4K overlaps "
    "the PCI MMIO window below 4 GiB (0xe0100000-0xfec00000)",
}


@pytest.mark.parametrize("body", PCI_OVERLAPS, ids=range(len(PCI_OVERLAPS)))
def test_on_a_pci_machine_a_device_stays_off_pci_s_ports_windows_and_lines(
    tree: Path, body: str
) -> None:
    assert error(tree, device(body, PCI)) == PCI_OVERLAPS[body]
    if "gsi" not in body and "0xCF8" not in body:  # those are only PCI's on a PCI machine
        assert len(load(tree, device(body))) == 1


def test_pvpanic_s_port_is_not_a_device_s(tree: Path) -> None:
    assert error(tree, device('class = "devs.py:Sensor"\nbase = 0x508')) == (
        f"{KEY}: port 0x508+4 overlaps pvpanic (0x508-0x508)"
    )


def test_two_devices_may_share_neither_range_nor_line_nor_name(tree: Path) -> None:
    a = '[[partitions.demo.devices]]\nclass = "devs.py:Sensor"\n'
    second = "partitions.demo.devices[1]"
    assert error(tree, HEAD + a + a) == (
        f"{second}: a device named sensor already exists (devices[0]): give one a name"
    )
    b = a + 'name = "b"\n'
    assert error(tree, HEAD + a + b) == f"{second}: port 0x700+4 overlaps device sensor " \
        "(0x700-0x703)"
    c = b + "base = 0x780\n"
    assert error(tree, HEAD + a + c) == f"{second}: GSI 5 overlaps device sensor (5)"
    assert len(load(tree, HEAD + a + c + "gsi = 6\n")) == 2


def test_device_lines_leave_room_for_the_virtio_devices(tree: Path) -> None:
    (tree / "disk.img").write_bytes(bytes(512))
    disks = ", ".join(['{path = "disk.img", readonly = true}'] * 8)
    nine = f"blk = [{disks}]\nrng = true\n"
    assert error(tree, device('class = "devs.py:Sensor"', nine)) == (
        "partitions.demo: 9 virtio devices and 1 device lines, but only 9 free interrupt lines"
    )
    # virtio-pci devices interrupt through MSI-X (and PCI's own INTx lines), not these
    assert len(load(tree, device('class = "devs.py:Sensor"', nine + PCI))) == 1


def test_a_channel_is_placed_around_a_device_s_mmio(tree: Path) -> None:
    text = (
        HEAD + '[[partitions.demo.devices]]\nclass = "devs.py:Window"\nsize = 1\n'
        "base = 0xD0000000\n"
        '[partitions.peer]\nimage = "hello.elf"\n'
        '[channels.link]\nbetween = ["demo", "peer"]\n'
    )
    (tree / "s.toml").write_text(text)
    (link,) = load_config(tree / "s.toml").channels
    assert link.gpa == 0xD000_1000  # the first free page above the device
    fixed = text + "gpa = 0xD0000000\n"
    assert error(tree, fixed) == (
        "channels.link.gpa: 0xd0000000+4K overlaps device window (0xd0000000-0xd0001000)"
    )


# ---------------------------------------------------------------------- --device


def test_the_option_reads_values_as_the_constructor_annotates_them(tree: Path) -> None:
    p = partition_from_args(
        str(tree / "hello.elf"),
        devices=[f"{tree}/devs.py:Sensor,celsius=0x20,gain=1.5,on=false,label=a b,base=0x710",
                 f"{tree}/devs.py:Anything,x=7,y=2.5,z=text,name=any,gsi=6"],
    )
    s, a = p.devices
    assert (s.base, s.params) == (0x710, (("celsius", 32), ("gain", 1.5), ("on", False),
                                          ("label", "a b")))
    assert (a.name, a.gsi, a.params) == ("any", 6, (("x", 7), ("y", 2.5), ("z", "text")))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("devs.py:Sensor,celsius=hot", '--device: celsius: expected an integer, got "hot"'),
        ("devs.py:Sensor,celsius", '--device: "celsius" is not KEY=VALUE'),
        ("devs.py:Sensor,base=0x3f8", "--device: port 0x3f8+4 overlaps com1 (0x3f8-0x3ff)"),
        ("devs.py:Sensor,gsi=five", '--device: gsi: "five" is not an integer (42 or 0x2a)'),
        ("devs.py:Sensor,colour=red", '--device: unknown key "colour" (Sensor takes celsius, '
         "gain, label, on, taps; and class, name, base, gsi)"),
        ("devs.py:Sensor,on=1,on=0", '--device: "on" is given twice'),
        ("nope.py:Sensor", "--device: nope.py does not exist"),
    ],
)
def test_option_mistakes_name_the_option(
    tree: Path, option: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree)
    with pytest.raises(ConfigError) as info:
        partition_from_args("hello.elf", devices=[option])
    assert str(info.value) == message


# ---------------------------------------------------------------------- schema, document


def test_a_file_with_devices_is_valid_to_the_schema_and_round_trips(tree: Path) -> None:
    text = device('class = "devs.py:Sensor"\nname = "t"\ncelsius = 25\ntaps = [1, 2]\n'
                  'label = "x"\ngain = 0.5\non = false')
    (tree / "s.toml").write_text(text)
    jsonschema.validate(tomllib.loads(text), system_schema())
    system = read_system(tree / "s.toml")
    doc = system_document(system)
    jsonschema.validate(doc, system_schema())
    assert system_from_document(doc, "doc", Path("/elsewhere")).partitions == system.partitions


def test_the_example_system_file_is_valid() -> None:
    path = ROOT / "examples" / "sensor.toml"
    jsonschema.validate(tomllib.loads(path.read_text()), system_schema())
    (d,) = read_system(path).partitions[0].devices
    assert (d.base, d.size, d.gsi, d.level) == (0x700, 4, 5, True)


def test_the_schema_refuses_a_device_without_a_class() -> None:
    doc = {"partitions": {"a": {"image": "x.elf", "devices": [{"celsius": 1}]}}}
    assert list(jsonschema.Draft202012Validator(system_schema()).iter_errors(doc))


# ---------------------------------------------------------------------- the public API


def test_declarations_check_their_values() -> None:
    assert Irq(5, "level").trigger is Trigger.LEVEL and Irq(5) == Irq(5, "edge")
    for bad in (
        lambda: Ports(0x700, 0),
        lambda: Ports(0x700, 0x101),
        lambda: Ports(0xFFFF, 2),
        lambda: Ports(-1, 1),
        lambda: Mmio(0, 0),
        lambda: Mmio(1 << 39, 1),
        lambda: Irq(5, "rising"),
        lambda: Irq("5"),  # type: ignore[arg-type]
        lambda: Ports(0x700, True),
    ):
        with pytest.raises(ValueError):
            bad()


def test_an_irq_line_drives_the_chip_only_on_a_change() -> None:
    driven: list[int] = []
    line = IrqLine(5, Trigger.LEVEL, driven.append)
    line.set(True)
    line.set(True)
    assert line.level and driven == [1]
    line.set(False)
    line.pulse()
    assert driven == [1, 0, 1, 0] and not line.level
    line.set(True)
    line.pulse()  # a high line is lowered first, so the pulse is a new edge
    assert driven == [1, 0, 1, 0, 1, 0, 1, 0]


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    memory = GuestMemory.anonymous([(0, 2 << 20)])
    yield GuestRam(memory)
    memory.close()


def test_guest_ram_is_bounds_checked(ram: GuestRam) -> None:
    ram.write(0x1000, b"abc")
    assert ram.read(0x1000, 3) == b"abc"
    assert ram.contains(0, 2 << 20) and not ram.contains((2 << 20) - 1, 2)
    for bad in (
        lambda: ram.read((2 << 20) - 2, 4),  # crosses the end of RAM
        lambda: ram.write(-1, b"x"),
        lambda: ram.read(0, GuestRam.MAX_ACCESS + 1),
        lambda: ram.read("0", 1),  # type: ignore[arg-type]
        lambda: ram.write(1 << 40, b"x"),
    ):
        with pytest.raises(GuestMemoryError):
            bad()
    assert not ram.contains("0")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the timer thread

WAIT = 30.0  # seconds an Event may take to come: a bound for a hang, never a measurement


@pytest.fixture
def clock() -> Iterator[DeviceTimers]:
    c = DeviceTimers("test")
    yield c
    c.close()


def _timer(clock: DeviceTimers, fired: list[int], done: threading.Event, n: int,
           index: int = 0) -> Timer:
    """A timer whose runner records its index and sets done after n firings."""
    def runner(t: Timer) -> None:
        fired.append(t.index)
        if len(fired) >= n:
            done.set()

    timer = Timer(clock, lambda: None, index)
    clock.add(timer, runner)
    return timer


def test_timers_armed_before_the_start_fire_after_it(clock: DeviceTimers) -> None:
    fired: list[int] = []
    done = threading.Event()
    once = _timer(clock, fired, done, 3)
    once.start(0.001)
    assert once.active and clock.saved(once) == (0.001, None)
    assert not done.wait(0.05) and fired == []  # nothing fires before start()
    periodic = _timer(clock, fired, done, 3, index=1)
    periodic.start(0.001, periodic=True)
    clock.start()
    assert done.wait(WAIT)
    assert fired.count(0) == 1 and fired.count(1) >= 2  # one-shot once, periodic again
    assert not once.active and periodic.active
    periodic.cancel()
    assert not periodic.active and clock.saved(periodic) is None


def test_a_parked_clock_fires_nothing_until_unparked(clock: DeviceTimers) -> None:
    fired: list[int] = []
    done = threading.Event()
    t = _timer(clock, fired, done, 1)
    clock.start()
    clock.park()
    t.start(0.001)
    assert not done.wait(0.05) and fired == []
    due, interval = clock.saved(t) or (None, None)
    assert due is not None and due >= 0 and interval is None
    clock.unpark()
    assert done.wait(WAIT) and fired == [0]


def test_a_timer_rejects_a_bad_period(clock: DeviceTimers) -> None:
    t = Timer(clock, lambda: None, 0)
    for bad in (0, -1.0, float("inf"), float("nan"), "1", True):
        with pytest.raises(DeviceError):
            t.start(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("pci", [False, True])
def test_the_user_device_areas_stay_free_in_every_machine(pci: bool) -> None:
    from corevisor.arch.x86_64 import layout
    from corevisor.resources import Space, machine_map

    res = machine_map("m", 4 << 30, pci)  # RAM up to the hole and beyond 4 GiB
    low, high = layout.USER_DEVICE_PORTS
    assert res.conflict(Space.PIO, low, high - low) is None
    low, high = layout.USER_DEVICE_MMIO
    assert res.conflict(Space.GPA, low, high - low) is None
    assert high <= layout.CHANNEL_AREA_START
    (d,) = read_system(ROOT / "examples" / "sensor.toml").partitions[0].devices
    assert layout.USER_DEVICE_PORTS[0] <= d.base < d.end <= layout.USER_DEVICE_PORTS[1]
