"""Multiboot modules: their two spellings and their placement (loader/modules.py), the
config that turns them into PartitionConfig.modules, and the multiboot info listing them."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from corevisor.arch.x86_64 import layout
from corevisor.arch.x86_64.bootparams import write_multiboot_info
from corevisor.config import load_config, partition_from_args
from corevisor.errors import ConfigError, LoaderError
from corevisor.loader import LoadedImage, load_modules
from corevisor.loader.modules import split_module, split_qemu_initrd
from corevisor.memory import GuestMemory
from corevisor.spec import ModuleSpec as Module
from tests.kvm.asm import assemble
from tests.kvm.images import pvh_elf

MiB = 1 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 16 * MiB)])
    yield m
    m.close()


def test_split_module() -> None:
    assert split_module("a.bin") == ("a.bin", "a.bin")
    assert split_module("a.bin,x=1, y") == ("a.bin", "x=1, y")
    assert split_module("a.bin,") == ("a.bin", "")


def test_split_qemu_initrd_like_get_opt_value() -> None:
    assert split_qemu_initrd("a.bin arg1 arg2,b.bin") == [
        ("a.bin", "a.bin arg1 arg2"), ("b.bin", "b.bin")
    ]
    assert split_qemu_initrd("a.bin x,,y") == [("a.bin", "a.bin x,y")]


def _image(end: int) -> LoadedImage:
    return LoadedImage(Path("k"), "multiboot", 0x10000, 0x10000, end)


def test_modules_go_page_aligned_above_the_image_skipping_vmm_ranges(
    mem: GuestMemory, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A" * 0xA000)
    b.write_bytes(b"B" * 10)
    placed = load_modules(mem, [Module(a, "a s"), Module(b, "b")], _image(0x90123))
    # 0x91000 + 0xA000 would run into the boot information at 0x9A000: the first module
    # moves past it, the command lines and the EBDA/BIOS area, to 1 MiB; the second follows
    assert [(m.gpa, m.size, m.string) for m in placed] == [
        (0x100000, 0xA000, b"a s"), (0x10A000, 10, b"b")
    ]
    assert mem.read(0x100000, 2) == b"AA" and mem.read(0x10A000, 10) == b"B" * 10


def test_a_module_that_does_not_fit_writes_nothing(mem: GuestMemory, tmp_path: Path) -> None:
    a, big = tmp_path / "a", tmp_path / "big"
    a.write_bytes(b"A")
    big.write_bytes(bytes(17 * MiB))
    with pytest.raises(LoaderError, match=r"big is 17M, more than the 16M of the guest's RAM"):
        load_modules(mem, [Module(a, ""), Module(big, "")], _image(0x101000))
    assert mem.read(0x101000, 1) == b"\0"


def test_multiboot_info_lists_modules_with_their_strings(mem: GuestMemory) -> None:
    addr = write_multiboot_info(mem, b"k arg", [(0x200000, 5, b"one"), (0x201000, 0, b"two")])
    flags, _, _, _, cmdline, count, mods = struct.unpack_from("<7I", mem.read(addr, 28))
    assert flags & (1 << 3) and flags & (1 << 9) and count == 2
    entries = [struct.unpack_from("<4I", mem.read(mods + 16 * i, 16)) for i in range(2)]
    assert [(s, e) for s, e, _, _ in entries] == [(0x200000, 0x200005), (0x201000, 0x201000)]

    def cstr(gpa: int) -> bytes:
        data = mem.read(gpa, 64)
        return data[: data.index(b"\0")]

    assert [cstr(e[2]) for e in entries] == [b"one", b"two"]
    assert cstr(cmdline) == b"k arg"
    assert cstr(mem.read_u32(addr + 64)) == b"corevisor"
    assert layout.CMDLINE_ADDR <= cmdline < layout.CMDLINE_ADDR + layout.CMDLINE_MAX


def _aout(tmp_path: Path) -> Path:
    """A raw multiboot a.out-kludge image (no ELF header) linked at 64 KiB."""
    src = """
    .balign 4
mb: .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000), mb, _start, 0, 0, _start
main: hlt
"""
    path = tmp_path / "raw.bin"
    path.write_bytes(assemble(src, load_addr=0x10000))
    return path


def test_config_accepts_a_raw_aout_image_and_its_modules(tmp_path: Path) -> None:
    image = _aout(tmp_path)
    (tmp_path / "m").write_bytes(b"m")
    part = partition_from_args(str(image), modules=[f"{tmp_path / 'm'},the string"])
    assert part.modules == (Module(tmp_path / "m", "the string"),)
    part = partition_from_args(str(image), initrd=f"{tmp_path / 'm'} x,{tmp_path / 'm'}")
    assert part.initrd is None
    assert [m.string for m in part.modules] == [f"{tmp_path / 'm'} x", str(tmp_path / "m")]
    (tmp_path / "s.toml").write_text('[partitions.a]\nimage = "raw.bin"\nmodules = ["m"]\n')
    (p,) = load_config(tmp_path / "s.toml").partitions
    assert p.modules == (Module(tmp_path / "m", "m"),)


def test_config_errors_for_modules(tmp_path: Path) -> None:
    image = _aout(tmp_path)
    with pytest.raises(ConfigError, match=r"^--module: nope does not exist$"):
        partition_from_args(str(image), modules=["nope"])
    with pytest.raises(ConfigError, match=r"^--initrd: nope does not exist$"):
        partition_from_args(str(image), initrd="nope arg")
    elf = tmp_path / "k.elf"
    elf.write_bytes(pvh_elf(b"\xf4"))
    (tmp_path / "m").write_bytes(b"m")
    with pytest.raises(ConfigError, match=r"^--module: modules need a multiboot image"):
        partition_from_args(str(elf), modules=[str(tmp_path / "m")])
    (tmp_path / "s.toml").write_text('[partitions.a]\nimage = "raw.bin"\nmodules = "m"\n')
    with pytest.raises(ConfigError, match=r"partitions.a.modules: expected an array"):
        load_config(tmp_path / "s.toml")
