/*
 * Guest side of the corevisor paravirtual ABI v1 (docs/paravirt-abi.md): hypercall call
 * blocks on port 0x500, channels (HC_CHANNEL_INFO), doorbells (outl index, 0x504), and a
 * single-producer/single-consumer message ring driver for a channel's shared pages.
 *
 * Without corevisor (QEMU, other VMMs) a write to port 0x500 is an unhandled port write:
 * every call block's ret is preset to -ENOSYS, so such a call returns -ENOSYS and
 * pv_present() is 0. Callers degrade on that.
 */
#ifndef PV_H
#define PV_H

#include "rt.h"

#define PV_PORT_HC 0x500
#define PV_PORT_DOORBELL 0x504
#define PV_VERSION_1_0 0x00010000
#define PV_VERSION_1_1 0x00010001    /* adds HC_GENERATION */

#define HC_VERSION 0
#define HC_CONSOLE_WRITE 1
#define HC_YIELD 2
#define HC_CLOCK 3
#define HC_CHANNEL_NOTIFY 4
#define HC_PARTITION_INFO 5
#define HC_WATCHDOG 6
#define HC_CHANNEL_INFO 7
#define HC_GENERATION 8

#define PV_EPERM 1
#define PV_ENOENT 2
#define PV_EAGAIN 11
#define PV_EFAULT 14
#define PV_EINVAL 22
#define PV_EMSGSIZE 90
#define PV_EROFS 30
#define PV_ENOSYS 38

#define PV_CHAN_READONLY 1u     /* this partition may only read the channel */
#define PV_CHAN_CAN_RING 2u     /* this side may ring the doorbell */

/* The 64-byte call block (one per CPU, indexed by local APIC ID). */
struct pv_block {
    u64 nr;
    u64 args[5];
    i64 ret;
    u64 ret2;
} __attribute__((aligned(64)));

/* Generic hypercall. ret2 may be NULL. Interrupts are held off around the call at CPL0;
 * at CPL3 the caller must not be preempted by another user of the same CPU's block (the
 * RTOS only calls from its kernel, with interrupts off). */
i64 pv_call(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4, u64 *ret2);

int pv_present(void);                   /* HC_VERSION answered with major 1 (cached) */
i64 pv_version(void);
i64 pv_console_write(const void *buf, u64 len);   /* splits at 4096 */
i64 pv_clock_ns(void);
i64 pv_partition_info(u64 *id, u64 *cpus);
i64 pv_watchdog(u64 ms);
i64 pv_channel_info(u64 idx, u64 *gpa, u64 *size, u32 *flags, u32 *gsi);
i64 pv_channel_notify(u64 idx);         /* relayed doorbell (through the VMM) */
/* Restores from a snapshot so far (0 after a boot) and the random id of the latest one;
 * -PV_ENOSYS before ABI 1.1. */
i64 pv_generation(u64 *id);
static inline void pv_doorbell(u32 idx) { outl(PV_PORT_DOORBELL, idx); }   /* direct */
i64 pv_yield(void);

/* Console: pv_printf formats into a buffer and writes it with one HC_CONSOLE_WRITE when
 * the ABI is present, else to COM1 (rt's printf). Lines <= 255 bytes. Never call it from
 * an interrupt handler that may interrupt another pv_printf on the same CPU. */
int pv_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int pv_snprintf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int pv_vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);

/* Command line: "key=value" as a string (copied, NUL-terminated; returns 1 if found), and
 * "is key=value on the command line" (dflt: what to answer when the key is absent). */
int pv_cmdline_is(const char *key, const char *value, int dflt);

/* ---- channels --------------------------------------------------------------------- */

/*
 * Message ring layout in a channel region of S bytes (S >= 4096; the guests' business,
 * the VMM does not look inside):
 *
 *   [0, S/2)   ring 0: written by side 0 (the initiator: rtos, dbping, chanbw), read by side 1
 *   [S/2, S)   ring 1: written by side 1 (the responder: peer), read by side 0
 *
 * each ring:  +0   u32 head   (producer's count of messages written, free-running)
 *             +64  u32 tail   (consumer's count of messages read, free-running)
 *             +128 slots[n]:  64 bytes each = u32 len + 60 bytes of payload,
 *                             n = (S/2 - 128) / 64  (30 for a 4 KiB channel)
 *
 * Message k lives in slot k % n. The producer fills the slot, then bumps head; the
 * consumer copies the slot out, then bumps tail; full when head - tail == n. One writer
 * per index, x86 TSO: volatile accesses + compiler barriers are enough. Indices live
 * only in the shared page, so a restarted partition picks up where it was.
 */
#define PV_SLOT_SIZE 64
#define PV_MSG_MAX (PV_SLOT_SIZE - 4)

struct pv_ring {
    volatile u32 head;
    u32 pad0[15];
    volatile u32 tail;
    u32 pad1[15];
};

struct pv_chan {
    int idx;                    /* channel index (-1: local loopback memory) */
    int side;                   /* 0 initiator, 1 responder */
    u64 gpa, size;
    u32 flags, gsi;
    struct pv_ring *tx, *rx;
    u8 *txslots, *rxslots;
    u32 nslots;
    int relay;                  /* 1: pv_chan_kick uses HC_CHANNEL_NOTIFY */
    u8 vector;                  /* set by pv_chan_route_irq (0: not routed) */
    u8 dest_apic;
    u8 peer_vector, peer_apic;  /* local channels: where pv_chan_kick sends its IPI */
    volatile u32 irqs;          /* doorbell interrupts taken */
    void (*on_irq)(struct pv_chan *c);  /* optional, called from the handler (before EOI) */
};

/* Look up channel idx with HC_CHANNEL_INFO and lay the rings over it: 0 or -errno
 * (-ENOSYS without the ABI, -ENOENT for no such channel, -EINVAL if smaller than 4 KiB). */
int pv_chan_open(struct pv_chan *c, int idx, int side);
/* The same rings over ordinary guest memory (an in-guest loopback for testing without
 * the ABI); its "doorbell" is an IPI to c->peer_vector on c->peer_apic (set them). */
void pv_chan_open_local(struct pv_chan *c, void *mem, u64 size, int side);
/* The other side's view of a local channel (same memory, the other side). */
void pv_chan_peer_view(struct pv_chan *peer, const struct pv_chan *c);

/* 0 on success, -EAGAIN if the ring is full, -EMSGSIZE, -EROFS on a read-only channel. */
int pv_chan_send(struct pv_chan *c, const void *buf, u32 len);
/* Message length (copied into buf, truncated to max), or -EAGAIN if none is waiting. */
int pv_chan_recv(struct pv_chan *c, void *buf, u32 max);
static inline u32 pv_chan_rx_pending(const struct pv_chan *c) { return c->rx->head - c->rx->tail; }
static inline u32 pv_chan_tx_free(const struct pv_chan *c) { return c->nslots - (c->tx->head - c->tx->tail); }
/* Ring the other side: outl idx, 0x504 (or HC_CHANNEL_NOTIFY if c->relay); a local
 * channel sends a self-IPI. Returns 0 or -errno. */
int pv_chan_kick(struct pv_chan *c);
/* Route the channel's GSI (IOAPIC pin = GSI, edge, active high) to vector on dest_apic
 * and install the doorbell handler (one channel per vector). */
void pv_chan_route_irq(struct pv_chan *c, u8 vector, u8 dest_apic);

/* ---- small helpers shared by the PV guests ------------------------------------------ */
/* Sleep with interrupts on: arms a one-shot LAPIC timer (vector PV_SLEEP_VECTOR) and
 * halts; cond() is checked at every wake-up (any interrupt) and at least every 10 ms.
 * Returns 1 as soon as cond is true, 0 once the time is up (cond may be NULL: a plain
 * sleep). CPL0 only; leaves IF as it found it; uses (and stops) the LAPIC timer. */
#define PV_SLEEP_VECTOR 0x41
int pv_wait_until(int (*cond)(void *), void *arg, u64 timeout_us);
u64 pv_tsc_to_ns(u64 tsc);
void pv_sort_u64(u64 *a, u64 n);        /* heap sort, in place */

#endif
