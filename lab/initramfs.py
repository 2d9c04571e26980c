"""The lab's L1 initramfs: a static busybox, lab/init.sh as /init, the modules it loads.

The archive is built with corevisor's own newc writer (corevisor.loader.initramfs) and
cached under the lab's cache directory, named by a hash of everything that goes in (the
init script, this builder, busybox, the kernel version and each module file's path, size and mtime),
so a new kernel package, busybox or init script builds a new one and an unchanged set
costs one stat per input. The archive is uncompressed: QEMU-TCG would spend seconds
decompressing it, and the page cache holds it anyway.

Which modules: what the init script needs before the host's root is mounted (virtio-pci
and 9p), the hypervisor (kvm_amd, its dependencies from modules.dep), and tun for the
TAP devices the network tests create, and VFIO (vfio, vfio_iommu_type1, vfio_pci: --iommu
binds the edu device to vfio-pci; without an IOMMU they load and stay idle). Anything
else the command needs it can modprobe from the host's /lib/modules, which is the same
tree (kernel.py).

What does not live here: finding the kernel and resolving dependencies (kernel.py),
booting it (vm.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.kernel import Kernel

__all__ = [
    "L1_MODULES",
    "BusyboxNotFound",
    "busybox_path",
    "busybox_initramfs",
    "l1_initramfs",
    "pack",
]

L1_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "kvm_amd", "tun",
              "vfio", "vfio_iommu_type1", "vfio_pci")
INIT = Path(__file__).with_name("init.sh")
PT_INTERP = 3
# Archives of other inputs (another worktree's init script, an older kernel) are kept
# this long, so lab runs from different checkouts do not rebuild each other's.
KEEP_OLD_S = 7 * 86400


class BusyboxNotFound(Exception):
    """No statically linked busybox (Debian's busybox-static) on the host."""


def busybox_path() -> Path:
    """The host's busybox, which must be static: it runs before any library exists."""
    path = Path(shutil.which("busybox") or "/bin/busybox")
    try:
        elf = path.read_bytes()
    except OSError:
        raise BusyboxNotFound("no busybox: install busybox-static") from None
    if elf[:5] != b"\x7fELF\x02" or _has_interpreter(elf):
        raise BusyboxNotFound(f"{path} is not a static x86-64 binary: install busybox-static")
    return path


def _has_interpreter(elf: bytes) -> bool:
    """Whether an ELF64 file asks for a dynamic loader (a PT_INTERP program header)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(
        struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == PT_INTERP for i in range(phnum)
    )


def pack(files: dict[str, Path | bytes], symlinks: dict[str, str] | None = None) -> bytes:
    """A newc archive of files (archive name -> host file or contents) and symlinks.

    Directories are added before their children; /dev/console is always there (init's
    stdin and stdout). Files keep their host mode; bytes become 0755 if they start with
    "#!", else 0644. Used for the lab's own initramfs and for the tests' L2 ones.
    """
    import corevisor.loader.initramfs as cpio  # the product's newc writer: one home for it

    entries: list[cpio.Entry] = [cpio.directory("dev"), cpio.char_device("dev/console", 5, 1)]
    have = {"dev", "dev/console"}
    items: list[tuple[str, Path | bytes | str]] = [*files.items(), *(symlinks or {}).items()]
    for name, item in sorted(items, key=lambda kv: kv[0].split("/")):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in have:
                have.add(parent)
                entries.append(cpio.directory(parent))
        clean = "/".join(parts)
        have.add(clean)
        if isinstance(item, str):
            entries.append(cpio.symlink(clean, item))
        elif isinstance(item, bytes):
            entries.append(cpio.regular(clean, item, 0o755 if item[:2] == b"#!" else 0o644))
        else:
            entries.append(cpio.regular(clean, item.read_bytes(), item.stat().st_mode & 0o7777))
    return cpio.write_newc(entries)


def _key(kernel: Kernel, busybox: Path, modules: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"kernel {kernel.version}\n".encode())
    h.update(INIT.read_bytes())
    h.update(Path(__file__).read_bytes())  # how the archive is laid out
    for path in [busybox, *modules]:
        st = path.stat()
        h.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def busybox_initramfs(
    init: bytes, modules: Sequence[Path], extra: Mapping[str, Path | bytes] | None = None
) -> bytes:
    """A newc archive of a busybox system: /init, a static /bin/busybox, the modules.

    The modules go to /modules with /modules/order listing them in load order (as
    Kernel.load_order gave them), which both the lab's init and the tests' L2 init
    read. extra adds files (archive name -> host file or contents).
    """
    files: dict[str, Path | bytes] = {"init": init, "bin/busybox": busybox_path()}
    files |= {f"modules/{m.name}": m for m in modules}
    files["modules/order"] = "".join(f"{m.name}\n" for m in modules).encode()
    files |= extra or {}
    return pack(files)


def l1_initramfs(kernel: Kernel, cache: Path) -> Path:
    """The cached L1 initramfs for kernel (built now if its inputs changed)."""
    busybox = busybox_path()
    modules = kernel.load_order(L1_MODULES)
    out = cache / f"initramfs-{kernel.version}-{_key(kernel, busybox, modules)}.cpio"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(busybox_initramfs(INIT.read_bytes(), modules))
    os.replace(tmp, out)  # atomic: a concurrent lab run sees the whole file or none
    for old in cache.glob("initramfs-*.cpio"):
        if time.time() - old.stat().st_mtime > KEEP_OLD_S:
            old.unlink(missing_ok=True)
    return out
