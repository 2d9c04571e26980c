"""Guest image loaders: they put bytes in guest RAM and report where they went.

Loaders never set registers or write boot information; the builder does that from the
returned LoadedImage. ELF (PVH and multiboot, with raw a.out-kludge multiboot images)
lives in elf.py, the Linux bzImage in bzimage.py, the initrd in initrd.py, multiboot
modules in modules.py, the check of where bytes may go in placement.py and the cpio
(initramfs) writer in initramfs.py. identify_file is the one answer to "what is this
image": the config check asks it too.
"""

from pathlib import Path

from corevisor import inputs
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
    "MAX_IMAGE",
    "identify_file",
    "identify_image",
    "load_image",
    "load_initrd",
    "load_modules",
    "read_image",
]

# The largest image file any guest may boot, whatever its RAM: Debian's vmlinux is
# ~60 MiB; a file beyond this is a mistake (a disk image, a sparse file), not a kernel.
MAX_IMAGE = 1 << 30


def identify_image(data: bytes, name: str) -> ImageKind:
    """Say which boot protocol an image uses, checking it fully but loading nothing."""
    if bzimage.is_bzimage(data):
        bzimage.parse_setup_header(data, name)
        return "bzimage"
    return elf.identify_image(data, name)


def read_image(path: Path, limit: int = MAX_IMAGE, why: str = "an image can be") -> bytes:
    """The whole image file, refused unread if it is larger than limit (inputs.py).

    Whatever the protocol, what is loaded is copied into RAM, so a file larger than the
    guest's RAM is not an image for it (a sparse 30 GiB file, /dev/zero behind a link).
    """
    return inputs.read_file(path, show(path), limit=limit, why=why, error=LoaderError)


def identify_file(path: Path) -> ImageKind:
    """identify_image for a file: the boot protocol it would load with, or LoaderError."""
    return identify_image(read_image(path), show(path))


def load_image(mem: GuestMemory, path: Path) -> LoadedImage:
    """Load a bzImage, PVH or multiboot image, whichever path holds, into guest RAM."""
    data = read_image(path, min(mem.size, MAX_IMAGE), "of the guest's RAM")
    if bzimage.is_bzimage(data):
        return bzimage.load_bzimage(mem, path, data)
    return elf.load_image(mem, path, data)
