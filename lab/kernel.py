"""The packaged Linux kernel the lab boots, and the modules it needs with their dependencies.

The lab boots Debian's ``linux-image-amd64`` kernel, found through its module tree:
``/lib/modules/VERSION`` with a matching ``/boot/vmlinuz-VERSION``. Never the running
kernel (``uname -r``): a CI host may run a kernel whose modules are not installed, and
the lab needs kvm_amd, 9p and virtio from the very kernel it boots.

Module dependencies come from that tree's ``modules.dep`` (what depmod wrote), so a
module list here names only what is wanted (``kvm_amd``), and ``load_order`` returns it
with everything it needs, dependencies first, each once: the order ``insmod`` must use.
Both the lab's own initramfs (lab/initramfs.py) and the tests' L2 initramfs use this.

The lab boots the kernel's uncompressed vmlinux through its PVH entry (QEMU's -kernel
takes it), extracted once with corevisor's own bzImage loader and cached: under TCG the
bzImage's decompressor alone costs ~4 s of every boot (measured: `lab/run -- true` in
~9 s from the bzImage, ~5 s from the vmlinux). The L2 tests boot the same cached file.

What does not live here: building an archive (lab/initramfs.py), running QEMU (lab/vm.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Kernel", "KernelNotFound", "ModuleNotFound", "find_kernel"]

MODULES_ROOT = Path("/lib/modules")
BOOT = Path("/boot")
# The module the lab cannot do without: a kernel tree lacking it is not a candidate.
REQUIRED_MODULE = "kvm_amd"
INSTALL_HINT = "install Debian's linux-image-amd64 (scripts/install-system-deps)"


class KernelNotFound(Exception):
    """No packaged kernel with its modules and image is installed."""


class ModuleNotFound(Exception):
    """A module the lab wants is not in the kernel's modules.dep."""


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Sort 6.1.0-57-amd64 after 6.1.0-9-amd64: numbers compare as numbers."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-]", version))


def module_name(path: str) -> str:
    """kernel/arch/x86/kvm/kvm-amd.ko -> kvm_amd (the kernel treats - and _ alike)."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


@dataclass(frozen=True)
class Kernel:
    """One installed kernel: its version, image and module tree."""

    version: str
    image: Path
    modules: Path

    @property
    def config(self) -> Path:
        return BOOT / f"config-{self.version}"

    def vmlinux(self, cache: Path) -> Path:
        """The image's uncompressed vmlinux (PVH entry), extracted once into cache."""
        st = self.image.stat()
        out = cache / f"vmlinux-{self.version}-{st.st_size}-{st.st_mtime_ns}"
        if not out.exists():
            from corevisor.loader.bzimage import extract_vmlinux  # the product's extractor

            cache.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
            tmp.write_bytes(extract_vmlinux(self.image.read_bytes(), str(self.image)))
            os.replace(tmp, out)  # atomic, for concurrent lab runs
        return out

    def _deps(self) -> dict[str, tuple[str, list[str]]]:
        """name -> (relative path, relative paths of its dependencies) from modules.dep."""
        table: dict[str, tuple[str, list[str]]] = {}
        for line in (self.modules / "modules.dep").read_text().splitlines():
            path, _, rest = line.partition(":")
            if path:
                table[module_name(path)] = (path, rest.split())
        return table

    def builtin(self) -> set[str]:
        """Modules built into the image (no file to load)."""
        listing = self.modules / "modules.builtin"
        return {module_name(p) for p in listing.read_text().split()} if listing.exists() else set()

    def load_order(self, wanted: Iterable[str]) -> list[Path]:
        """The module files to insmod for wanted, dependencies first, each once.

        Built-in modules are skipped (nothing to load); a name that is neither a module
        nor built in raises ModuleNotFound naming it.
        """
        deps = self._deps()
        builtin = self.builtin()
        order: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            if name not in deps:
                if name in builtin:
                    return
                raise ModuleNotFound(f"{name}: not in {self.modules}/modules.dep")
            for dep in deps[name][1]:
                visit(module_name(dep))
            order.append(name)

        for name in wanted:
            visit(name.replace("-", "_"))
        return [self.modules / deps[n][0] for n in order]


def find_kernel() -> Kernel:
    """The newest installed kernel that has a module tree with kvm_amd and a /boot image."""
    candidates = []
    for tree in MODULES_ROOT.glob("*/modules.dep") if MODULES_ROOT.is_dir() else []:
        version = tree.parent.name
        image = BOOT / f"vmlinuz-{version}"
        if image.is_file() and f"/{REQUIRED_MODULE.replace('_', '-')}.ko" in tree.read_text():
            candidates.append(Kernel(version, image, tree.parent))
    if not candidates:
        raise KernelNotFound(
            f"no packaged kernel: need /lib/modules/VERSION (with {REQUIRED_MODULE}) and "
            f"/boot/vmlinuz-VERSION; {INSTALL_HINT}"
        )
    return max(candidates, key=lambda k: _version_key(k.version))
