/* Shared-memory layouts the bench guests (dbping, chanbw) and peer (echo, sink) agree on.
 * They use the channel region directly, not the message rings of rt/pv.h. */
#ifndef BENCH_H
#define BENCH_H

#include "rt/rt.h"

/* dbping <-> peer mode=echo: a control block at channel offset 0. */
#define DBPING_MAGIC 0x47504244u    /* "DBPG" */
struct dbping_ctl {
    volatile u32 magic;             /* written by dbping: DBPING_MAGIC */
    volatile u32 path;              /* 0: doorbell (outl 0x504), 1: HC_CHANNEL_NOTIFY */
    volatile u32 done;              /* dbping finished: echo exits */
    volatile u32 ready;             /* echo has routed its doorbell interrupt */
};

/* chanbw -> peer mode=sink: a byte stream through a ring at CHANBW_DATA..size.
 * Stream word k (bytes 8k..8k+7) is chanbw_word(k); the sink sums what it reads. */
#define CHANBW_MAGIC 0x31574243u    /* "CBW1" */
#define CHANBW_DATA 256
struct chanbw_ctl {
    volatile u64 head;              /* +0   bytes written (producer) */
    u64 pad0[7];
    volatile u64 tail;              /* +64  bytes consumed (sink) */
    u64 pad1[7];
    volatile u32 magic;             /* +128 written by chanbw once total is set */
    volatile u32 sink_ready;        /* +132 sink is polling */
    volatile u64 total;             /* +136 bytes to stream */
    u64 pad2[6];
    volatile u32 done;              /* +192 sink finished */
    u32 pad3;
    volatile u64 done_bytes;        /* +200 */
    volatile u64 done_sum;          /* +208 */
};
_Static_assert(sizeof(struct chanbw_ctl) <= CHANBW_DATA, "chanbw_ctl");

static inline u64 chanbw_word(u64 k) { return k * 0x9E3779B97F4A7C15UL + 1; }

static inline int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

#endif
