"""Guest image loaders: they put bytes in guest RAM and report where they went.

Loaders never set registers or write boot information; the builder does that from the
returned LoadedImage. Only ELF (PVH and multiboot) lives here so far.
"""

from corevisor.loader.elf import LoadedImage, identify_image, load_image

__all__ = ["LoadedImage", "identify_image", "load_image"]
