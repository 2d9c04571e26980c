/* PCI bus 0 configuration access for the bundled guests: see pci.h. */
#include "pci.h"

static u64 ecam_base;
static int ports;               /* 1: configuration mechanism #1 */
static int state = -2;          /* -2: not probed; then pci_init's answer */

int pci_init(void)
{
    if (state != -2)
        return state;
    char mode[8] = "";
    rt_cmdline_str("pci", mode, sizeof(mode));
    if (!memcmp(mode, "off", 4))
        return state = -1;
    const u8 *mcfg = memcmp(mode, "cf8", 4) ? rt_acpi_table("MCFG") : NULL;
    if (mcfg && *(const u32 *)(mcfg + 4) >= 44 + 16) {
        ecam_base = *(const u64 *)(mcfg + 44);  /* segment 0, starting at bus 0 */
        ports = 0;
        return state = 0;
    }
    ports = 1;
    return state = (pci_read32(0, 0) & 0xFFFF) == 0xFFFF ? -1 : 0;  /* a host bridge? */
}

int pci_uses_ports(void) { return ports; }

u32 pci_read32(u16 bdf, u32 off)
{
    if (!ports)
        return mmio_read32(ecam_base + ((u64)bdf << 12) + (off & 0xFFC));
    outl(0xCF8, 0x80000000u | (u32)bdf << 8 | (off & 0xFC));
    return inl(0xCFC);
}

void pci_write16(u16 bdf, u32 off, u16 v)
{
    if (!ports) {
        *(volatile u16 *)(ecam_base + ((u64)bdf << 12) + (off & 0xFFE)) = v;
        return;
    }
    outl(0xCF8, 0x80000000u | (u32)bdf << 8 | (off & 0xFC));
    outw((u16)(0xCFC + (off & 2)), v);
}

void pci_write32(u16 bdf, u32 off, u32 v)
{
    if (!ports) {
        mmio_write32(ecam_base + ((u64)bdf << 12) + (off & 0xFFC), v);
        return;
    }
    outl(0xCF8, 0x80000000u | (u32)bdf << 8 | (off & 0xFC));
    outl(0xCFC, v);
}

u8 pci_read8(u16 bdf, u32 off) { return (u8)(pci_read32(bdf, off) >> (8 * (off & 3))); }

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

u32 pci_find_cap(u16 bdf, u8 cap_id)
{
    u32 id_next;
    for (u32 cap = pci_read8(bdf, 0x34) & 0xFC, n = 0; cap && n < 48;
         cap = (id_next >> 8) & 0xFC, n++) {
        id_next = pci_read32(bdf, cap);
        if ((id_next & 0xFF) == cap_id)
            return cap;
    }
    return 0;
}

int pci_find(u16 vendor, u16 device, int nth)
{
    if (pci_init() < 0)
        return -1;
    for (u32 dev = 0; dev < 32; dev++) {
        u32 id = pci_read32((u16)(dev << 3), 0);
        if ((id & 0xFFFF) == vendor && id >> 16 == device && nth-- == 0)
            return (int)(dev << 3);
    }
    return -1;
}
