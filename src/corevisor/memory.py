"""Guest RAM: memfd-backed regions and the only bounds-checked way into them.

Every guest-physical access in corevisor goes through GuestMemory. An access that is
not wholly inside one RAM region raises GuestMemoryError, so a hostile guest cannot
steer a device model (or a loader, or the GDB stub) into host memory: this is the
software equivalent of an IOMMU. Regions are memfds so later work can share them
between partitions, snapshot them and migrate them without copying through Python.

For a live migration GuestMemory also records which pages the VMM itself writes
(track_writes / take_written): KVM's dirty log sees only what vCPUs write, not a virtio
device filling a buffer through this class. What does not live here: the KVM
memory-slot ioctls and the dirty log (kvm/ioctls.py, snapshot/migrate.py) and the guest
memory map policy (arch/x86_64/layout.py).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import TypeVar

from corevisor.errors import GuestMemoryError

_T = TypeVar("_T", bound=ctypes.Structure)
PAGE_SIZE = 4096


def _is_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def file_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Page-aligned [a, b) pieces of the file fd's [start, end) that SEEK_DATA calls data
    (start is page-aligned; all of it where the file system cannot tell)."""
    extents = []
    pos = start
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            a = data // PAGE_SIZE * PAGE_SIZE
            extents.append((max(a, start), min(-(-hole // PAGE_SIZE) * PAGE_SIZE, end)))
            pos = hole
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
            raise
        return [(start, end)]
    return extents


@dataclass
class MemoryRegion:
    """One contiguous run of guest-physical RAM backed by (part of) a memfd."""

    gpa: int
    size: int
    fd: int
    offset: int = 0
    readonly: bool = False
    mm: mmap.mmap = field(repr=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mm is None:
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, prot, offset=self.offset)

    @classmethod
    def shared(cls, gpa: int, size: int, memfd: int, readonly: bool = False) -> MemoryRegion:
        """A region mapping memory owned elsewhere (a channel) through a dup of its fd,
        which the region owns: on failure the dup is closed again."""
        fd = os.dup(memfd)
        try:
            return cls(gpa, size, fd=fd, readonly=readonly)
        except BaseException:
            os.close(fd)
            raise

    @property
    def end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the mapping, for KVM_SET_USER_MEMORY_REGION only."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))


class GuestMemory:
    """The RAM of one guest: a sorted list of non-overlapping regions."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.end > b.gpa:
                raise GuestMemoryError(
                    f"memory regions overlap: {a.gpa:#x}-{a.end:#x} and {b.gpa:#x}-{b.end:#x}"
                )
        self._written: set[int] | None = None  # pages the VMM wrote (page numbers)
        self._written_lock = threading.Lock()
        self._index()

    def _index(self) -> None:
        """Flatten the regions for lookups: every device access (a virtio request makes
        dozens) pays for this loop, so it touches only tuples of plain values."""
        self._spans = tuple((r.gpa, r.end, r.mm, r.readonly, r) for r in self.regions)

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]], name: str = "guest-ram") -> GuestMemory:
        """Create fresh zeroed RAM for the (gpa, size) runs in layout, in one memfd."""
        total = sum(size for _, size in layout)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        regions: list[MemoryRegion] = []
        try:
            os.ftruncate(fd, total)
            offset = 0
            for gpa, size in layout:
                regions.append(MemoryRegion(gpa=gpa, size=size, fd=fd, offset=offset))
                offset += size
            return cls(regions)
        except BaseException:
            for r in regions:
                r.mm.close()
            os.close(fd)
            raise

    def add_region(self, region: MemoryRegion) -> None:
        """Add a region after creation (a channel's shared memory); overlaps are refused.

        The memory owns the region from this call on, even when it refuses it (the
        region is closed then), so a caller never holds a region nobody closes.
        """
        for r in self.regions:
            if region.gpa < r.end and r.gpa < region.end:
                region.mm.close()
                os.close(region.fd)
                raise GuestMemoryError(
                    f"memory regions overlap: {r.gpa:#x}-{r.end:#x} and "
                    f"{region.gpa:#x}-{region.end:#x}"
                )
        self.regions = sorted([*self.regions, region], key=lambda r: r.gpa)
        self._index()

    @property
    def size(self) -> int:
        """Total bytes of RAM over all regions."""
        return sum(r.size for r in self.regions)

    def _locate(self, gpa: int, size: int) -> tuple[mmap.mmap, int, bool, MemoryRegion]:
        """(mapping, offset, readonly, region) wholly holding [gpa, gpa+size), or raise."""
        if gpa < 0 or size < 0:
            raise GuestMemoryError(f"invalid guest access {gpa:#x}+{size:#x}")
        end = gpa + size
        for start, stop, mm, readonly, region in self._spans:
            if start <= gpa and end <= stop:
                return mm, gpa - start, readonly, region
        raise GuestMemoryError(f"guest access {gpa:#x}+{size:#x} is outside guest RAM")

    def _find(self, gpa: int, size: int) -> tuple[MemoryRegion, int]:
        """Return the region wholly holding [gpa, gpa+size) and the offset into it."""
        _, off, _, region = self._locate(gpa, size)
        return region, off

    def contains(self, gpa: int, size: int = 1) -> bool:
        """True if [gpa, gpa+size) lies wholly inside one RAM region."""
        try:
            self._find(gpa, size)
        except GuestMemoryError:
            return False
        return True

    def writable(self, gpa: int, size: int = 1) -> bool:
        """True if [gpa, gpa+size) lies wholly inside one RAM region the guest may write."""
        try:
            self._find_writable(gpa, size)
        except GuestMemoryError:
            return False
        return True

    def read(self, gpa: int, size: int) -> bytes:
        """Copy size bytes out of guest RAM."""
        mm, off, _, _ = self._locate(gpa, size)
        return mm[off : off + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy data into guest RAM (never into a region the guest maps read-only)."""
        size = len(data)
        mm, off, readonly, _ = self._locate(gpa, size)
        if readonly:
            raise GuestMemoryError(f"guest access {gpa:#x}+{size:#x} writes read-only memory")
        mm[off : off + size] = data
        if self._written is not None:
            self._mark(gpa, size)

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set size bytes of guest RAM to one value (zeroing a .bss, for instance)."""
        r, off = self._find_writable(gpa, size)
        r.mm[off : off + size] = bytes([byte]) * size
        if self._written is not None:
            self._mark(gpa, size)

    # --- for migrations: the pages the VMM writes ---------------------------------------
    def track_writes(self, on: bool = True) -> None:
        """Start (or stop) recording the pages this class writes (write, fill, discard)."""
        with self._written_lock:
            self._written = set() if on else None

    def take_written(self) -> set[int]:
        """The page numbers (gpa // PAGE_SIZE) written since tracking began or since the
        last call; none is lost to a write racing this call."""
        with self._written_lock:
            taken = self._written or set()
            self._written = set() if self._written is not None else None
        return taken

    def _mark(self, gpa: int, size: int) -> None:
        with self._written_lock:
            written = self._written  # read again under the lock: take_written swaps it
            if written is not None and size:
                written.update(range(gpa // PAGE_SIZE, (gpa + size - 1) // PAGE_SIZE + 1))

    def span(self, gpa: int, size: int, writable: bool = False) -> memoryview:
        """[gpa, gpa+size) of one region as a memoryview, bounds-checked like read and
        write: a migration sends pages from it and receives them into it without a copy.
        A writable span bypasses track_writes (only a migration's target uses one)."""
        mm, off, readonly, _ = self._locate(gpa, size)
        if writable and readonly:
            raise GuestMemoryError(f"guest access {gpa:#x}+{size:#x} writes read-only memory")
        view = memoryview(mm)[off : off + size]
        return view if writable else view.toreadonly()

    # --- for snapshots: where the data is, and dropping it -------------------------------
    def data_extents(self, gpa: int, size: int) -> list[tuple[int, int]]:
        """Page-aligned (gpa, size) pieces of [gpa, gpa+size) that may hold non-zero data.

        A memfd mapped shared (fresh RAM) has holes exactly where nothing was ever
        written, so SEEK_DATA/SEEK_HOLE skip those pages without reading them. Any other
        backing (a snapshot file mapped copy-on-write differs from its file) answers the
        whole range.
        """
        r, off = self._find(gpa, size)
        start = r.offset + off
        if not _is_memfd(r.fd):
            return [(gpa, size)]
        return [(gpa + a - start, b - a) for a, b in file_extents(r.fd, start, start + size)]

    def discard(self, gpa: int, size: int) -> None:
        """Make whole pages [gpa, gpa+size) read as zero again and give them back to the
        host (MADV_REMOVE on memfd RAM; written zeros elsewhere)."""
        r, off = self._find_writable(gpa, size)
        if gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise GuestMemoryError(f"discard {gpa:#x}+{size:#x} is not whole pages")
        if _is_memfd(r.fd) and (r.offset + off) % mmap.PAGESIZE == 0:
            r.mm.madvise(mmap.MADV_REMOVE, off, size)
        else:
            r.mm[off : off + size] = bytes(size)
        if self._written is not None:
            self._mark(gpa, size)

    def _find_writable(self, gpa: int, size: int) -> tuple[MemoryRegion, int]:
        """_find, refusing read-only regions: what the guest may not write, a device acting
        for the guest may not either (the reader side of a one-way channel)."""
        r, off = self._find(gpa, size)
        if r.readonly:
            raise GuestMemoryError(f"guest access {gpa:#x}+{size:#x} writes read-only memory")
        return r, off

    def read_obj(self, gpa: int, cls: type[_T]) -> _T:
        """Read a ctypes structure from guest RAM (a copy, not a view)."""
        return cls.from_buffer_copy(self.read(gpa, ctypes.sizeof(cls)))

    def write_obj(self, gpa: int, obj: ctypes.Structure) -> None:
        """Write a ctypes structure into guest RAM."""
        self.write(gpa, bytes(obj))

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def close(self) -> None:
        """Unmap every region and close the backing fds; a second call does nothing."""
        regions, self.regions = self.regions, []
        self._index()
        fds = {r.fd for r in regions}
        for r in regions:
            r.mm.close()
        for fd in fds:
            os.close(fd)
