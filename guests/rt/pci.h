/*
 * PCI bus 0 for the bundled guests: configuration space through ECAM when the ACPI
 * tables have an MCFG (corevisor, QEMU q35), else through ports 0xCF8/0xCFC (QEMU -M pc);
 * `pci=cf8` on the command line forces the ports, `pci=off` hides the bus. Shared by the
 * virtio-pci drivers (virtio.c), the passthrough guest (edu.c) and the user-device
 * guest (pcisensor.c).
 */
#ifndef RT_PCI_H
#define RT_PCI_H

#include "rt.h"

#define PCI_CAP_MSI 0x05
#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX 0x11

/* Find the configuration mechanism; 0 if there is a bus, -1 if not (or pci=off). */
int pci_init(void);
int pci_uses_ports(void);                 /* 1: 0xCF8/0xCFC, 0: ECAM */
u32 pci_read32(u16 bdf, u32 off);
u8 pci_read8(u16 bdf, u32 off);
void pci_write16(u16 bdf, u32 off, u16 v);
void pci_write32(u16 bdf, u32 off, u32 v);
/* The address a memory BAR decodes (0 for an I/O BAR or one not assigned). */
u64 pci_bar_address(u16 bdf, u32 bar);
/* The first port of an I/O BAR (0 for a memory BAR or one not assigned). */
u16 pci_bar_port(u16 bdf, u32 bar);
/* The offset of the first capability cap_id of bdf, 0 if it has none. */
u32 pci_find_cap(u16 bdf, u8 cap_id);
/* The bdf (device << 3) of the nth function with vendor:device on bus 0, or -1. */
int pci_find(u16 vendor, u16 device, int nth);

#endif
