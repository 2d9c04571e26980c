"""User devices that are PCI functions, without KVM: the mistakes in a devices table for
this kind (one line naming the file and the key), its declaration's checks, its spec and
document round trip, and the function's configuration space and interrupt logic
(BAR sizing, INTx on a shared line, INTX_DISABLE, MSI instead of INTx). What the guest
sees on real KVM is tests/kvm/test_userdev.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from corevisor.config.document import system_document
from corevisor.config.toml import system_from_document
from corevisor.pci import config as cfg
from corevisor.spec import DeviceSpace
from corevisor.userdev import Bar, Pci
from corevisor.userdev.function import SharedLines, UserFunction
from tests.unit.test_userdev import KEY, error, load, tree  # noqa: F401 - the fixture

PCI_DEVICES = '''
from corevisor.userdev import Bar, Irq, Pci

class Widget:
    REGION = Pci(vendor=0x1234, device=0x5678, class_code=0xFF0000,
                 bars=(Bar(0x1000), Bar(16, io=True)))
    def __init__(self, host, speed: int = 1): pass
    def read(self, bar, offset, size): return bytes(size)
    def write(self, bar, offset, data): pass

class WithIrq(Widget):
    IRQ = Irq(5)

class NoRead:
    REGION = Widget.REGION
    def __init__(self, host): pass
    def write(self, bar, offset, data): pass
'''

PCI_HEAD = '[partitions.demo]\nimage = "hello.elf"\ntransport = "pci"\n'


def pci_device(body: str, head: str = PCI_HEAD) -> str:
    return f"{head}[[partitions.demo.devices]]\n{body}\n"


@pytest.fixture
def pci_tree(tree: Path) -> Path:  # noqa: F811 - the fixture imported above
    (tree / "pcidevs.py").write_text(PCI_DEVICES)
    return tree


PCI_ERRORS = {
    'class = "pcidevs.py:WithIrq"': f"{KEY}.class: WithIrq is a PCI function and declares an "
    "IRQ: its line is its slot's INTx or MSI (Pci(..., interrupt=True)): drop the IRQ",
    'class = "pcidevs.py:NoRead"': f"{KEY}.class: NoRead has no read() method (a device "
    "answers read(bar, offset, size) -> bytes and write(bar, offset, data))",
    'class = "pcidevs.py:Widget"\nbase = 0x700': f"{KEY}.base: Widget is a PCI function: its "
    "BARs are placed by the PCI platform or the firmware",
    'class = "pcidevs.py:Widget"\ngsi = 5': f"{KEY}.gsi: Widget is a PCI function: its line "
    "is its slot's INTx",
    'class = "pcidevs.py:Widget"\nspeed = "fast"': f"{KEY}.speed: expected an integer "
    "(Widget's parameter speed: int), got a string \"fast\"",
}


@pytest.mark.parametrize("body", PCI_ERRORS, ids=range(len(PCI_ERRORS)))
def test_each_pci_mistake_is_one_line_naming_the_file_and_key(pci_tree: Path, body: str) -> None:
    assert error(pci_tree, pci_device(body)) == PCI_ERRORS[body]


def test_a_pci_device_needs_a_pci_bus(pci_tree: Path) -> None:
    head = '[partitions.demo]\nimage = "hello.elf"\n'
    assert error(pci_tree, pci_device('class = "pcidevs.py:Widget"', head)) == (
        f'{KEY}: device widget is a PCI function, but partition demo has no PCI bus (give it '
        'transport = "pci" or a bios)'
    )


def test_a_pci_device_s_spec_has_no_range_and_round_trips(pci_tree: Path) -> None:
    text = pci_device('class = "pcidevs.py:Widget"\nname = "w"\nspeed = 3')
    (d,) = load(pci_tree, text)
    assert (d.space, d.base, d.size, d.gsi, d.params) == (DeviceSpace.PCI, 0, 0, None,
                                                          (("speed", 3),))
    assert d.where == "a PCI function"
    (pci_tree / "s.toml").write_text(text)
    from corevisor.config import load_config

    system = load_config(pci_tree / "s.toml")
    document = system_document(system)
    table = document["partitions"]["demo"]["devices"][0]
    assert "base" not in table and "gsi" not in table  # placed by the platform
    again = system_from_document(document, "s.toml", pci_tree)
    assert again.partitions[0].devices == system.partitions[0].devices


def test_two_pci_devices_need_only_distinct_names(pci_tree: Path) -> None:
    one = '[[partitions.demo.devices]]\nclass = "pcidevs.py:Widget"\n'
    two = one + 'name = "second"\n'
    assert len(load(pci_tree, PCI_HEAD + one + two)) == 2  # no ranges or lines to collide


@pytest.mark.parametrize("bad", [
    lambda: Bar(0x1001),
    lambda: Bar(8),
    lambda: Bar(512, io=True),
    lambda: Bar(2, io=True),
    lambda: Bar(1 << 29),
    lambda: Bar(0x1000, io=1),  # type: ignore[arg-type]
    lambda: Pci(vendor=0xFFFF, device=1, class_code=0, bars=(Bar(16),)),
    lambda: Pci(vendor=0x10000, device=1, class_code=0, bars=(Bar(16),)),
    lambda: Pci(vendor=1, device=1, class_code=1 << 24, bars=(Bar(16),)),
    lambda: Pci(vendor=1, device=1, class_code=0, bars=()),
    lambda: Pci(vendor=1, device=1, class_code=0, bars=(Bar(16),) * 7),
    lambda: Pci(vendor=1, device=1, class_code=0, bars=[Bar(16)]),  # type: ignore[arg-type]
    lambda: Pci(vendor=1, device=1, class_code=0, bars=(Bar(16),), interrupt=1),  # type: ignore[arg-type]
], ids=range(13))
def test_pci_declarations_check_their_values(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


# ---------------------------------------------------------------------- the function

WIDGET = Pci(vendor=0x1234, device=0x5678, class_code=0xFF0000,
             bars=(Bar(0x1000), Bar(16, io=True)))


def function(slot: int, driven: list[tuple[int, int]],
             msis: list[tuple[int, int]] | None = None,
             lines: SharedLines | None = None) -> UserFunction:
    f = UserFunction(WIDGET, f"device {slot}",
                     lambda a, d: (msis if msis is not None else []).append((a, d)))
    f.slot = slot
    f.lines = lines or SharedLines(lambda gsi, level: driven.append((gsi, level)))
    return f


def test_the_function_answers_its_ids_and_sizes_its_bars() -> None:
    f = function(1, [])
    assert f.read(cfg.VENDOR_ID, 4) == 0x5678_1234
    assert f.read(cfg.REVISION, 4) >> 8 == 0xFF0000  # class, subclass, prog-if
    assert f.read(cfg.INTERRUPT_PIN, 1) == 1
    for bar, size, low in ((0, 0x1000, 0), (1, 16, 1)):
        f.write(cfg.BAR0 + 4 * bar, 4, 0xFFFFFFFF)
        assert f.read(cfg.BAR0 + 4 * bar, 4) == (~(size - 1) & 0xFFFFFFFF) | low


def test_intx_follows_the_request_and_intx_disable_on_a_shared_line() -> None:
    driven: list[tuple[int, int]] = []
    lines = SharedLines(lambda gsi, level: driven.append((gsi, level)))
    a, b = function(1, driven, lines=lines), function(2, driven, lines=lines)
    assert a.gsi == b.gsi == 10  # PIRQ A and B: the same ISA line
    a.set_request(1)
    assert driven == [(10, 1)] and a.read(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    b.set_request(1)
    a.set_request(0)
    assert driven == [(10, 1)]  # b still holds the line
    assert not a.read(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    b.write(cfg.COMMAND, 2, cfg.COMMAND_INTX_DISABLE)
    assert driven == [(10, 1), (10, 0)]  # masked: lowered, the status bit stays
    assert b.read(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    b.write(cfg.COMMAND, 2, 0)
    assert driven[-1] == (10, 1)


def test_with_msi_enabled_a_rise_is_a_message_and_intx_stays_low() -> None:
    driven: list[tuple[int, int]] = []
    msis: list[tuple[int, int]] = []
    f = function(3, driven, msis)
    assert f.gsi == 11 and f.msi is not None
    cap = f.msi.offset
    f.write(cap + 4, 4, 0xFEE01000)
    f.write(cap + 12, 2, 0x26)
    f.write(cap + 2, 2, 1)  # enable, one vector
    f.set_request(1)
    f.set_request(1)
    f.set_request(0)
    f.set_request(1)
    assert msis == [(0xFEE01000, 0x26)] * 2 and driven == []
    f.write(cap + 2, 2, 0)  # MSI off: the request still high goes out on INTx
    assert driven == [(11, 1)]


def test_the_config_space_is_saved_and_checked_on_restore() -> None:
    f = function(1, [])
    f.place_bar(0, 0xE0100000)
    state = f.save()
    g = function(1, [])
    g.restore(state)
    assert g.bar_address(0) == 0xE0100000 and g.windows()[0].base == 0xE0100000
    other = UserFunction(Pci(vendor=0x1234, device=0x9999, class_code=0, bars=(Bar(16),)),
                         "other", lambda a, d: None)
    with pytest.raises(Exception, match="read-only config byte 0x2"):
        other.restore(state)
