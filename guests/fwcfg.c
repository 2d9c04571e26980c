/* fwcfg: reads QEMU's fw_cfg the traditional way (port 0x511, byte by byte) and by DMA
 * (0x514/0x518), prints the CPU count, RAM size and the etc/e820 file, checks that a DMA
 * aimed outside RAM reports an error; then measures the ACPI PM timer (its port from the
 * FADT's PM_TMR_BLK) against the TSC rate the hypervisor publishes in CPUID 0x40000010.
 * Exits 0 when both ways agree and every check holds, 1 otherwise. */
#include "rt/rt.h"

#define FW_CFG_CTL 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_DMA_HI 0x514
#define FW_CFG_DMA_LO 0x518
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_ID 0x01
#define FW_CFG_RAM_SIZE 0x03
#define FW_CFG_NB_CPUS 0x05
#define FW_CFG_MAX_CPUS 0x0F
#define FW_CFG_FILE_DIR 0x19
#define DMA_ERROR 0x01
#define DMA_READ 0x02
#define DMA_SELECT 0x08

struct fw_cfg_dma {
    u32 control, length;
    u64 address;
} __attribute__((packed));

struct fw_cfg_file {
    u32 size;
    u16 select, reserved;
    char name[56];
} __attribute__((packed));

struct e820 {
    u64 addr, size;
    u32 type;
} __attribute__((packed));

static volatile struct fw_cfg_dma dma __attribute__((aligned(16)));
static struct fw_cfg_file files[64];
static struct e820 map_io[32], map_dma[32];
static int failed;

static void check(int ok, const char *what)
{
    if (!ok) {
        printf("fwcfg: FAILED: %s\n", what);
        failed = 1;
    }
}

static void read_io(u16 key, void *buf, u32 n)
{
    outw(FW_CFG_CTL, key);
    for (u32 i = 0; i < n; i++)
        ((u8 *)buf)[i] = inb(FW_CFG_DATA);
}

/* One DMA read of n bytes of item key to gpa; returns the final control word. */
static u32 dma_to(u16 key, u64 gpa, u32 n)
{
    dma.control = __builtin_bswap32((u32)key << 16 | DMA_SELECT | DMA_READ);
    dma.length = __builtin_bswap32(n);
    dma.address = __builtin_bswap64(gpa);
    barrier();
    u64 desc = (u64)&dma;
    outl(FW_CFG_DMA_HI, __builtin_bswap32((u32)(desc >> 32)));
    outl(FW_CFG_DMA_LO, __builtin_bswap32((u32)desc));  /* runs the transfer */
    barrier();
    return __builtin_bswap32(dma.control);
}

static u32 read_dma(u16 key, void *buf, u32 n)
{
    return dma_to(key, (u64)buf, n);
}

static const char *e820_kind(u32 type)
{
    return type == 1 ? "usable" : type == 2 ? "reserved" : "other";
}

/* The etc/e820 file, both ways; returns its entry count (0 if it is missing). */
static u32 read_e820(void)
{
    u32 count;
    read_io(FW_CFG_FILE_DIR, &count, 4);
    count = __builtin_bswap32(count);
    check(count > 0 && count <= 64, "file directory count");
    if (count == 0 || count > 64)
        return 0;
    u8 dir[4 + sizeof(files)];
    check(read_dma(FW_CFG_FILE_DIR, dir, 4 + count * sizeof(files[0])) == 0, "dma of the directory");
    memcpy(files, dir + 4, count * sizeof(files[0]));
    for (u32 i = 0; i < count; i++) {
        if (memcmp(files[i].name, "etc/e820", 9) != 0)
            continue;
        u32 size = __builtin_bswap32(files[i].size);
        u16 key = __builtin_bswap16(files[i].select);
        u32 n = size / sizeof(struct e820);
        check(size % sizeof(struct e820) == 0 && n > 0 && n <= 32, "etc/e820 size");
        if (n == 0 || n > 32)
            return 0;
        read_io(key, map_io, size);
        check(read_dma(key, map_dma, size) == 0, "dma of etc/e820");
        check(memcmp(map_io, map_dma, size) == 0, "etc/e820 io and dma agree");
        printf("fwcfg: file etc/e820 key 0x%x, %u entries\n", key, n);
        for (u32 j = 0; j < n; j++)
            printf("fwcfg: e820 0x%lx-0x%lx %s\n", map_dma[j].addr,
                   map_dma[j].addr + map_dma[j].size - 1, e820_kind(map_dma[j].type));
        return n;
    }
    check(0, "etc/e820 in the file directory");
    return 0;
}

static void pm_timer(void)
{
    u32 a, b, c, d;
    u64 tsc_khz;
    const char *source = "cpuid 0x40000010";
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a >= 0x40000010) {
        cpuid(0x40000010, 0, &a, &b, &c, &d);
        tsc_khz = a;
    } else {                    /* e.g. QEMU without vmware-cpuid-freq */
        tsc_khz = rt_tsc_khz();
        source = "PIT calibration";
    }
    const u8 *fadt = rt_acpi_table("FACP");
    u16 port = fadt ? (u16)*(const u32 *)(fadt + 76) : 0;  /* PM_TMR_BLK */
    printf("pmtimer: FADT PM_TMR_BLK 0x%x\n", port);
    check(port != 0 && tsc_khz != 0, "a PM timer in the FADT and a TSC rate");
    if (!port || !tsc_khz)
        return;
    u64 t0 = rdtsc();
    u32 p0 = inl(port);
    while (rdtsc() - t0 < tsc_khz * 200)  /* 200 ms by the TSC */
        cpu_relax();
    u32 p1 = inl(port);
    u64 t1 = rdtsc();
    u64 ticks = (u32)(p1 - p0);
    u64 us = (t1 - t0) * 1000 / tsc_khz;
    u64 hz = us ? ticks * 1000000 / us : 0;
    printf("pmtimer: %lu Hz (%lu ticks in %lu us; tsc %lu kHz from %s)\n", hz, ticks, us,
           tsc_khz, source);
}

int main(void)
{
    char sig[5] = {0};
    u32 id = 0;
    read_io(FW_CFG_SIGNATURE, sig, 4);
    read_io(FW_CFG_ID, &id, 4);
    u32 dma_sig[3] = {inl(FW_CFG_DMA_HI), inl(FW_CFG_DMA_LO), 0};
    printf("fwcfg: signature \"%s\" id 0x%x dma register \"%s\"\n", sig, id,
           (const char *)dma_sig);
    check(memcmp(sig, "QEMU", 4) == 0, "signature");
    check((id & 3) == 3, "traditional and DMA interfaces");

    u16 cpus_io = 0, cpus_dma = 0, max_cpus = 0;
    u64 ram_io = 0, ram_dma = 0;
    read_io(FW_CFG_NB_CPUS, &cpus_io, 2);
    read_io(FW_CFG_MAX_CPUS, &max_cpus, 2);
    read_io(FW_CFG_RAM_SIZE, &ram_io, 8);
    check(read_dma(FW_CFG_NB_CPUS, &cpus_dma, 2) == 0, "dma of NB_CPUS");
    check(read_dma(FW_CFG_RAM_SIZE, &ram_dma, 8) == 0, "dma of RAM_SIZE");
    printf("fwcfg: cpus=%u (io) cpus=%u (dma) max_cpus=%u\n", cpus_io, cpus_dma, max_cpus);
    printf("fwcfg: ram=%lu bytes (io) ram=%lu bytes (dma) = %lu MiB\n", ram_io, ram_dma,
           ram_dma >> 20);
    check(cpus_io == cpus_dma && ram_io == ram_dma, "io and dma agree");
    read_e820();

    /* A hostile request: a buffer far outside RAM. The device must refuse it. */
    u32 status = dma_to(FW_CFG_SIGNATURE, 0x7F00000000UL, 4);
    printf("fwcfg: dma outside RAM: control 0x%x (%s)\n", status,
           status & DMA_ERROR ? "error bit set" : "no error");
    check(status & DMA_ERROR, "error bit on a dma outside RAM");

    pm_timer();
    printf("fwcfg: %s\n", failed ? "FAILED" : "ok");
    return failed;
}
