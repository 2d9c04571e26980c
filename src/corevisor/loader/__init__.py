"""Guest image loaders: they put bytes in guest RAM and report where they went.

Loaders never set registers or write boot information; the builder does that from the
returned LoadedImage. ELF (PVH and multiboot) lives in elf.py, the Linux bzImage in
bzimage.py, the initrd in initrd.py and the cpio (initramfs) writer in initramfs.py.
"""

from pathlib import Path

from corevisor.errors import LoaderError, show
from corevisor.loader import bzimage, elf
from corevisor.loader.elf import ImageKind, LoadedImage
from corevisor.loader.initrd import Initrd, load_initrd
from corevisor.memory import GuestMemory

__all__ = ["Initrd", "LoadedImage", "identify_image", "load_image", "load_initrd"]


def identify_image(data: bytes, name: str) -> ImageKind:
    """Say which boot protocol an image uses, checking it fully but loading nothing."""
    if bzimage.is_bzimage(data):
        bzimage.parse_setup_header(data, name)
        return "bzimage"
    return elf.identify_image(data, name)


def load_image(mem: GuestMemory, path: Path) -> LoadedImage:
    """Load a bzImage, PVH or multiboot image, whichever path holds, into guest RAM."""
    try:
        with path.open("rb") as f:
            head = f.read(0x206)
    except OSError as e:
        raise LoaderError(f"{show(path)}: cannot read image: {e.strerror or e}") from e
    if bzimage.is_bzimage(head):
        return bzimage.load_bzimage(mem, path)
    return elf.load_image(mem, path)
