/*
 * dbping: doorbell round trips to the peer partition (peer mode=echo) over channel
 * chan= (default 0). Each round trip: rdtsc, ring (path=kernel: outl index, 0x504, an
 * ioeventfd in the host kernel; path=relay: HC_CHANNEL_NOTIFY through the VMM), halt
 * until the echo's doorbell interrupt arrives, rdtsc. n= samples (default 1000) after
 * warm= (default 20) discarded ones.
 */
#include "rt/rt.h"
#include "rt/pv.h"
#include "bench.h"

#define DB_VECTOR 0x50
#define TO_VECTOR 0x42
#define MAX_N 100000

__asm__(".pushsection .stack, \"aw\", @nobits\n.balign 16\n"
        ".globl dbping_samples\ndbping_samples: .skip 800000\n.popsection\n");
extern u64 dbping_samples[];

static struct pv_chan ch;
static volatile int timed_out;
static u64 nsamples;

static void timeout_irq(struct trap_frame *tf)
{
    (void)tf;
    timed_out = 1;
    lapic_eoi();
}

static int echo_ready(void *a)
{
    (void)a;
    return ((struct dbping_ctl *)ch.gpa)->ready != 0;
}

static u64 sort_user(u64 arg)
{
    pv_sort_u64(dbping_samples, arg);
    return 0;
}

int main(void)
{
    u64 n = rt_cmdline_uint("n", 1000), warm = rt_cmdline_uint("warm", 20);
    if (n < 1)
        n = 1;
    if (n > MAX_N)
        n = MAX_N;
    int relay = pv_cmdline_is("path", "relay", 0);
    lapic_enable();
    u64 khz = rt_tsc_khz();
    if (!pv_present()) {
        pv_printf("dbping: no hypervisor ABI\n");
        return 2;
    }
    int r = pv_chan_open(&ch, (int)rt_cmdline_uint("chan", 0), 0);
    if (r < 0) {
        pv_printf("dbping: no channel (%d)\n", r);
        return 2;
    }
    ch.relay = relay;
    u8 me = (u8)lapic_id();
    pv_chan_route_irq(&ch, DB_VECTOR, me);
    struct dbping_ctl *ctl = (struct dbping_ctl *)ch.gpa;
    ctl->path = (u32)relay;
    ctl->done = 0;
    barrier();
    ctl->magic = DBPING_MAGIC;
    if (!pv_wait_until(echo_ready, NULL, 30000000)) {
        pv_printf("dbping: the echo side never became ready\n");
        return 1;
    }
    rt_set_handler(TO_VECTOR, timeout_irq);
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, TO_VECTOR);            /* one-shot */
    u32 per10ms = rt_lapic_ticks_10ms ? rt_lapic_ticks_10ms : 625000;
    u64 timeouts = 0;
    for (u64 i = 0; i < warm + n; i++) {
        timed_out = 0;
        u32 before = ch.irqs;
        lapic_write(LAPIC_TIMER_INIT, per10ms * 100);   /* 1 s guard */
        u64 t0 = rdtsc();
        if (relay)
            pv_channel_notify((u64)ch.idx);
        else
            pv_doorbell((u32)ch.idx);
        while (ch.irqs == before && !timed_out)
            __asm__ volatile("sti; hlt; cli" : : : "memory");
        u64 t1 = rdtsc();
        lapic_write(LAPIC_TIMER_INIT, 0);
        if (ch.irqs == before)
            timeouts++;
        if (i >= warm)
            dbping_samples[i - warm] = t1 - t0;
    }
    nsamples = n;
    ctl->done = 1;
    run_user(sort_user, n);
    u64 p50 = pv_tsc_to_ns(dbping_samples[(n - 1) * 50 / 100]);
    u64 p99 = pv_tsc_to_ns(dbping_samples[(n - 1) * 99 / 100]);
    pv_printf("dbping: n=%lu rtt_ns p50=%lu p99=%lu\n", n, p50, p99);
    pv_printf("dbping: path=%s min_ns=%lu max_ns=%lu timeouts=%lu tsc_khz=%lu\n",
              relay ? "relay" : "kernel", pv_tsc_to_ns(dbping_samples[0]),
              pv_tsc_to_ns(dbping_samples[n - 1]), timeouts, khz);
    /* wake the echo side so it notices done */
    if (relay)
        pv_channel_notify((u64)ch.idx);
    else
        pv_doorbell((u32)ch.idx);
    return timeouts ? 1 : 0;
}
