/*
 * PCI bus 0 for bare-metal guests: configuration space through ECAM when the ACPI tables
 * have an MCFG (corevisor, QEMU q35), else through ports 0xCF8/0xCFC (QEMU -M pc);
 * `pci=cf8` on the command line forces the ports, `pci=off` skips PCI. Used by the
 * virtio-pci drivers (virtio.c) and the user-device guest (pcisensor.c). A bdf is
 * bus << 8 | device << 3 | function.
 */
#ifndef PCI_H
#define PCI_H
#include "rt.h"

/* Find bus 0's configuration space: 0 if there is a host bridge, -1 otherwise (or off). */
int pci_init(void);
/* "ECAM" or "0xCF8": how pci_init reaches configuration space. */
const char *pci_how(void);
u32 pci_read32(u16 bdf, u32 off);
u8 pci_read8(u16 bdf, u32 off);
void pci_write16(u16 bdf, u32 off, u16 v);
/* The address a memory BAR decodes (0 for an I/O BAR or one not assigned). */
u64 pci_bar_address(u16 bdf, u32 bar);
/* The first port of an I/O BAR (0 for a memory BAR or one not assigned). */
u16 pci_bar_port(u16 bdf, u32 bar);
/* The first function on bus 0 with these IDs (its bdf), or -1. */
int pci_find(u16 vendor, u16 device);

#endif
