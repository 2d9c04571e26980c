"""The VFIO fds: Container, Group and Device, one typed method per ioctl.

Every failing ioctl raises VfioError naming the request, the device and the errno; the
numbers and structures are kvm/bindings.py's (the VFIO section). The order is the
kernel's (Documentation/driver-api/vfio.rst): open the container and check its API
version and TYPE1v2; open the group, check it is viable, add it to the container;
only then choose the IOMMU model (VFIO_SET_IOMMU needs a group in the container), map
DMA, and ask the group for the device's fd.

What does not live here: the host checks before any of this (host.py), what the
device looks like to the guest (function.py).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corevisor.errors import VfioError
from corevisor.kvm import bindings as b

__all__ = ["Container", "Group", "Device", "RegionInfo", "IrqInfo", "CONTAINER_PATH"]

CONTAINER_PATH = Path("/dev/vfio/vfio")


def _ioctl(fd: int, request: int, arg: Any, name: str, who: str) -> int:
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as e:
        code = e.errno or 0
        raise VfioError(f"{who}: {name} failed: {_errno.errorcode.get(code, code)} "
                        f"({os.strerror(code)})") from None


def _open(path: Path, who: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        hint = " (another process holds it)" if e.errno == _errno.EBUSY else ""
        raise VfioError(f"{who}: cannot open {path}: {e.strerror}{hint}") from None


class Container:
    """/dev/vfio/vfio: one IOMMU domain, which every group of a machine joins."""

    def __init__(self, who: str, path: Path = CONTAINER_PATH) -> None:
        self.who = who
        self.fd = _open(path, who)
        try:
            version = _ioctl(self.fd, b.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION", who)
            if version != b.VFIO_API_VERSION:
                raise VfioError(f"{who}: VFIO API version {version}, corevisor speaks "
                                f"{b.VFIO_API_VERSION}")
            if not _ioctl(self.fd, b.VFIO_CHECK_EXTENSION, b.VFIO_TYPE1v2_IOMMU,
                          "VFIO_CHECK_EXTENSION", who):
                raise VfioError(f"{who}: this host's VFIO has no type-1 v2 IOMMU "
                                "(vfio_iommu_type1)")
        except BaseException:
            os.close(self.fd)
            raise
        self._iommu_set = False

    def set_iommu(self) -> None:
        """Choose the type-1 v2 IOMMU model (once, after the first group joined)."""
        if not self._iommu_set:
            _ioctl(self.fd, b.VFIO_SET_IOMMU, b.VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU", self.who)
            self._iommu_set = True

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        """Let the devices read and write [iova, iova+size) as the host memory at vaddr
        (pinned by the kernel while mapped)."""
        req = b.vfio_iommu_type1_dma_map(
            ctypes.sizeof(b.vfio_iommu_type1_dma_map),
            b.VFIO_DMA_MAP_FLAG_READ | b.VFIO_DMA_MAP_FLAG_WRITE, vaddr, iova, size)
        _ioctl(self.fd, b.VFIO_IOMMU_MAP_DMA, req, "VFIO_IOMMU_MAP_DMA", self.who)

    def close(self) -> None:
        os.close(self.fd)


class Group:
    """/dev/vfio/N: an IOMMU group, the unit the IOMMU isolates."""

    def __init__(self, path: Path, who: str) -> None:
        self.who = who
        self.path = path
        self.fd = _open(path, who)

    def viable(self) -> bool:
        status = b.vfio_group_status(ctypes.sizeof(b.vfio_group_status), 0)
        _ioctl(self.fd, b.VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS", self.who)
        return bool(status.flags & b.VFIO_GROUP_FLAGS_VIABLE)

    def set_container(self, container: Container) -> None:
        arg = ctypes.c_int32(container.fd)
        _ioctl(self.fd, b.VFIO_GROUP_SET_CONTAINER, arg, "VFIO_GROUP_SET_CONTAINER", self.who)

    def device(self, name: str) -> Device:
        """The fd of the group's device name ("0000:00:04.0")."""
        buf = ctypes.create_string_buffer(name.encode())
        fd = _ioctl(self.fd, b.VFIO_GROUP_GET_DEVICE_FD, buf, "VFIO_GROUP_GET_DEVICE_FD",
                    self.who)
        return Device(fd, self.who)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class RegionInfo:
    """One region of the device: where it is in the device fd, and what may be done."""

    index: int
    size: int
    offset: int
    flags: int

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & b.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    count: int
    flags: int


class Device:
    """A device's fd: its regions, its interrupts."""

    def __init__(self, fd: int, who: str) -> None:
        self.fd = fd
        self.who = who
        info = b.vfio_device_info(ctypes.sizeof(b.vfio_device_info))
        _ioctl(fd, b.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO", who)
        if not info.flags & b.VFIO_DEVICE_FLAGS_PCI:
            os.close(fd)
            raise VfioError(f"{who}: not a PCI device (VFIO_DEVICE_GET_INFO)")
        self.flags = info.flags
        self.num_regions = info.num_regions
        self.num_irqs = info.num_irqs

    def region(self, index: int) -> RegionInfo:
        info = b.vfio_region_info(ctypes.sizeof(b.vfio_region_info), 0, index)
        _ioctl(self.fd, b.VFIO_DEVICE_GET_REGION_INFO, info, "VFIO_DEVICE_GET_REGION_INFO",
               self.who)
        return RegionInfo(index, info.size, info.offset, info.flags)

    def irq(self, index: int) -> IrqInfo:
        info = b.vfio_irq_info(ctypes.sizeof(b.vfio_irq_info), 0, index)
        _ioctl(self.fd, b.VFIO_DEVICE_GET_IRQ_INFO, info, "VFIO_DEVICE_GET_IRQ_INFO", self.who)
        return IrqInfo(index, info.count, info.flags)

    def set_irqs(self, index: int, action: int, fds: Sequence[int], start: int = 0) -> None:
        """Give interrupts [start, start+len(fds)) of index the eventfds fds for action
        (trigger, or unmask for INTx's resample); no fds: turn index off (trigger)."""
        if not fds:
            header = b.vfio_irq_set(ctypes.sizeof(b.vfio_irq_set),
                                    b.VFIO_IRQ_SET_DATA_NONE | action, index, 0, 0)
            _ioctl(self.fd, b.VFIO_DEVICE_SET_IRQS, header, "VFIO_DEVICE_SET_IRQS", self.who)
            return
        kind = b.vfio_irq_set_eventfds(len(fds))
        req = kind()
        req.header = b.vfio_irq_set(ctypes.sizeof(kind), b.VFIO_IRQ_SET_DATA_EVENTFD | action,
                                    index, start, len(fds))
        for i, fd in enumerate(fds):
            req.fds[i] = fd
        _ioctl(self.fd, b.VFIO_DEVICE_SET_IRQS, req, "VFIO_DEVICE_SET_IRQS", self.who)

    def reset(self) -> None:
        if self.flags & b.VFIO_DEVICE_FLAGS_RESET:
            _ioctl(self.fd, b.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET", self.who)

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        os.close(self.fd)
