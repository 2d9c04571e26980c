"""VFIO passthrough: a host PCI device given to one partition, its DMA confined by the IOMMU.

The kernel's VFIO API (Documentation/driver-api/vfio.rst) in three fds: the container
(/dev/vfio/vfio, one per machine) holds an IOMMU domain; a group (/dev/vfio/N, the
device's IOMMU group, which must be *viable*: every device in it bound to vfio-pci or
to no driver) is added to the container; the device fd (VFIO_GROUP_GET_DEVICE_FD)
reads and writes the device's regions (BARs, configuration space) and wires its
interrupts to eventfds.

- host.py: the host-side checks, each one clear line (VfioError): a bad or absent
  device, no IOMMU group (the host has no IOMMU enabled), no /dev/vfio/vfio, a device
  bound to another driver, a group that is not viable;
- container.py: Container, Group, Device: one typed method per VFIO ioctl;
- function.py: VfioFunction, the device as a function on the machine's PCI bus
  (pci/): configuration space virtualised (BARs, the ROM BAR, INTERRUPT_LINE and the
  MSI capability emulated, the rest passed through), BARs mapped into the guest as KVM
  memory slots where VFIO lets them be mmapped (else trapped and forwarded with
  pread/pwrite), INTx and MSI through eventfds wired to KVM irqfds;
- attach.py: the builder's step — every RAM region mapped with VFIO_IOMMU_MAP_DMA at
  iova = guest-physical address, so the device reaches that guest's RAM and nothing
  else, then each device added to the bus.

What the IOMMU guarantees, and what it does not, is in docs/pc-platform.md
("Passthrough"). What does not live here: the ioctl numbers and structures
(kvm/bindings.py), the PCI bus, BAR placement and MSI routing (pci/).
"""
