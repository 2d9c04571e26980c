/*
 * peer: the second demo guest (bare metal, no RTOS). mode= picks what it does:
 *   pong     (default) answer "ping K" with "pong K" on channel chan= (side 1 of the
 *            message rings, see rt/pv.h), msgs=N messages, then exit 0
 *   echo     the far end of dbping: ring the doorbell back on every doorbell
 *   sink     the far end of chanbw: consume the byte stream (at CPL3)
 *   counter  print "peer: tick K" every period= ms, ticks= times (needs no ABI); with
 *            gen=1 also "peer: generation G id X" whenever HC_GENERATION changes (after
 *            a restore from a snapshot: a clone would reseed its randomness there)
 *   dirty    passes= times over mib= MiB of RAM from 16 MiB up (at CPL3): check every
 *            page still holds the previous pass's number, write this pass's; print
 *            "peer: dirty pass K ok" (or the first bad page), then sleep period= ms
 *   writer   put value= into a channel (u64 at +0, then magic 'CVW1' at +8), ring
 *   reader   wait for the writer's value in a channel and print it
 *   rowriter try to write into a (read-only) channel and report whether it landed
 * Everything but the sink runs at CPL0 and sleeps in hlt between interrupts.
 */
#include "rt/rt.h"
#include "rt/pv.h"
#include "bench.h"

#define DB_VECTOR 0x50
#define CVW_MAGIC 0x31575643u      /* "CVW1" */

static struct pv_chan ch;
static u64 chan_idx;

static int rx_ready(void *a)
{
    (void)a;
    return pv_chan_rx_pending(&ch) != 0;
}

static int tx_room(void *a)
{
    (void)a;
    return pv_chan_tx_free(&ch) != 0;
}

static int open_chan(const char *who)
{
    int r = pv_chan_open(&ch, (int)chan_idx, 1);
    if (r < 0) {
        pv_printf("%s: no channel %lu (%d)\n", who, chan_idx, r);
        return r;
    }
    ch.relay = pv_cmdline_is("path", "relay", 0);
    pv_chan_route_irq(&ch, DB_VECTOR, (u8)lapic_id());
    return 0;
}

static int mode_pong(void)
{
    u64 msgs = rt_cmdline_uint("msgs", 5);
    u64 timeout_us = rt_cmdline_uint("timeout", 30) * 1000000;
    if (open_chan("peer"))
        return 2;
    char msg[PV_MSG_MAX + 1], reply[PV_MSG_MAX + 1];
    u64 got = 0;
    while (got < msgs) {
        if (!pv_wait_until(rx_ready, NULL, timeout_us)) {
            pv_printf("peer: timeout after %lu messages\n", got);
            return 1;
        }
        int n;
        while (got < msgs && (n = pv_chan_recv(&ch, msg, PV_MSG_MAX)) >= 0) {
            msg[n] = 0;
            got++;
            pv_printf("peer: received \"%s\"\n", msg);
            int m = pv_snprintf(reply, sizeof(reply), "pong %s",
                                n > 5 && !memcmp(msg, "ping ", 5) ? msg + 5 : msg);
            while (pv_chan_send(&ch, reply, (u32)m) == -PV_EAGAIN)
                if (!pv_wait_until(tx_room, NULL, timeout_us)) {
                    pv_printf("peer: timeout sending a reply\n");
                    return 1;
                }
            pv_chan_kick(&ch);
        }
    }
    pv_printf("peer: done, %lu messages\n", got);
    return 0;
}

/* echo: answer every doorbell from the interrupt handler itself. */
static void echo_irq(struct pv_chan *c)
{
    struct dbping_ctl *ctl = (struct dbping_ctl *)c->gpa;
    int relay = ctl->magic == DBPING_MAGIC ? ctl->path == 1 : c->relay;
    if (relay)
        pv_channel_notify((u64)c->idx);
    else
        pv_doorbell((u32)c->idx);
}

static int echo_done(void *a)
{
    (void)a;
    return ((struct dbping_ctl *)ch.gpa)->done != 0;
}

static int mode_echo(void)
{
    u64 timeout_us = rt_cmdline_uint("timeout", 120) * 1000000;
    if (open_chan("peer"))
        return 2;
    struct dbping_ctl *ctl = (struct dbping_ctl *)ch.gpa;
    ch.on_irq = echo_irq;
    ctl->ready = 1;
    if (!pv_wait_until(echo_done, NULL, timeout_us)) {
        pv_printf("peer: echo timeout, %u doorbells\n", ch.irqs);
        return 1;
    }
    pv_printf("peer: echo done, %u doorbells\n", ch.irqs);
    return 0;
}

/* sink: CPL3 consumer of chanbw's byte stream (layout in bench.h). */
static u64 sink_user(u64 arg)
{
    (void)arg;
    struct chanbw_ctl *ctl = (struct chanbw_ctl *)ch.gpa;
    volatile u64 *data = (volatile u64 *)(ch.gpa + CHANBW_DATA);
    u64 cap = ch.size - CHANBW_DATA;
    u64 khz = rt_tsc_khz();
    ctl->sink_ready = 1;
    u64 limit = rdtsc() + 60000 * khz;          /* 60 s to see the producer */
    while (ctl->magic != CHANBW_MAGIC)
        if (rdtsc() > limit)
            return (u64)-1;
    barrier();
    u64 total = ctl->total, tail = ctl->tail, sum = 0;
    u64 idle_since = rdtsc();
    while (tail < total) {
        u64 head = ctl->head;
        if (head == tail) {
            if (rdtsc() - idle_since > 10000 * khz)
                return (u64)-2;                 /* 10 s without progress */
            __asm__ volatile("pause");
            continue;
        }
        barrier();
        u64 pos = tail % cap;
        u64 n = head - tail;
        if (n > cap - pos)
            n = cap - pos;
        for (u64 i = 0; i < n / 8; i++)
            sum += data[pos / 8 + i];
        barrier();
        tail += n;
        ctl->tail = tail;
        idle_since = rdtsc();
    }
    ctl->done_bytes = tail;
    ctl->done_sum = sum;
    barrier();
    ctl->done = 1;
    return tail;
}

static int mode_sink(void)
{
    if (open_chan("peer"))
        return 2;
    i64 got = (i64)run_user(sink_user, 0);
    if (got < 0) {
        pv_printf("peer: sink timeout (%ld)\n", got);
        return 1;
    }
    pv_printf("peer: sink received %ld bytes\n", got);
    return 0;
}

static int mode_counter(void)
{
    u64 ticks = rt_cmdline_uint("ticks", 30);
    u64 period = rt_cmdline_uint("period", 100);
    int gen = rt_cmdline_uint("gen", 0) && pv_present();
    u64 id = 0, last_id = 0;
    i64 last = gen ? pv_generation(&last_id) : 0;
    for (u64 k = 1; k <= ticks; k++) {
        pv_wait_until(NULL, NULL, period * 1000);
        if (gen) {
            i64 g = pv_generation(&id);
            if (g != last || id != last_id)
                pv_printf("peer: generation %ld id %lx\n", g, id);
            last = g;
            last_id = id;
        }
        pv_printf("peer: tick %lu\n", k);
    }
    return 0;
}

#define DIRTY_BASE (16UL << 20)
static u64 dirty_pages;

/* One pass at CPL3: every page must hold pass - 1 in its first word (and its page
 * number in its second); it then gets pass. Returns the first bad page + 1, or 0. */
static u64 dirty_pass(u64 pass)
{
    for (u64 i = 0; i < dirty_pages; i++) {
        volatile u64 *w = (volatile u64 *)(DIRTY_BASE + i * 4096);
        if (pass > 1 && (w[0] != pass - 1 || w[1] != i))
            return i + 1;
        w[1] = i;
        w[0] = pass;
    }
    return 0;
}

static int mode_dirty(void)
{
    u64 passes = rt_cmdline_uint("passes", 10);
    u64 mib = rt_cmdline_uint("mib", 16);
    u64 period = rt_cmdline_uint("period", 0);
    if (DIRTY_BASE + (mib << 20) > rt_mem_kib() * 1024) {
        pv_printf("peer: %lu MiB from 16 MiB do not fit %lu KiB of RAM\n", mib, rt_mem_kib());
        return 2;
    }
    dirty_pages = mib << 8;
    for (u64 k = 1; k <= passes; k++) {
        u64 bad = run_user(dirty_pass, k);
        if (bad) {
            volatile u64 *w = (volatile u64 *)(DIRTY_BASE + (bad - 1) * 4096);
            pv_printf("peer: dirty pass %lu: page %lu holds %lu/%lu, not %lu/%lu\n", k,
                      bad - 1, w[0], w[1], k - 1, bad - 1);
            return 1;
        }
        pv_printf("peer: dirty pass %lu ok\n", k);
        if (period)
            pv_wait_until(NULL, NULL, period * 1000);
    }
    return 0;
}

static int mode_writer(void)
{
    u64 value = rt_cmdline_uint("value", 42);
    int r = pv_chan_open(&ch, (int)chan_idx, 1);
    if (r < 0) {
        pv_printf("peer: no channel %lu (%d)\n", chan_idx, r);
        return 2;
    }
    *(volatile u64 *)ch.gpa = value;
    barrier();
    *(volatile u32 *)(ch.gpa + 8) = CVW_MAGIC;
    int landed = *(volatile u64 *)ch.gpa == value;
    if (ch.flags & PV_CHAN_CAN_RING)
        pv_chan_kick(&ch);
    pv_printf("peer: wrote value=%lu%s\n", value, landed ? "" : " (refused)");
    return landed ? 0 : 1;
}

static int magic_seen(void *a)
{
    (void)a;
    return *(volatile u32 *)(ch.gpa + 8) == CVW_MAGIC;
}

static int mode_reader(void)
{
    u64 timeout_us = rt_cmdline_uint("timeout", 10) * 1000000;
    if (open_chan("peer"))
        return 2;
    if (!pv_wait_until(magic_seen, NULL, timeout_us)) {
        pv_printf("peer: read timeout\n");
        return 1;
    }
    barrier();
    pv_printf("peer: read value=%lu\n", *(volatile u64 *)ch.gpa);
    return 0;
}

static int mode_rowriter(void)
{
    int r = pv_chan_open(&ch, (int)chan_idx, 1);
    if (r < 0) {
        pv_printf("peer: no channel %lu (%d)\n", chan_idx, r);
        return 2;
    }
    volatile u32 *p = (volatile u32 *)(ch.gpa + 0x100);
    u32 before = *p, want = before ^ 0x5A5A5A5Au;
    *p = want;
    barrier();
    u32 after = *p;
    int refused = after == before;
    pv_printf("peer: channel %lu flags=0x%x\n", chan_idx, ch.flags);
    pv_printf("peer: write %s\n", refused ? "refused" : "landed");
    return refused == !!(ch.flags & PV_CHAN_READONLY) ? 0 : 1;
}

int main(void)
{
    char mode[16] = "pong";
    rt_cmdline_str("mode", mode, sizeof(mode));
    chan_idx = rt_cmdline_uint("chan", 0);
    lapic_enable();
    rt_tsc_khz();
    pv_printf("peer: start mode=%s\n", mode);
    if (streq(mode, "counter"))
        return mode_counter();
    if (streq(mode, "dirty"))
        return mode_dirty();
    if (!pv_present()) {
        pv_printf("peer: no hypervisor ABI\n");
        return 2;
    }
    if (streq(mode, "pong"))
        return mode_pong();
    if (streq(mode, "echo"))
        return mode_echo();
    if (streq(mode, "sink"))
        return mode_sink();
    if (streq(mode, "writer"))
        return mode_writer();
    if (streq(mode, "reader"))
        return mode_reader();
    if (streq(mode, "rowriter"))
        return mode_rowriter();
    pv_printf("peer: unknown mode %s\n", mode);
    return 2;
}
