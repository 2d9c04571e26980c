/*
 * corevisor test-guest runtime: console, printf, exit, boot information (PVH and
 * multiboot), IDT/TSS, CPU discovery (MP table, ACPI MADT), PIT-based calibration,
 * local APIC, IOAPIC and AP start-up.
 *
 * All of this runs at CPL0, which the test host emulates (~3 M instructions/s), so
 * loops are kept short.
 */
#include "rt.h"

#define COM1 0x3F8
#define EXIT_PORT 0xF4
#define SPURIOUS_VECTOR 0xFF

/* From boot.S */
extern u32 boot_info;
extern u64 gdt_tss[2];
extern char isr_stubs[];
extern char ap_tramp_start[], ap_tramp_end[];
extern char ap_stacks[];
extern u64 ap_boot_stack;

/* Turn a physical address into a pointer the compiler cannot reason about (it would
 * otherwise warn about dereferencing small constant addresses). */
static inline void *phys(u64 addr)
{
    void *p = (void *)addr;
    __asm__("" : "+r"(p));
    return p;
}

/* ------------------------------------------------------------------------------------- */
/* libc subset                                                                           */

void *memset(void *d, int c, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return ret;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp <= sp || dp >= sp + n)
        return memcpy(d, s, n);
    while (n--)
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* ------------------------------------------------------------------------------------- */
/* console                                                                               */

static spinlock_t console_lock;

static void uart_init(void)
{
    outb(COM1 + 1, 0x00);   /* IER: no interrupts */
    outb(COM1 + 3, 0x80);   /* LCR: DLAB */
    outb(COM1 + 0, 0x01);   /* divisor 1: 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);   /* LCR: 8N1 */
    outb(COM1 + 2, 0x07);   /* FCR: FIFO on, clear */
    outb(COM1 + 4, 0x03);   /* MCR: DTR | RTS */
}

void uart_putc(char c)
{
    /* LSR bit 5 (THRE); bounded so a missing or stuck UART cannot hang us. */
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        cpu_relax();
    outb(COM1, (u8)c);
}

/* One formatter for every destination (COM1, a buffer): it hands each character to a
 * sink, so padding, widths and conversions exist once. */
typedef void (*sink_fn)(void *ctx, char c);

static void fmt_str(sink_fn put, void *ctx, const char *s, int width, int left)
{
    int n = (int)strlen(s);
    if (!left)
        for (; n < width; n++)
            put(ctx, ' ');
    while (*s)
        put(ctx, *s++);
    if (left)
        for (; n < width; n++)
            put(ctx, ' ');
}

static void fmt_num(sink_fn put, void *ctx, u64 v, unsigned base, int neg, int width, char pad,
                    int upper)
{
    char buf[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;
    do {
        buf[n++] = digits[v % base];
        v /= base;
    } while (v);
    int len = n + (neg ? 1 : 0);
    if (neg && pad == '0')
        put(ctx, '-');
    for (; len < width; len++)
        put(ctx, pad);
    if (neg && pad != '0')
        put(ctx, '-');
    while (n)
        put(ctx, buf[--n]);
}

static void vformat(sink_fn put, void *ctx, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(ctx, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int left = 0, width = 0, lng = 0;
        for (;; fmt++) {
            if (*fmt == '0')
                pad = '0';
            else if (*fmt == '-')
                left = 1;
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
            fmt_num(put, ctx, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad, 0);
            break;
        }
        case 'u':
            fmt_num(put, ctx, lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, 0, width, pad, 0);
            break;
        case 'x':
        case 'X':
            fmt_num(put, ctx, lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, 0, width, pad,
                    *fmt == 'X');
            break;
        case 'p':
            put(ctx, '0');
            put(ctx, 'x');
            fmt_num(put, ctx, (u64)va_arg(ap, void *), 16, 0, width, pad, 0);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            fmt_str(put, ctx, s ? s : "(null)", width, left);
            break;
        }
        case 'c':
            put(ctx, (char)va_arg(ap, int));
            break;
        case '%':
            put(ctx, '%');
            break;
        case 0:
            return;
        default:
            put(ctx, '%');
            put(ctx, *fmt);
            break;
        }
    }
}

static void uart_sink(void *ctx, char c)
{
    (void)ctx;
    uart_putc(c);
}

struct buf_sink {
    char *p;
    size_t n, len;
};

static void buf_sink(void *ctx, char c)
{
    struct buf_sink *b = ctx;
    if (b->len + 1 < b->n)
        b->p[b->len] = c;
    b->len++;
}

int rt_vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
    struct buf_sink b = {buf, n, 0};
    vformat(buf_sink, &b, fmt, ap);
    if (n)
        buf[b.len < n ? b.len : n - 1] = 0;
    return (int)b.len;
}

/* Serialised across CPUs. Do not call from an interrupt handler that may interrupt a
 * printf on the same CPU (it would deadlock). */
int vprintf(const char *fmt, va_list ap)
{
    spin_lock(&console_lock);
    vformat(uart_sink, 0, fmt, ap);
    spin_unlock(&console_lock);
    return 0;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    return 0;
}

void rt_exit(u32 status)
{
    outl(EXIT_PORT, status);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ------------------------------------------------------------------------------------- */
/* boot information                                                                      */

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;       /* version >= 1 */
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

struct multiboot_info {
    u32 flags;
    u32 mem_lower, mem_upper;
    u32 boot_device;
    u32 cmdline;
    u32 mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr;
};

struct multiboot_mmap {
    u32 size;
    u64 addr;
    u64 len;
    u32 type;
} __attribute__((packed));

static char cmdline_buf[1024];
static u64 mem_kib;
static u64 rsdp_paddr;

static void copy_cmdline(u64 addr)
{
    if (!addr)
        return;
    const char *s = phys(addr);
    size_t i;
    for (i = 0; i < sizeof(cmdline_buf) - 1 && s[i]; i++)
        cmdline_buf[i] = s[i];
    cmdline_buf[i] = 0;
}

static void parse_boot_info(void)
{
    if (boot_kind == 2) {
        const struct hvm_start_info *si = phys(boot_info);
        copy_cmdline(si->cmdline_paddr);
        rsdp_paddr = si->rsdp_paddr;
        if (si->version >= 1 && si->memmap_paddr) {
            const struct hvm_memmap_entry *e = phys(si->memmap_paddr);
            for (u32 i = 0; i < si->memmap_entries; i++)
                if (e[i].type == 1)
                    mem_kib += e[i].size / 1024;
        }
    } else if (boot_kind == 1) {
        const struct multiboot_info *mi = phys(boot_info);
        if (mi->flags & (1 << 2))
            copy_cmdline(mi->cmdline);
        if (mi->flags & (1 << 6)) {
            u64 p = mi->mmap_addr, end = p + mi->mmap_length;
            while (p < end) {
                const struct multiboot_mmap *e = phys(p);
                if (e->type == 1)
                    mem_kib += e->len / 1024;
                p += e->size + 4;
            }
        } else if (mi->flags & 1) {
            mem_kib = mi->mem_lower + mi->mem_upper;
        }
    }
}

const char *rt_cmdline(void) { return cmdline_buf; }
u64 rt_mem_kib(void) { return mem_kib; }
u64 rt_rsdp_paddr(void) { return rsdp_paddr; }

/* The value of key=value on the command line (up to the next space), or NULL. */
static const char *cmdline_value(const char *key)
{
    size_t klen = strlen(key);
    const char *s = cmdline_buf;
    while (*s) {
        while (*s == ' ')
            s++;
        if (!memcmp(s, key, klen) && s[klen] == '=')
            return s + klen + 1;
        while (*s && *s != ' ')
            s++;
    }
    return 0;
}

int rt_cmdline_str(const char *key, char *out, size_t n)
{
    const char *p = cmdline_value(key);
    if (!p)
        return 0;
    size_t i = 0;
    while (p[i] && p[i] != ' ' && i + 1 < n) {
        out[i] = p[i];
        i++;
    }
    if (n)
        out[i] = 0;
    return 1;
}

u64 rt_cmdline_uint(const char *key, u64 dflt)
{
    const char *p = cmdline_value(key);
    if (!p)
        return dflt;
    u64 v = 0;
    unsigned base = 10;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    const char *start = p;
    for (;; p++) {
        unsigned d;
        if (*p >= '0' && *p <= '9')
            d = *p - '0';
        else if (base == 16 && *p >= 'a' && *p <= 'f')
            d = *p - 'a' + 10;
        else if (base == 16 && *p >= 'A' && *p <= 'F')
            d = *p - 'A' + 10;
        else
            break;
        v = v * base + d;
    }
    return p != start ? v : dflt;
}

/* ------------------------------------------------------------------------------------- */
/* GDT/TSS/IDT                                                                           */

struct tss64 {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

/* The TSS, followed by an all-zero I/O permission bitmap (every port allowed) and its
 * 0xFF terminator. IOPL=3 already lets CPL3 use every port on hardware and most VMMs;
 * the bitmap is for hypervisors whose emulator loses IOPL in user mode but consults the
 * bitmap (PVM on the test host). */
struct {
    struct tss64 t;
    u8 iobitmap[8192 + 1];
} __attribute__((packed, aligned(16))) tss;     /* boot.S writes tss.t.rsp0 (offset 4) */

struct idt_entry {
    u16 off0;
    u16 sel;
    u8 ist;
    u8 type;
    u16 off1;
    u32 off2;
    u32 reserved;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
static trap_handler_t handlers[256];

static void setup_tss(void)
{
    u64 base = (u64)&tss;
    u64 limit = sizeof(tss) - 1;
    tss.t.iomap_base = sizeof(struct tss64);
    tss.iobitmap[8192] = 0xFF;
    gdt_tss[0] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89UL << 40) |
                 ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56;
    gdt_tss[1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(0x30));
}

static void setup_idt(void)
{
    for (int v = 0; v < 256; v++) {
        u64 a = (u64)isr_stubs + 16 * v;
        idt[v].off0 = a & 0xFFFF;
        idt[v].sel = 0x08;
        idt[v].ist = 0;
        idt[v].type = v == 0x80 ? 0xEE : 0x8E;  /* interrupt gates; 0x80 callable from CPL3 */
        idt[v].off1 = (a >> 16) & 0xFFFF;
        idt[v].off2 = a >> 32;
    }
}

void rt_load_idt(void)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) d = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(d));
}

void rt_set_handler(int vector, trap_handler_t h) { handlers[vector & 0xFF] = h; }

void rt_set_user_gate(int vector, trap_handler_t h)
{
    handlers[vector & 0xFF] = h;
    idt[vector & 0xFF].type = 0xEE;     /* DPL3: `int $vector` allowed from CPL3 */
}

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
    "#SS", "#GP", "#PF", "r15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void rt_trap(struct trap_frame *tf)
{
    trap_handler_t h = handlers[tf->vector & 0xFF];
    if (h) {
        h(tf);
        return;
    }
    if (tf->vector == SPURIOUS_VECTOR)
        return;
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    console_lock.v = 0;     /* we may have died while holding it */
    const char *name = tf->vector < 32 && exc_names[tf->vector] ? exc_names[tf->vector] : "irq";
    printf("rt: unexpected trap %lu (%s) err %lx rip %lx cs %lx rflags %lx rsp %lx cr2 %lx "
           "apic %u\n", tf->vector, name, tf->error, tf->rip, tf->cs, tf->rflags, tf->rsp, cr2,
           lapic_id());
    rt_exit(99);
}

/* ------------------------------------------------------------------------------------- */
/* time: TSC and LAPIC timer rates, calibrated against the PIT                         */

static u64 tsc_khz;
u32 rt_lapic_ticks_10ms;

void lapic_enable(void)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0x1B));
    if (!(lo & (1 << 11))) {
        lo |= 1 << 11;
        __asm__ volatile("wrmsr" : : "a"(lo), "d"(hi), "c"(0x1B));
    }
    lapic_write(0x080, 0);                          /* TPR: accept everything */
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software enable */
}

/* TSC frequency from CPUID (hypervisor timing leaf, or leaf 0x15), 0 if not given. */
static u64 tsc_khz_from_cpuid(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a >= 0x40000010 && a < 0x40010000) {
        cpuid(0x40000010, 0, &a, &b, &c, &d);
        if (a)
            return a;
    }
    cpuid(0, 0, &a, &b, &c, &d);
    if (a >= 0x15) {
        cpuid(0x15, 0, &a, &b, &c, &d);
        if (a && b && c)
            return (u64)c * b / a / 1000;
    }
    return 0;
}

#define PIT_HZ 1193182
#define PIT_10MS 11932

static void lapic_timer_start_oneshot(void)
{
    lapic_write(LAPIC_TIMER_DIV, 0x3);              /* divide by 16 */
    lapic_write(LAPIC_LVT_TIMER, (1 << 16) | 0xFE); /* masked, one-shot */
    lapic_write(LAPIC_TIMER_INIT, 0xFFFFFFFF);
}

/* Set tsc_khz and rt_lapic_ticks_10ms from a measured interval of pit PIT ticks. */
static void set_rates(u64 tsc, u32 lapic, u32 pit)
{
    tsc_khz = tsc * PIT_HZ / pit / 1000;
    rt_lapic_ticks_10ms = (u32)((u64)lapic * PIT_10MS / pit);
}

/* PIT channel 2, gated and observed through port 0x61 (PC speaker port). */
static int calibrate_pit_ch2(void)
{
    u8 p61 = inb(0x61);
    if (p61 == 0xFF)
        return 0;                                   /* no port 0x61 (e.g. QEMU microvm) */
    outb(0x61, (p61 & ~0x02) | 0x01);               /* gate 2 high, speaker off */
    outb(0x43, 0xB0);                               /* ch2, lo/hi, mode 0, binary */
    outb(0x42, PIT_10MS & 0xFF);
    lapic_timer_start_oneshot();
    outb(0x42, PIT_10MS >> 8);                      /* counting starts now */
    u64 t0 = rdtsc();
    u32 l0 = lapic_read(LAPIC_TIMER_CUR);
    u32 n = 0;
    while (!(inb(0x61) & 0x20) && n < 1000000)
        n++;
    u64 t1 = rdtsc();
    u32 l1 = lapic_read(LAPIC_TIMER_CUR);
    outb(0x61, p61 & ~0x03);
    lapic_write(LAPIC_TIMER_INIT, 0);
    if (n == 0 || n >= 1000000 || t1 - t0 < 1000)
        return 0;
    set_rates(t1 - t0, l0 - l1, PIT_10MS);
    return 1;
}

static u32 pit_ch0_read(void)
{
    outb(0x43, 0x00);                               /* latch channel 0 */
    u32 lo = inb(0x40);
    return lo | (u32)inb(0x40) << 8;
}

/* PIT channel 0 (its IRQ 0 stays masked), read back through latch commands. */
static int calibrate_pit_ch0(void)
{
    outb(0x43, 0x30);                               /* ch0, lo/hi, mode 0, binary */
    outb(0x40, 0xFF);
    lapic_timer_start_oneshot();
    outb(0x40, 0xFF);                               /* counting starts now */
    u32 c0 = pit_ch0_read();
    u64 t0 = rdtsc();
    u32 l0 = lapic_read(LAPIC_TIMER_CUR);
    u32 c = c0, n = 0;
    while (c0 - c < PIT_10MS && n < 200000) {
        c = pit_ch0_read();
        if (c > c0 || (n > 100 && c == c0))
            break;                                  /* wrapped or stuck: no working PIT */
        n++;
    }
    u64 t1 = rdtsc();
    u32 l1 = lapic_read(LAPIC_TIMER_CUR);
    lapic_write(LAPIC_TIMER_INIT, 0);
    if (c > c0 || c0 - c < PIT_10MS || t1 - t0 < 1000)
        return 0;
    set_rates(t1 - t0, l0 - l1, c0 - c);
    return 1;
}

/*
 * Calibrate the TSC and the LAPIC timer (divide by 16) against the PIT: channel 2 via
 * port 0x61 where that port exists (PC), else channel 0 read back (QEMU microvm has a
 * PIT but no port 0x61). Without a PIT: the TSC rate from CPUID if given, else assume
 * the 1 GHz LAPIC bus clock that KVM and QEMU both emulate.
 */
/* The hypervisor timing leaf (0x40000010: EAX = TSC kHz, EBX = LAPIC bus kHz), as
 * corevisor and QEMU publish it: exact rates with no measurement that load can skew. */
static int rates_from_hypervisor(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a < 0x40000010 || a >= 0x40010000)
        return 0;
    cpuid(0x40000010, 0, &a, &b, &c, &d);
    if (!a || !b)
        return 0;
    tsc_khz = a;
    rt_lapic_ticks_10ms = b * 10 / 16;              /* the LAPIC timer divides by 16 */
    return 1;
}

static void calibrate(void)
{
    lapic_enable();
    if (rates_from_hypervisor() || calibrate_pit_ch2() || calibrate_pit_ch0())
        return;
    u64 khz = tsc_khz_from_cpuid();
    lapic_timer_start_oneshot();
    u64 t0 = rdtsc();
    u32 l0 = lapic_read(LAPIC_TIMER_CUR);
    if (khz) {
        tsc_khz = khz;
        while (rdtsc() - t0 < 10 * khz)
            cpu_relax();
        rt_lapic_ticks_10ms = l0 - lapic_read(LAPIC_TIMER_CUR);
    } else {
        rt_lapic_ticks_10ms = 1000000000 / 16 / 100;
        while (l0 - lapic_read(LAPIC_TIMER_CUR) < rt_lapic_ticks_10ms)
            cpu_relax();
        tsc_khz = (rdtsc() - t0) / 10;
    }
    lapic_write(LAPIC_TIMER_INIT, 0);
}

u64 rt_tsc_khz(void)
{
    if (!tsc_khz)
        calibrate();
    return tsc_khz;
}

void rt_delay_us(u64 us)
{
    u64 end = rdtsc() + us * rt_tsc_khz() / 1000;
    while (rdtsc() < end)
        cpu_relax();
}

/* ------------------------------------------------------------------------------------- */
/* IOAPIC                                                                                */

static void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}

void ioapic_route(int pin, u8 vector, u8 dest_apic)
{
    ioapic_write(0x10 + 2 * pin + 1, (u32)dest_apic << 24);
    ioapic_write(0x10 + 2 * pin, vector);   /* fixed, physical, high, edge, unmasked */
}

void ioapic_route_level(int pin, u8 vector, u8 dest_apic)
{
    ioapic_write(0x10 + 2 * pin + 1, (u32)dest_apic << 24);
    ioapic_write(0x10 + 2 * pin, vector | 1u << 13 | 1u << 15);   /* active low, level */
}

void ioapic_route_level_high(int pin, u8 vector, u8 dest_apic)
{
    ioapic_write(0x10 + 2 * pin + 1, (u32)dest_apic << 24);
    ioapic_write(0x10 + 2 * pin, vector | 1u << 15);   /* active high, level */
}

/* ------------------------------------------------------------------------------------- */
/* CPU discovery                                                                         */

int rt_ncpus;
u8 rt_apic_ids[MAX_CPUS];
static const char *cpus_source = "none";

const char *rt_cpus_source(void) { return cpus_source; }

static u8 checksum(const u8 *p, u32 len)
{
    u8 s = 0;
    for (u32 i = 0; i < len; i++)
        s += p[i];
    return s;
}

static void add_cpu(u8 apic)
{
    for (int i = 0; i < rt_ncpus; i++)
        if (rt_apic_ids[i] == apic)
            return;
    if (rt_ncpus < MAX_CPUS)
        rt_apic_ids[rt_ncpus++] = apic;
}

static const u8 *mp_scan(u64 base, u64 len)
{
    for (u64 a = base; a + 16 <= base + len; a += 16) {
        const u8 *p = phys(a);
        if (*(const u32 *)p == 0x5F504D5F /* "_MP_" */ && p[8] == 1 && !checksum(p, 16))
            return p;
    }
    return NULL;
}

static int mp_parse(void)
{
    u64 ebda = (u64)*(const u16 *)phys(0x40E) << 4;
    const u8 *fp = NULL;
    if (ebda >= 0x80000 && ebda < 0xA0000)
        fp = mp_scan(ebda, 1024);
    if (!fp)
        fp = mp_scan(0x9FC00, 1024);
    if (!fp)
        fp = mp_scan(0xF0000, 0x10000);
    if (!fp)
        return 0;
    u32 cfg = *(const u32 *)(fp + 4);
    if (!cfg)
        return 0;   /* a default configuration: let ACPI say more */
    const u8 *t = phys(cfg);
    if (*(const u32 *)t != 0x504D4350 /* "PCMP" */)
        return 0;
    u16 len = *(const u16 *)(t + 4);
    if (checksum(t, len))
        return 0;
    u16 count = *(const u16 *)(t + 34);
    const u8 *p = t + 44, *end = t + len;
    for (u16 i = 0; i < count && p < end; i++) {
        if (p[0] == 0) {
            if (p[3] & 1)
                add_cpu(p[1]);
            p += 20;
        } else if (p[0] <= 4) {
            p += 8;
        } else {
            break;
        }
    }
    return rt_ncpus;
}

static const u8 *rsdp_scan(u64 base, u64 len)
{
    for (u64 a = base; a + 20 <= base + len; a += 16) {
        const u8 *p = phys(a);
        if (!memcmp(p, "RSD PTR ", 8) && !checksum(p, 20))
            return p;
    }
    return NULL;
}

static void madt_parse(const u8 *t)
{
    u32 len = *(const u32 *)(t + 4);
    const u8 *p = t + 44, *end = t + len;
    while (p + 2 <= end && p[1] >= 2) {
        if (p[0] == 0 && p[1] >= 8 && (*(const u32 *)(p + 4) & 1))
            add_cpu(p[3]);
        p += p[1];
    }
}

const void *rt_acpi_table(const char *sig)
{
    const u8 *rsdp = rsdp_paddr ? phys(rsdp_paddr) : NULL;
    if (!rsdp) {
        u64 ebda = (u64)*(const u16 *)phys(0x40E) << 4;
        if (ebda >= 0x80000 && ebda < 0xA0000)
            rsdp = rsdp_scan(ebda, 1024);
    }
    if (!rsdp)
        rsdp = rsdp_scan(0xE0000, 0x20000);
    if (!rsdp || memcmp(rsdp, "RSD PTR ", 8))
        return NULL;
    u64 sdt;
    u32 esize;
    if (rsdp[15] >= 2 && *(const u64 *)(rsdp + 24)) {
        sdt = *(const u64 *)(rsdp + 24);
        esize = 8;
    } else {
        sdt = *(const u32 *)(rsdp + 16);
        esize = 4;
    }
    const u8 *s = phys(sdt);
    u32 slen = *(const u32 *)(s + 4);
    for (u32 off = 36; off + esize <= slen; off += esize) {
        u64 a = esize == 8 ? *(const u64 *)(s + off) : *(const u32 *)(s + off);
        const u8 *t = phys(a);
        if (!memcmp(t, sig, 4))
            return t;
    }
    return NULL;
}

static int acpi_parse(void)
{
    const u8 *madt = rt_acpi_table("APIC");
    if (madt)
        madt_parse(madt);
    return rt_ncpus;
}

/*
 * The MP table first; the ACPI MADT too, and it wins if it lists more enabled CPUs.
 * (SeaBIOS marks the APs it did not see wake up in time as disabled in the MP table it
 * builds, while QEMU's MADT lists them all: on a host where the firmware's CPL0 code is
 * emulated slowly, QEMU -M pc -smp 2 gets an MP table with one CPU.)
 */
int rt_discover_cpus(void)
{
    u8 mp_ids[MAX_CPUS];
    rt_ncpus = 0;
    int mp = mp_parse();
    memcpy(mp_ids, rt_apic_ids, sizeof(mp_ids));
    rt_ncpus = 0;
    int madt = acpi_parse();
    if (madt > mp) {
        cpus_source = "madt";
    } else if (mp) {
        cpus_source = "mp";
        memcpy(rt_apic_ids, mp_ids, sizeof(mp_ids));
        rt_ncpus = mp;
    } else {
        cpus_source = "none";
        rt_apic_ids[0] = (u8)lapic_id();
        rt_ncpus = 1;
    }
    return rt_ncpus;
}

int rt_cpu_index(u32 apic)
{
    for (int i = 0; i < rt_ncpus; i++)
        if (rt_apic_ids[i] == apic)
            return i;
    return -1;
}

/* ------------------------------------------------------------------------------------- */
/* AP start-up                                                                           */

#define TRAMPOLINE 0x8000
#define AP_STACK_SIZE 8192

static volatile int ap_started;
static volatile int ap_index;
static void (*volatile ap_fn)(int);

static void lapic_send_ipi(u32 apic, u32 icr)
{
    lapic_write(LAPIC_ICR_HI, apic << 24);
    lapic_write(LAPIC_ICR_LO, icr);
    for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & (1 << 12)); i++)
        cpu_relax();
}

int rt_start_ap(int index, void (*fn)(int index), u64 timeout_us)
{
    static int copied;
    if (!copied) {
        memcpy(phys(TRAMPOLINE), ap_tramp_start, ap_tramp_end - ap_tramp_start);
        copied = 1;
    }
    u32 apic = rt_apic_ids[index];
    ap_fn = fn;
    ap_index = index;
    ap_started = 0;
    ap_boot_stack = (u64)ap_stacks + (u64)(index + 1) * AP_STACK_SIZE;
    barrier();

    u64 khz = rt_tsc_khz();
    u64 deadline = rdtsc() + timeout_us * khz / 1000;
    lapic_send_ipi(apic, 0x00004500);                       /* INIT, assert */
    rt_delay_us(10000);
    lapic_send_ipi(apic, 0x00004600 | (TRAMPOLINE >> 12));  /* SIPI */
    rt_delay_us(200);
    if (!ap_started)
        lapic_send_ipi(apic, 0x00004600 | (TRAMPOLINE >> 12));
    while (!ap_started && rdtsc() < deadline)
        cpu_relax();
    return ap_started;
}

void rt_ap_start(void)
{
    rt_load_idt();
    lapic_enable();
    int index = ap_index;
    void (*fn)(int) = ap_fn;
    barrier();
    ap_started = 1;
    fn(index);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ------------------------------------------------------------------------------------- */

void rt_start(void)
{
    uart_init();
    parse_boot_info();
    setup_tss();
    setup_idt();
    rt_load_idt();
    outb(0x21, 0xFF);       /* mask both 8259 PICs */
    outb(0xA1, 0xFF);
    rt_exit((u32)main());
}

static volatile int guard_fired;

static void guard_irq(struct trap_frame *tf)
{
    (void)tf;
    guard_fired = 1;
    lapic_eoi();
}

int rt_wait_count(volatile int *count, int seen, u32 ms)
{
    u64 per_10ms = rt_lapic_ticks_10ms ? rt_lapic_ticks_10ms : 625000;
    u64 ticks = per_10ms * ms / 10;
    rt_set_handler(RT_GUARD_VECTOR, guard_irq);
    guard_fired = 0;
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, RT_GUARD_VECTOR);         /* one-shot */
    lapic_write(LAPIC_TIMER_INIT, ticks > 0xFFFFFFFFu ? 0xFFFFFFFFu : (u32)ticks);
    for (;;) {
        cli();
        if (*count > seen || guard_fired)
            break;
        __asm__ volatile("sti; hlt" ::: "memory");          /* sti's shadow: no lost wakeup */
    }
    lapic_write(LAPIC_TIMER_INIT, 0);
    return *count > seen;
}
