"""Guest image loaders: they put bytes in guest RAM and report where they went.

Loaders never set registers or write boot information; the builder does that from the
returned LoadedImage. ELF (PVH and multiboot, with raw a.out-kludge multiboot images)
lives in elf.py, the Linux bzImage in bzimage.py, the initrd in initrd.py, multiboot
modules in modules.py, the check of where bytes may go in placement.py and the cpio
(initramfs) writer in initramfs.py. identify_file is the one answer to "what is this
image": the config check asks it too.
"""

from pathlib import Path

from corevisor.errors import LoaderError, show
from corevisor.loader import bzimage, elf
from corevisor.loader.elf import ImageKind, LoadedImage
from corevisor.loader.initrd import Initrd, load_initrd
from corevisor.loader.modules import LoadedModule, load_modules
from corevisor.memory import GuestMemory

__all__ = [
    "ImageKind",
    "Initrd",
    "LoadedImage",
    "LoadedModule",
    "identify_file",
    "identify_image",
    "load_image",
    "load_initrd",
    "load_modules",
]


def identify_image(data: bytes, name: str) -> ImageKind:
    """Say which boot protocol an image uses, checking it fully but loading nothing."""
    if bzimage.is_bzimage(data):
        bzimage.parse_setup_header(data, name)
        return "bzimage"
    return elf.identify_image(data, name)


def identify_file(path: Path) -> ImageKind:
    """identify_image for a file: the boot protocol it would load with, or LoaderError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoaderError(f"{path}: cannot read image: {e.strerror or e}") from e
    return identify_image(data, str(path))


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
