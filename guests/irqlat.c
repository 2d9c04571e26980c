/*
 * irqlat: LAPIC timer interrupt latency. The timer is armed for a known TSC deadline
 * (TSC-deadline mode if CPUID.1:ECX[24], else one-shot count mode with the deadline
 * computed from the calibrated rates); the handler's first instruction reads the TSC;
 * latency = entry - deadline. The handler re-arms the next deadline 200..1000 us ahead.
 * The CPU waits in hlt (wait=hlt, default) or in a CPL3 busy loop (wait=user).
 * n= samples (default 500) after warm= (default 10) discarded ones.
 */
#include "rt/rt.h"
#include "rt/pv.h"
#include "bench.h"

#define VEC 0x60
#define MAX_N 100000
#define MSR_TSC_DEADLINE 0x6E0

__asm__(".pushsection .stack, \"aw\", @nobits\n.balign 16\n"
        ".globl irqlat_samples\nirqlat_samples: .skip 800000\n.popsection\n");
extern i64 irqlat_samples[];

static int tscdl;
static u64 khz, per10ms, total, warm, deadline, seed = 12345;
static volatile u64 count;

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static void arm(void)
{
    seed = seed * 6364136223846793005UL + 1442695040888963407UL;
    u64 us = 200 + (seed >> 33) % 800;
    if (tscdl) {
        deadline = rdtsc() + us * khz / 1000;
        wrmsr(MSR_TSC_DEADLINE, deadline);
    } else {
        u32 cnt = (u32)(us * per10ms / 10000);
        deadline = rdtsc() + (u64)cnt * khz * 10 / per10ms;
        lapic_write(LAPIC_TIMER_INIT, cnt);
    }
}

static void timer_irq(struct trap_frame *tf)
{
    u64 t = rdtsc();
    (void)tf;
    u64 i = count;
    if (i >= warm && i - warm < total)
        irqlat_samples[i - warm] = (i64)(t - deadline);
    count = i + 1;
    lapic_eoi();
    if (count < warm + total)
        arm();
}

static u64 spin_user(u64 limit)
{
    while (count < warm + total)
        if (rdtsc() > limit)
            return 1;
    return 0;
}

static u64 sort_user(u64 n)
{
    pv_sort_u64((u64 *)irqlat_samples, n);  /* clamped to >= 0 first: unsigned order ok */
    return 0;
}

int main(void)
{
    total = rt_cmdline_uint("n", 500);
    warm = rt_cmdline_uint("warm", 10);
    if (total < 1)
        total = 1;
    if (total > MAX_N)
        total = MAX_N;
    int user = pv_cmdline_is("wait", "user", 0);
    lapic_enable();
    khz = rt_tsc_khz();
    per10ms = rt_lapic_ticks_10ms ? rt_lapic_ticks_10ms : 625000;
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    tscdl = (c >> 24) & 1 && !rt_cmdline_uint("oneshot", 0);
    pv_printf("irqlat: mode=%s wait=%s\n", tscdl ? "tsc-deadline" : "oneshot",
              user ? "user" : "hlt");
    rt_set_handler(VEC, timer_irq);
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, VEC | (tscdl ? 2u << 17 : 0));
    u64 limit = rdtsc() + (10 + (warm + total) / 500) * 1000 * khz;     /* generous */
    cli();
    arm();
    int stuck = 0;
    if (user) {
        stuck = (int)run_user(spin_user, limit);
    } else {
        while (count < warm + total && !stuck) {
            __asm__ volatile("sti; hlt; cli" : : : "memory");
            stuck = rdtsc() > limit;
        }
    }
    cli();
    lapic_write(LAPIC_LVT_TIMER, 1 << 16);
    if (stuck) {
        pv_printf("irqlat: timer stopped after %lu interrupts\n", count);
        return 1;
    }
    for (u64 i = 0; i < total; i++)
        if (irqlat_samples[i] < 0)
            irqlat_samples[i] = 0;
    run_user(sort_user, total);
    pv_printf("irqlat: n=%lu p50_ns=%lu p99_ns=%lu max_ns=%lu\n", total,
              pv_tsc_to_ns((u64)irqlat_samples[(total - 1) * 50 / 100]),
              pv_tsc_to_ns((u64)irqlat_samples[(total - 1) * 99 / 100]),
              pv_tsc_to_ns((u64)irqlat_samples[total - 1]));
    return 0;
}
