/* corevisor test-guest runtime: a tiny freestanding x86-64 C runtime. */
#ifndef RT_H
#define RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;

#define NULL ((void *)0)
#define MAX_CPUS 16

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)

/* ---- port I/O and CPU helpers ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }

/* ---- spinlock (plain xchg) ---- */
typedef struct { volatile u32 v; } spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
    for (;;) {
        u32 old = 1;
        __asm__ volatile("xchgl %0, %1" : "+r"(old), "+m"(l->v) : : "memory");
        if (old == 0)
            return;
        while (l->v)
            cpu_relax();
    }
}
static inline void spin_unlock(spinlock_t *l)
{
    barrier();
    l->v = 0;
}

/* ---- libc subset ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* ---- console: COM1 16550, polled; printf takes a console spinlock ---- */
void uart_putc(char c);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
/* printf's formatting into buf (at most n bytes with the NUL); returns the full length. */
int rt_vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);

/* ---- exit: isa-debug-exit style port 0xF4, else cli; hlt forever ---- */
void rt_exit(u32 status) __attribute__((noreturn));

/* ---- boot information ---- */
extern u32 boot_kind;           /* 0 unknown, 1 multiboot, 2 PVH */
const char *rt_cmdline(void);   /* never NULL */
/* Value of "key=N" (decimal or 0x-hex) on the command line, or dflt. */
u64 rt_cmdline_uint(const char *key, u64 dflt);
/* Copy key's value (up to the next space) into out (n bytes with the NUL); 0 if absent. */
int rt_cmdline_str(const char *key, char *out, size_t n);
u64 rt_mem_kib(void);           /* usable RAM (type 1) in KiB from the memory map */
u64 rt_rsdp_paddr(void);        /* from PVH start_info, or 0 */
/* The ACPI table with signature sig (e.g. "FACP") through the RSDP (PVH's, or the BIOS-area
 * scan) and the XSDT/RSDT, or NULL. */
const void *rt_acpi_table(const char *sig);

/* ---- CPUs: MP table, else ACPI MADT ---- */
extern int rt_ncpus;
extern u8 rt_apic_ids[MAX_CPUS];
int rt_discover_cpus(void);     /* fills the above, returns the count (>= 1) */
const char *rt_cpus_source(void); /* "mp", "madt" or "none" */

/* ---- interrupts ---- */
struct trap_frame {
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};
typedef void (*trap_handler_t)(struct trap_frame *tf);
void rt_set_handler(int vector, trap_handler_t h);
/* A system-call gate: h runs for `int $vector` from CPL3 (the gate gets DPL3). On the PVM
 * test host `int $N` at CPL3 raises #UD instead; see ptstress.c for the fallback. */
void rt_set_user_gate(int vector, trap_handler_t h);
void rt_load_idt(void);         /* for APs */

/* ---- CPL3 ---- */
u64 run_user(u64 (*fn)(u64), u64 arg);

/* ---- time ---- */
u64 rt_tsc_khz(void);           /* calibrated once (PIT channel 2), cached */
void rt_delay_us(u64 us);
extern u32 rt_lapic_ticks_10ms; /* LAPIC timer counts (divide by 16) per 10 ms, 0 if unknown */

/* ---- local APIC (xAPIC MMIO) and IOAPIC ---- */
#define LAPIC_BASE 0xFEE00000UL
#define IOAPIC_BASE 0xFEC00000UL
#define LAPIC_ID 0x020
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3E0
static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }
static inline u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }
void lapic_enable(void);
/* Route IOAPIC pin to vector, fixed delivery, physical destination apic; edge, high. */
void ioapic_route(int pin, u8 vector, u8 dest_apic);
/* The same for a shared, level-triggered, active-low line (PCI INTx). */
void ioapic_route_level(int pin, u8 vector, u8 dest_apic);
/* The same for a level-triggered, active-high line (an ISA line a device raises and holds
 * until the handler quiets it, before its EOI). */
void ioapic_route_level_high(int pin, u8 vector, u8 dest_apic);

/* Halt with interrupts on until *count > seen or ms have passed (a one-shot LAPIC timer
 * on RT_GUARD_VECTOR, which this installs); returns whether count moved. For a driver
 * waiting for its device's interrupt (sensor.c, pcisensor.c). Interrupts end up off. */
#define RT_GUARD_VECTOR 0x41
int rt_wait_count(volatile int *count, int seen, u32 ms);

/* ---- SMP ---- */
/* Start AP (index into rt_apic_ids) with INIT-SIPI-SIPI; it runs fn(index) on its own
 * stack with interrupts off. Returns 1 once the AP is running, 0 on timeout. */
int rt_start_ap(int index, void (*fn)(int index), u64 timeout_us);
int rt_cpu_index(u32 apic);     /* index of an APIC ID in rt_apic_ids, or -1 */

int main(void);

#endif
