"""Multiboot modules: how they are named on the command line and where they go in RAM.

Two spellings, both parsed here once, at the edge (config/files.py calls these):

* ``--module FILE[,STRING]`` (repeatable) and the system-file key
  ``modules = ["FILE[,STRING]", ...]``: one module each; everything after the first
  comma is its string, which defaults to FILE as written (the module's name first is
  the convention GRUB and QEMU follow).
* ``--initrd "FILE ARGS,FILE ARGS"`` (and the ``initrd`` key) for a multiboot image means
  its modules, exactly as QEMU's ``-initrd`` does for a multiboot kernel: a
  comma-separated list (``,,`` is a literal comma) whose entries are a file name, then,
  after a space, arguments; the whole entry is the module's string.

Modules are placed as QEMU places them: page-aligned, one after another, above the
image, skipping the ranges the VMM writes (placement.py). The builder lists them in the
multiboot information (bootparams.write_multiboot_info).

What does not live here: the initrd of a Linux kernel (initrd.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corevisor import inputs
from corevisor.errors import LoaderError
from corevisor.loader.elf import LoadedImage
from corevisor.loader.placement import check_placement, collision
from corevisor.memory import GuestMemory
from corevisor.spec import ModuleSpec

PAGE = 0x1000


@dataclass(frozen=True)
class LoadedModule:
    """Where a module went: gpa, size in bytes, and its string."""

    gpa: int
    size: int
    string: bytes


def split_module(text: str) -> tuple[str, str]:
    """FILE[,STRING] -> (FILE, STRING); STRING defaults to FILE."""
    file, sep, string = text.partition(",")
    return file, (string if sep else file)


def split_qemu_initrd(text: str) -> list[tuple[str, str]]:
    """QEMU's multiboot -initrd list -> [(FILE, STRING)]: entries split at single commas
    (",," is a comma in an entry), FILE is an entry up to its first space."""
    entries = [""]
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                entries[-1] += ","
                i += 2
                continue
            entries.append("")
        else:
            entries[-1] += text[i]
        i += 1
    return [(entry.split(" ", 1)[0], entry) for entry in entries]


def _align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def load_modules(
    mem: GuestMemory, modules: Sequence[ModuleSpec], image: LoadedImage
) -> list[LoadedModule]:
    """Copy each module into RAM, page-aligned above the image; nothing is written unless
    every module fits."""
    planned: list[tuple[int, bytes, ModuleSpec]] = []
    cursor = _align(image.end)
    for module in modules:
        name = str(module.path)
        data = inputs.read_file(
            module.path, name, limit=mem.size, why="of the guest's RAM", error=LoaderError
        )
        hit = collision(cursor, cursor + max(len(data), 1))
        while hit is not None:
            cursor = _align(hit[1])
            hit = collision(cursor, cursor + max(len(data), 1))
        check_placement(mem, name, "module", cursor, cursor + len(data))
        if cursor + len(data) > 1 << 32:
            raise LoaderError(f"{name}: module would end above 4 GiB ({cursor + len(data):#x})")
        planned.append((cursor, data, module))
        cursor = _align(cursor + len(data))
    for gpa, data, _ in planned:
        mem.write(gpa, data)
    return [LoadedModule(gpa, len(data), m.string.encode()) for gpa, data, m in planned]
