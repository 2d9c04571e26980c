"""Guest image loaders: they put bytes in guest RAM and report where they went.

Loaders never set registers or write boot information; the builder does that from the
returned LoadedImage. ELF (PVH and multiboot) lives in elf.py, the Linux bzImage in
bzimage.py, the initrd in initrd.py and the cpio (initramfs) writer in initramfs.py.
"""

from pathlib import Path

from corevisor import inputs
from corevisor.errors import LoaderError
from corevisor.loader import bzimage, elf
from corevisor.loader.elf import ImageKind, LoadedImage
from corevisor.loader.initrd import Initrd, load_initrd
from corevisor.memory import GuestMemory

__all__ = ["Initrd", "LoadedImage", "identify_image", "load_image", "load_initrd", "read_image"]


def identify_image(data: bytes, name: str) -> ImageKind:
    """Say which boot protocol an image uses, checking it fully but loading nothing."""
    if bzimage.is_bzimage(data):
        bzimage.parse_setup_header(data, name)
        return "bzimage"
    return elf.identify_image(data, name)


def read_image(mem: GuestMemory, path: Path) -> bytes:
    """The whole image file, refused unread if it is larger than the guest's RAM.

    Whatever the protocol, what is loaded is copied into RAM, so a bigger file is not
    an image for this guest (a sparse 30 GiB file, /dev/zero behind a symlink).
    """
    return inputs.read_file(
        path, str(path), limit=mem.size, why="of the guest's RAM", error=LoaderError
    )


def load_image(mem: GuestMemory, path: Path) -> LoadedImage:
    """Load a bzImage, PVH or multiboot image, whichever path holds, into guest RAM."""
    data = read_image(mem, path)
    if bzimage.is_bzimage(data):
        return bzimage.load_bzimage(mem, path, data)
    return elf.load_image(mem, path, data)
