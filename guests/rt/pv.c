/*
 * Guest side of the corevisor paravirtual ABI v1: hypercalls, console, channels and
 * their doorbells, an SPSC message ring, and a few helpers the PV guests share.
 * See pv.h for the ring layout and docs/paravirt-abi.md for the ABI.
 */
#include "pv.h"

static struct pv_block pv_blocks[MAX_CPUS];

static inline int cur_cpl(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

i64 pv_call(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4, u64 *ret2)
{
    u64 flags = 0;
    int kernel = cur_cpl() == 0;
    if (kernel)
        __asm__ volatile("pushfq; popq %0; cli" : "=r"(flags) : : "memory");
    struct pv_block *b = &pv_blocks[lapic_id() & (MAX_CPUS - 1)];
    b->nr = nr;
    b->args[0] = a0;
    b->args[1] = a1;
    b->args[2] = a2;
    b->args[3] = a3;
    b->args[4] = a4;
    b->ret = -PV_ENOSYS;    /* stays so when nobody handles port 0x500 */
    b->ret2 = 0;
    barrier();
    outl(PV_PORT_HC, (u32)(u64)b);
    barrier();
    i64 r = ((volatile struct pv_block *)b)->ret;
    if (ret2)
        *ret2 = ((volatile struct pv_block *)b)->ret2;
    if (kernel && (flags & 0x200))
        sti();
    return r;
}

static int pv_state = -1;   /* -1 unknown, 0 absent, 1 present */

i64 pv_version(void) { return pv_call(HC_VERSION, 0, 0, 0, 0, 0, NULL); }

int pv_present(void)
{
    if (pv_state < 0) {
        i64 v = pv_version();
        pv_state = v >= 0 && (v >> 16) == 1;
    }
    return pv_state;
}

i64 pv_console_write(const void *buf, u64 len)
{
    const u8 *p = buf;
    i64 total = 0;
    while (len) {
        u64 n = len > 4096 ? 4096 : len;
        i64 r = pv_call(HC_CONSOLE_WRITE, (u64)p, n, 0, 0, 0, NULL);
        if (r < 0)
            return total ? total : r;
        total += r;
        p += n;
        len -= n;
    }
    return total;
}

i64 pv_clock_ns(void) { return pv_call(HC_CLOCK, 0, 0, 0, 0, 0, NULL); }
i64 pv_yield(void) { return pv_call(HC_YIELD, 0, 0, 0, 0, 0, NULL); }
i64 pv_watchdog(u64 ms) { return pv_call(HC_WATCHDOG, ms, 0, 0, 0, 0, NULL); }
i64 pv_channel_notify(u64 idx) { return pv_call(HC_CHANNEL_NOTIFY, idx, 0, 0, 0, 0, NULL); }

i64 pv_generation(u64 *id)
{
    u64 r2 = 0;
    i64 r = pv_call(HC_GENERATION, 0, 0, 0, 0, 0, &r2);
    if (r >= 0 && id)
        *id = r2;
    return r;
}

i64 pv_partition_info(u64 *id, u64 *cpus)
{
    u64 r2 = 0;
    i64 r = pv_call(HC_PARTITION_INFO, 0, 0, 0, 0, 0, &r2);
    if (r >= 0) {
        if (id)
            *id = (u64)r;
        if (cpus)
            *cpus = r2;
    }
    return r;
}

i64 pv_channel_info(u64 idx, u64 *gpa, u64 *size, u32 *flags, u32 *gsi)
{
    u64 r2 = 0;
    i64 r = pv_call(HC_CHANNEL_INFO, idx, 0, 0, 0, 0, &r2);
    if (r < 0)
        return r;
    if (gpa)
        *gpa = (u64)r;
    if (size)
        *size = r2 & 0xFFFFFFFFUL;
    if (flags)
        *flags = (u32)(r2 >> 32) & 0xFF;
    if (gsi)
        *gsi = (u32)(r2 >> 40) & 0xFF;
    return r;
}

/* ------------------------------------------------------------------------------------- */
/* formatting                                                                            */

int pv_vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
    return rt_vsnprintf(buf, n, fmt, ap);
}

int pv_snprintf(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = pv_vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    return r;
}

int pv_printf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int len = pv_vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (len > (int)sizeof(buf) - 1)
        len = sizeof(buf) - 1;
    if (pv_present())
        pv_console_write(buf, (u64)len);
    else
        printf("%s", buf);
    return len;
}

/* ------------------------------------------------------------------------------------- */
/* command line                                                                          */

int pv_cmdline_is(const char *key, const char *value, int dflt)
{
    char buf[64];
    if (!rt_cmdline_str(key, buf, sizeof(buf)))
        return dflt;
    return strlen(buf) == strlen(value) && !memcmp(buf, value, strlen(value));
}

/* ------------------------------------------------------------------------------------- */
/* channels                                                                              */

static void lay_rings(struct pv_chan *c, u8 *base, u64 size, int side)
{
    u64 half = size / 2;
    struct pv_ring *r0 = (struct pv_ring *)base;
    struct pv_ring *r1 = (struct pv_ring *)(base + half);
    c->side = side;
    c->size = size;
    c->nslots = (u32)((half - sizeof(struct pv_ring)) / PV_SLOT_SIZE);
    c->tx = side ? r1 : r0;
    c->rx = side ? r0 : r1;
    c->txslots = (u8 *)(c->tx + 1);
    c->rxslots = (u8 *)(c->rx + 1);
}

int pv_chan_open(struct pv_chan *c, int idx, int side)
{
    u64 gpa = 0, size = 0;
    u32 flags = 0, gsi = 0;
    memset(c, 0, sizeof(*c));
    c->idx = idx;
    i64 r = pv_channel_info((u64)idx, &gpa, &size, &flags, &gsi);
    if (r < 0)
        return (int)r;
    if (size < 4096)
        return -PV_EINVAL;
    c->gpa = gpa;
    c->flags = flags;
    c->gsi = gsi;
    lay_rings(c, (u8 *)gpa, size, side);
    return 0;
}

void pv_chan_open_local(struct pv_chan *c, void *mem, u64 size, int side)
{
    memset(c, 0, sizeof(*c));
    c->idx = -1;
    c->gpa = (u64)mem;
    c->flags = PV_CHAN_CAN_RING;
    lay_rings(c, mem, size, side);
}

void pv_chan_peer_view(struct pv_chan *peer, const struct pv_chan *c)
{
    *peer = *c;
    peer->irqs = 0;
    peer->vector = 0;
    peer->on_irq = NULL;
    peer->peer_vector = c->vector;
    peer->peer_apic = c->dest_apic;
    lay_rings(peer, (u8 *)c->gpa, c->size, !c->side);
}

int pv_chan_send(struct pv_chan *c, const void *buf, u32 len)
{
    if (c->flags & PV_CHAN_READONLY)
        return -PV_EROFS;
    if (len > PV_MSG_MAX)
        return -PV_EMSGSIZE;
    u32 h = c->tx->head;
    if (h - c->tx->tail >= c->nslots)
        return -PV_EAGAIN;
    u8 *s = c->txslots + (u64)(h % c->nslots) * PV_SLOT_SIZE;
    *(volatile u32 *)s = len;
    memcpy(s + 4, buf, len);
    barrier();                  /* slot contents before the index (TSO keeps store order) */
    c->tx->head = h + 1;
    return 0;
}

int pv_chan_recv(struct pv_chan *c, void *buf, u32 max)
{
    u32 t = c->rx->tail;
    u32 h = c->rx->head;
    if (h == t)
        return -PV_EAGAIN;
    if (h - t > c->nslots) {    /* the producer restarted with other indices: resync */
        c->rx->tail = h;
        return -PV_EAGAIN;
    }
    barrier();                  /* index before the slot contents */
    const u8 *s = c->rxslots + (u64)(t % c->nslots) * PV_SLOT_SIZE;
    u32 len = *(volatile const u32 *)s;
    if (len > PV_MSG_MAX)
        len = PV_MSG_MAX;
    memcpy(buf, s + 4, len < max ? len : max);
    barrier();                  /* slot read before the slot is handed back */
    c->rx->tail = t + 1;
    return (int)len;
}

static void send_ipi(u8 apic, u8 vector)
{
    lapic_write(LAPIC_ICR_HI, (u32)apic << 24);
    lapic_write(LAPIC_ICR_LO, vector);      /* fixed, physical, edge */
}

int pv_chan_kick(struct pv_chan *c)
{
    if (c->idx < 0) {
        if (c->peer_vector)
            send_ipi(c->peer_apic, c->peer_vector);
        return 0;
    }
    if (c->relay)
        return (int)pv_channel_notify((u64)c->idx);
    pv_doorbell((u32)c->idx);
    return 0;
}

static struct pv_chan *vec_chan[256];

static void doorbell_irq(struct trap_frame *tf)
{
    struct pv_chan *c = vec_chan[tf->vector & 0xFF];
    if (c) {
        c->irqs++;
        if (c->on_irq)
            c->on_irq(c);
    }
    lapic_eoi();
}

void pv_chan_route_irq(struct pv_chan *c, u8 vector, u8 dest_apic)
{
    c->vector = vector;
    c->dest_apic = dest_apic;
    vec_chan[vector] = c;
    rt_set_handler(vector, doorbell_irq);
    if (c->idx >= 0 && c->gsi < 24)
        ioapic_route((int)c->gsi, vector, dest_apic);
}

/* ------------------------------------------------------------------------------------- */
/* helpers                                                                               */

static void sleep_irq(struct trap_frame *tf)
{
    (void)tf;
    lapic_eoi();
}

int pv_wait_until(int (*cond)(void *), void *arg, u64 timeout_us)
{
    u64 khz = rt_tsc_khz();
    u64 deadline = rdtsc() + timeout_us * khz / 1000;
    u64 per10ms = rt_lapic_ticks_10ms ? rt_lapic_ticks_10ms : 625000;
    u64 flags;
    __asm__ volatile("pushfq; popq %0; cli" : "=r"(flags) : : "memory");
    rt_set_handler(PV_SLEEP_VECTOR, sleep_irq);
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, PV_SLEEP_VECTOR);  /* one-shot */
    int ok = 0;
    for (;;) {
        if (cond && cond(arg)) {
            ok = 1;
            break;
        }
        u64 now = rdtsc();
        if (now >= deadline)
            break;
        u64 us = (deadline - now) * 1000 / khz + 1;
        if (us > 10000)
            us = 10000;         /* re-check cond at least every 10 ms */
        u64 count = us * per10ms / 10000 + 1;
        lapic_write(LAPIC_TIMER_INIT, count > 0xFFFFFFFFUL ? 0xFFFFFFFFU : (u32)count);
        __asm__ volatile("sti; hlt; cli" : : : "memory");
    }
    lapic_write(LAPIC_TIMER_INIT, 0);
    if (flags & 0x200)
        sti();
    return ok;
}

u64 pv_tsc_to_ns(u64 tsc)
{
    u64 khz = rt_tsc_khz();
    /* tsc * 1e6 / khz without overflow for deltas up to hours */
    return tsc / khz * 1000000 + (tsc % khz) * 1000000 / khz;
}

static void sift(u64 *a, u64 i, u64 n)
{
    for (;;) {
        u64 l = 2 * i + 1, m = i;
        if (l < n && a[l] > a[m])
            m = l;
        if (l + 1 < n && a[l + 1] > a[m])
            m = l + 1;
        if (m == i)
            return;
        u64 t = a[i];
        a[i] = a[m];
        a[m] = t;
        i = m;
    }
}

void pv_sort_u64(u64 *a, u64 n)
{
    if (n < 2)
        return;
    for (u64 i = n / 2; i-- > 0;)
        sift(a, i, n);
    for (u64 e = n - 1; e > 0; e--) {
        u64 t = a[0];
        a[0] = a[e];
        a[e] = t;
        sift(a, 0, e);
    }
}
