/*
 * edu: drives QEMU's "edu" PCI device (1234:11e8, docs/specs/edu.rst) passed through
 * to the guest (corevisor run --vfio): its registers in BAR0, its DMA engine, its
 * interrupts by INTx and by MSI, and a DMA the IOMMU must stop.
 *
 *   1. finds the device on bus 0, turns on memory decoding and bus mastering, checks its
 *      ID register and its liveness register (which answers the complement);
 *   2. DMA into its own RAM: a message from RAM into the device's buffer (0x40000), then
 *      from the buffer into a zeroed buffer elsewhere in RAM, and prints what arrived;
 *   3. INTx: routes the line firmware would have (INTERRUPT_LINE) at the IOAPIC, level,
 *      raises the device's interrupt through its 0x60 register, acks it in the handler;
 *   4. MSI: programs the capability (this CPU's LAPIC, one vector) and takes the
 *      interrupt the device raises when a DMA completes;
 *   5. DMA to an address outside its RAM (`outside=`, default 192 MiB, below edu's 28-bit
 *      DMA mask): the transfer "completes" on the device's side, the IOMMU drops it, and
 *      the guest's RAM after the image is checksummed before and after: unchanged.
 *
 * Output: "edu: ..." lines, "edu: ok" last; exit 0, or 1 after "edu: FAILED: <what>".
 */
#include "rt/pci.h"

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define R_ID 0x00
#define R_LIVE 0x04
#define R_IRQ_STATUS 0x24
#define R_IRQ_RAISE 0x60
#define R_IRQ_ACK 0x64
#define R_DMA_SRC 0x80
#define R_DMA_DST 0x88
#define R_DMA_CNT 0x90
#define R_DMA_CMD 0x98
#define DMA_RUN 0x1
#define DMA_TO_RAM 0x2
#define DMA_IRQ 0x4
#define EDU_BUF 0x40000
#define INTX_VECTOR 0x40
#define MSI_VECTOR 0x41

extern char __image_end[];     /* the linker script: the end of the image, stacks included */
static u64 bar0;
static volatile u32 intx_count, msi_count, last_status;
static char src[64] = "hello from guest RAM, through edu's DMA and back";
static char dst[64];

static u32 rd(u32 reg) { return mmio_read32(bar0 + reg); }
static void wr(u32 reg, u32 v) { mmio_write32(bar0 + reg, v); }
static void wr64(u32 reg, u64 v) { *(volatile u64 *)(bar0 + reg) = v; }

static void fail(const char *what)
{
    printf("edu: FAILED: %s\n", what);
    rt_exit(1);
}

/* Wait (at most ~5 s) for *flag to reach n, or for the DMA engine to go idle (flag NULL). */
static int wait_for(volatile u32 *flag, u32 n)
{
    for (int i = 0; i < 50000; i++) {
        if (flag ? *flag >= n : !(rd(R_DMA_CMD) & DMA_RUN))
            return 0;
        rt_delay_us(100);
    }
    return -1;
}

static void dma(u64 from, u64 to, u32 len, u32 cmd)
{
    *(volatile u64 *)(bar0 + R_DMA_SRC) = from;
    wr64(R_DMA_DST, to);
    wr64(R_DMA_CNT, len);
    wr64(R_DMA_CMD, DMA_RUN | cmd);
    if (wait_for(NULL, 0))
        fail("the DMA did not complete in 5 s");
}

static void ack(void)
{
    last_status = rd(R_IRQ_STATUS);
    wr(R_IRQ_ACK, last_status);
}

static void intx_irq(struct trap_frame *tf)
{
    (void)tf;
    ack();
    intx_count++;
    lapic_eoi();
}

static void msi_irq(struct trap_frame *tf)
{
    (void)tf;
    ack();
    msi_count++;
    lapic_eoi();
}

/* FNV-1a over [start, end): the RAM the guest does not use after its image. */
static u32 checksum(u64 start, u64 end)
{
    u32 h = 2166136261u;
    for (u64 *p = (u64 *)start; (u64)p < end; p++) {
        u64 v = *p;
        h = (h ^ (u32)v) * 16777619u;
        h = (h ^ (u32)(v >> 32)) * 16777619u;
    }
    return h;
}

int main(void)
{
    int bdf = pci_find(EDU_VENDOR, EDU_DEVICE, 0);
    if (bdf < 0)
        fail("no edu device (1234:11e8) on PCI bus 0");
    u16 fn = (u16)bdf;
    pci_write16(fn, 0x04, (u16)(pci_read32(fn, 0x04) | 0x6));      /* memory, bus master */
    bar0 = pci_bar_address(fn, 0);
    if (!bar0)
        fail("BAR0 is not assigned");
    u32 id = rd(R_ID);
    wr(R_LIVE, 0x12345678);
    u32 live = rd(R_LIVE);
    u8 line = pci_read8(fn, 0x3C);
    printf("edu: 00:%02x.0 id 0x%x bar0 0x%lx line %u live %s\n", bdf >> 3, id, bar0, line,
           live == ~0x12345678u ? "ok" : "wrong");
    if ((id & 0xFF) != 0xED || live != ~0x12345678u)
        fail("not an edu device (ID or liveness register)");

    /* 2. DMA into the guest's own RAM, through the device's buffer */
    u32 len = (u32)strlen(src) + 1;
    memset(dst, 0, sizeof(dst));
    dma((u64)src, EDU_BUF, len, 0);
    dma(EDU_BUF, (u64)dst, len, DMA_TO_RAM);
    printf("edu: dma into RAM at 0x%lx: \"%s\"\n", (u64)dst, dst);
    if (memcmp(src, dst, len))
        fail("the DMA did not bring the message back");

    /* 3. INTx, level-triggered at the IOAPIC pin INTERRUPT_LINE names */
    u32 apic = lapic_id();
    lapic_enable();
    rt_set_handler(INTX_VECTOR, intx_irq);
    rt_set_handler(MSI_VECTOR, msi_irq);
    sti();
    if (line < 24) {
        ioapic_route_level(line, INTX_VECTOR, (u8)apic);
        wr(R_IRQ_RAISE, 0x1);
        if (wait_for(&intx_count, 1))
            fail("no INTx interrupt in 5 s");
        printf("edu: intx on line %u: status 0x%x\n", line, last_status);
    }

    /* 4. MSI: the interrupt the device raises when a DMA completes */
    u32 cap = pci_find_cap(fn, PCI_CAP_MSI);
    if (!cap)
        fail("no MSI capability");
    u16 ctrl = (u16)(pci_read32(fn, cap) >> 16);
    pci_write32(fn, cap + 4, 0xFEE00000u | apic << 12);
    u32 data_at = cap + ((ctrl & 0x80) ? 12 : 8);
    if (ctrl & 0x80)
        pci_write32(fn, cap + 8, 0);
    pci_write16(fn, data_at, MSI_VECTOR);
    pci_write16(fn, cap + 2, (u16)((ctrl & ~0x70) | 0x1));              /* one vector, on */
    pci_write16(fn, 0x04, (u16)(pci_read32(fn, 0x04) | 0x400));          /* INTx off */
    dma(EDU_BUF, (u64)dst, len, DMA_TO_RAM | DMA_IRQ);
    if (wait_for(&msi_count, 1))
        fail("no MSI in 5 s");
    printf("edu: msi vector 0x%x: status 0x%x\n", MSI_VECTOR, last_status);

    /* 5. DMA outside the guest's RAM: the IOMMU has no mapping there */
    u64 outside = rt_cmdline_uint("outside", 0xC000000);
    u64 ram_end = rt_mem_kib() * 1024;
    if (outside < ram_end || outside >= (1UL << 28))
        fail("outside= must be above RAM and below 256 MiB (edu's DMA mask)");
    u64 free_ram = ((u64)__image_end + 0xFFF) & ~0xFFFUL;
    memset((void *)free_ram, 0x5A, ram_end - free_ram);
    u32 before = checksum(free_ram, ram_end);
    dma(EDU_BUF, outside, len, DMA_TO_RAM);
    u32 after = checksum(free_ram, ram_end);
    printf("edu: dma to 0x%lx (outside RAM): RAM 0x%lx-0x%lx %s (fnv 0x%x)\n", outside,
           free_ram, ram_end, before == after ? "unchanged" : "CHANGED", after);
    if (before != after)
        fail("guest RAM changed");
    printf("edu: ok\n");
    return 0;
}
