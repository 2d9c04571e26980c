/*
 * chanbw: stream bytes= (default 64 MiB) through a byte ring in channel chan= (default
 * 0) to the peer (peer mode=sink), both sides polling at CPL3; layout in bench.h. The
 * clock runs from the first byte written to the sink's "done"; the sink's checksum of
 * what it read must match the stream's.
 */
#include "rt/rt.h"
#include "rt/pv.h"
#include "bench.h"

static struct pv_chan ch;
static u64 total, elapsed, expect_sum;

static u64 produce_user(u64 arg)
{
    (void)arg;
    struct chanbw_ctl *ctl = (struct chanbw_ctl *)ch.gpa;
    volatile u64 *data = (volatile u64 *)(ch.gpa + CHANBW_DATA);
    u64 cap = ch.size - CHANBW_DATA, khz = rt_tsc_khz();
    u64 limit = rdtsc() + 60000 * khz;
    while (!ctl->sink_ready)
        if (rdtsc() > limit)
            return 1;
    ctl->head = 0;
    ctl->tail = 0;
    ctl->done = 0;
    ctl->total = total;
    barrier();
    ctl->magic = CHANBW_MAGIC;
    u64 head = 0, k = 0, sum = 0, t0 = rdtsc(), idle_since = t0;
    while (head < total) {
        u64 room = cap - (head - ctl->tail);
        if (!room) {
            if (rdtsc() - idle_since > 10000 * khz)
                return 2;
            __asm__ volatile("pause");
            continue;
        }
        u64 pos = head % cap, n = room;
        if (n > cap - pos)
            n = cap - pos;
        if (n > total - head)
            n = total - head;
        if (n > 2048)
            n = 2048;
        for (u64 i = 0; i < n / 8; i++) {
            u64 w = chanbw_word(k++);
            data[pos / 8 + i] = w;
            sum += w;
        }
        barrier();
        head += n;
        ctl->head = head;
        idle_since = rdtsc();
    }
    while (!ctl->done)
        if (rdtsc() - idle_since > 10000 * khz)
            return 3;
    elapsed = rdtsc() - t0;
    expect_sum = sum;
    return 0;
}

int main(void)
{
    total = rt_cmdline_uint("bytes", 64UL << 20) & ~7UL;
    if (!total)
        total = 8;
    lapic_enable();
    rt_tsc_khz();
    if (!pv_present()) {
        pv_printf("chanbw: no hypervisor ABI\n");
        return 2;
    }
    int r = pv_chan_open(&ch, (int)rt_cmdline_uint("chan", 0), 0);
    if (r < 0) {
        pv_printf("chanbw: no channel (%d)\n", r);
        return 2;
    }
    u64 err = run_user(produce_user, 0);
    if (err) {
        pv_printf("chanbw: timeout (%s)\n",
                  err == 1 ? "sink never ready" : err == 2 ? "ring stayed full" : "no done");
        return 1;
    }
    struct chanbw_ctl *ctl = (struct chanbw_ctl *)ch.gpa;
    u64 ns = pv_tsc_to_ns(elapsed);
    u64 us = ns / 1000;
    u64 mbps10 = ns ? total * 10000 / ns : 0;  /* MB/s (1e6 bytes), one decimal */
    pv_printf("chanbw: bytes=%lu us=%lu MB/s=%lu.%lu\n", total, us, mbps10 / 10, mbps10 % 10);
    if (ctl->done_bytes != total || ctl->done_sum != expect_sum) {
        pv_printf("chanbw: checksum mismatch (sink saw %lu bytes)\n", ctl->done_bytes);
        return 1;
    }
    pv_printf("chanbw: verify ok, ring=%lu bytes\n", ch.size - CHANBW_DATA);
    return 0;
}
