/* PCI bus 0 configuration space, by ECAM or 0xCF8 (see pci.h). */
#include "pci.h"

static u64 ecam_base;
static int use_ports;           /* 1: configuration mechanism #1 */
static int state;               /* 0: not looked yet, 1: found, -1: none */

u32 pci_read32(u16 bdf, u32 off)
{
    if (!use_ports)
        return mmio_read32(ecam_base + ((u64)bdf << 12) + (off & 0xFFC));
    outl(0xCF8, 0x80000000u | (u32)bdf << 8 | (off & 0xFC));
    return inl(0xCFC);
}

void pci_write16(u16 bdf, u32 off, u16 v)
{
    if (!use_ports) {
        *(volatile u16 *)(ecam_base + ((u64)bdf << 12) + (off & 0xFFE)) = v;
        return;
    }
    outl(0xCF8, 0x80000000u | (u32)bdf << 8 | (off & 0xFC));
    outw((u16)(0xCFC + (off & 2)), v);
}

u8 pci_read8(u16 bdf, u32 off) { return (u8)(pci_read32(bdf, off) >> (8 * (off & 3))); }

const char *pci_how(void) { return use_ports ? "0xCF8" : "ECAM"; }

int pci_init(void)
{
    if (state)
        return state > 0 ? 0 : -1;
    state = -1;
    char mode[8] = "";
    rt_cmdline_str("pci", mode, sizeof(mode));
    if (!memcmp(mode, "off", 4))
        return -1;
    const u8 *mcfg = memcmp(mode, "cf8", 4) ? rt_acpi_table("MCFG") : NULL;
    if (mcfg && *(const u32 *)(mcfg + 4) >= 44 + 16) {
        ecam_base = *(const u64 *)(mcfg + 44);  /* segment 0, starting at bus 0 */
        use_ports = 0;
    } else {
        use_ports = 1;
        if ((pci_read32(0, 0) & 0xFFFF) == 0xFFFF)
            return -1;                          /* no host bridge at 00:00.0 */
    }
    state = 1;
    return 0;
}

u64 pci_bar_address(u16 bdf, u32 bar)
{
    if (bar > 5)
        return 0;
    u32 lo = pci_read32(bdf, 0x10 + 4 * bar);
    if (lo & 1)
        return 0;
    u64 a = lo & ~0xFu;
    if (((lo >> 1) & 3) == 2 && bar < 5)
        a |= (u64)pci_read32(bdf, 0x14 + 4 * bar) << 32;
    return a;
}

u16 pci_bar_port(u16 bdf, u32 bar)
{
    if (bar > 5)
        return 0;
    u32 lo = pci_read32(bdf, 0x10 + 4 * bar);
    return (lo & 1) ? (u16)(lo & ~3u) : 0;
}

int pci_find(u16 vendor, u16 device)
{
    if (pci_init() < 0)
        return -1;
    for (u32 dev = 0; dev < 32; dev++) {
        u32 id = pci_read32((u16)(dev << 3), 0);
        if ((id & 0xFFFF) == vendor && id >> 16 == device)
            return (int)(dev << 3);
    }
    return -1;
}
