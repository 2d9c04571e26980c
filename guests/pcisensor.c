/* pcisensor: a driver for the example PCI user device (examples/pcisensor.py, 1234:5e50):
 * finds it on PCI bus 0 by its IDs (ECAM, or 0xCF8 with pci=cf8), reads where its BARs
 * were placed, reads the temperature through both (BAR0 memory, BAR1 ports), sets an
 * alarm threshold `rise` degrees above it, takes the alarm interrupt `count` times
 * (irq=intx: the INTx line INTERRUPT_LINE names, level-triggered active low as ACPI
 * says; irq=msi: its MSI capability, one vector), then prints what it saw. */
#include "rt/pci.h"

#define VENDOR 0x1234
#define DEVICE 0x5E50
#define TEMP 0x0
#define THRESHOLD 0x4
#define STATUS 0x8
#define CONTROL 0xC
#define PCI_COMMAND 0x04
#define PCI_STATUS_INTERRUPT (1u << 19)     /* in the dword at 0x04 */
#define SENSOR_VECTOR 0x26
#define MAX_ALARMS 16

static u64 regs;
static u16 bdf;
static u8 rise;
static volatile int alarms;
static volatile u32 alarm_temp[MAX_ALARMS];
static volatile u32 status_seen;    /* PCI STATUS's interrupt bit in the handler (INTx) */
static volatile int spurious;

/* Level-triggered INTx: quiet the device before the EOI. An interrupt with no alarm set
 * is spurious, as a driver of a shared line must expect; so is one from a device that
 * reads all ones (failed or unplugged). */
static void sensor_irq(struct trap_frame *tf)
{
    (void)tf;
    u32 st = mmio_read32(regs + STATUS);
    if (st == 0xFFFFFFFFu || !(st & 1)) {       /* all ones: the device is gone */
        spurious++;
        lapic_eoi();
        return;
    }
    u32 t = mmio_read32(regs + TEMP);
    if (pci_read32(bdf, PCI_COMMAND) & PCI_STATUS_INTERRUPT)
        status_seen++;
    if (alarms < MAX_ALARMS)
        alarm_temp[alarms] = t;
    alarms++;
    mmio_write32(regs + THRESHOLD, t + rise);
    mmio_write32(regs + STATUS, 1);
    lapic_eoi();
}

/* Program MSI: this LAPIC, the vector, fixed delivery, edge; 64-bit capability. */
static int enable_msi(u16 bdf, u8 apic)
{
    u32 cap = pci_find_cap(bdf, PCI_CAP_MSI);
    if (!cap)
        return -1;
    u16 ctrl = (u16)(pci_read32(bdf, cap) >> 16);
    pci_write16(bdf, cap + 4, (u16)(0xFEE00000u | (u32)apic << 12));
    pci_write16(bdf, cap + 6, 0xFEE0);
    pci_write16(bdf, cap + 8, 0);
    pci_write16(bdf, cap + 10, 0);
    pci_write16(bdf, cap + 12, SENSOR_VECTOR);
    pci_write16(bdf, cap + 2, (u16)((ctrl & ~0x70u) | 1));      /* one vector, enabled */
    return 0;
}

int main(void)
{
    rise = (u8)rt_cmdline_uint("rise", 3);
    int count = (int)rt_cmdline_uint("count", 3);
    u32 timeout_ms = (u32)rt_cmdline_uint("timeout", 3000);
    char mode[8] = "intx";
    rt_cmdline_str("irq", mode, sizeof(mode));
    int msi = !memcmp(mode, "msi", 4);
    if (count > MAX_ALARMS)
        count = MAX_ALARMS;

    lapic_enable();
    (void)rt_tsc_khz();                                     /* calibrates the LAPIC timer */
    int found = pci_find(VENDOR, DEVICE, 0);
    if (found < 0) {
        printf("pcisensor: no %04x:%04x on PCI bus 0\n", VENDOR, DEVICE);
        return 2;
    }
    bdf = (u16)found;
    printf("pcisensor: %04x:%04x at 00:%02x.%x (%s), class %06x\n", VENDOR, DEVICE,
           bdf >> 3, bdf & 7, pci_uses_ports() ? "0xCF8" : "ECAM", pci_read32(bdf, 0x08) >> 8);
    regs = pci_bar_address(bdf, 0);
    u16 port = pci_bar_port(bdf, 1);
    printf("pcisensor: BAR0 memory at 0x%lx, BAR1 ports at 0x%x\n", regs, port);
    if (!regs || !port)
        return 2;
    pci_write16(bdf, PCI_COMMAND, (u16)(pci_read32(bdf, PCI_COMMAND) | 0x3));  /* io, mem */
    u32 t = mmio_read32(regs + TEMP);
    printf("pcisensor: temperature %u C (BAR1: %u C)\n", t, inb(port));

    u8 apic = (u8)lapic_id();
    rt_set_handler(SENSOR_VECTOR, sensor_irq);
    if (msi) {
        if (enable_msi(bdf, apic) < 0) {
            printf("pcisensor: no MSI capability\n");
            return 2;
        }
        printf("pcisensor: MSI vector 0x%x\n", SENSOR_VECTOR);
    } else {
        u8 line = pci_read8(bdf, 0x3C);
        ioapic_route_level(line, SENSOR_VECTOR, apic);
        printf("pcisensor: INTx pin %u line %u\n", pci_read8(bdf, 0x3D), line);
    }
    outb(port + 1, (u8)(t + rise));                         /* threshold, through BAR1 */
    mmio_write32(regs + CONTROL, 1);
    printf("pcisensor: alarm at %u C, interrupt on\n", mmio_read32(regs + THRESHOLD));

    int seen = 0;
    while (seen < count) {
        if (!rt_wait_count(&alarms, seen, timeout_ms)) {
            printf("pcisensor: no alarm within %u ms\n", timeout_ms);
            break;
        }
        for (; seen < alarms && seen < count; seen++)
            printf("pcisensor: alarm %d at %u C\n", seen + 1, alarm_temp[seen]);
    }
    mmio_write32(regs + CONTROL, 0);
    printf("pcisensor: done, %d alarms, now %u C\n", seen, mmio_read32(regs + TEMP));
    if (spurious)
        printf("pcisensor: %d spurious interrupts\n", spurious);
    if (mmio_read32(regs + STATUS) == 0xFFFFFFFFu)
        printf("pcisensor: the device is gone (it reads all ones)\n");
    if (!msi)
        printf("pcisensor: STATUS interrupt bit set in %u of %d handlers\n", status_seen, seen);
    return seen == count ? 0 : 1;
}
