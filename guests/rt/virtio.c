/*
 * Bare-metal virtio-mmio (version 2) drivers: discovery from the command line, feature
 * negotiation, split virtqueues with polled completion, and blk / net / rng on top.
 * See virtio.h for the conventions; virtio 1.x spec sections in the comments.
 */
#include "virtio.h"

/* virtio-mmio registers (4.2.2) */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_VENDOR_ID 0x00C
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0A0
#define R_QUEUE_DEVICE_HIGH 0x0A4
#define R_CONFIG 0x100

#define MMIO_MAGIC 0x74726976   /* "virt" */
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define VQ_AVAIL_F_NO_INTERRUPT 1
#define VQ_USED_F_NO_NOTIFY 1

static inline u32 rd(struct vio_dev *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void wr(struct vio_dev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ------------------------------------------------------------------------------------- */
/* command line                                                                          */

u64 vio_parse_size(const char *s, const char **end)
{
    u64 v = 0;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        unsigned dgt;
        if (*s >= '0' && *s <= '9')
            dgt = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            dgt = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            dgt = *s - 'A' + 10;
        else
            break;
        v = v * base + dgt;
    }
    switch (*s) {
    case 'k': case 'K': v <<= 10; s++; break;
    case 'm': case 'M': v <<= 20; s++; break;
    case 'g': case 'G': v <<= 30; s++; break;
    default: break;
    }
    if (end)
        *end = s;
    return v;
}

extern char __image_end[];

void *vio_ram_after_image(u64 len)
{
    u64 a = ((u64)__image_end + 0x1FFFFF) & ~0x1FFFFFUL;
    return a + len <= rt_mem_kib() * 1024 ? (void *)a : NULL;
}

/* ------------------------------------------------------------------------------------- */
/* discovery                                                                             */

struct vio_dev vio_devs[VIO_MAX_DEVS];
int vio_ndevs = -1;

/* One "SIZE@ADDR:IRQ[:ID]" value (Linux's virtio_mmio.device= syntax). */
static void add_window(const char *v)
{
    const char *p;
    u64 size = vio_parse_size(v, &p);
    if (*p != '@')
        return;
    u64 base = vio_parse_size(p + 1, &p);
    if (*p != ':')
        return;
    u64 irq = vio_parse_size(p + 1, &p);
    if (!size || !base || vio_ndevs >= VIO_MAX_DEVS)
        return;
    struct vio_dev *d = &vio_devs[vio_ndevs];
    d->base = base;
    d->size = (u32)size;
    d->irq = (u32)irq;
    if (rd(d, R_MAGIC) != MMIO_MAGIC)
        return;
    d->version = rd(d, R_VERSION);
    d->device_id = rd(d, R_DEVICE_ID);
    d->vendor_id = rd(d, R_VENDOR_ID);
    if (d->device_id == 0)
        return;                                 /* an empty slot (QEMU's placeholders) */
    vio_ndevs++;
}

int vio_discover(void)
{
    if (vio_ndevs >= 0)
        return vio_ndevs;
    vio_ndevs = 0;
    static const char key[] = "virtio_mmio.device=";
    const size_t klen = sizeof(key) - 1;
    const char *s = rt_cmdline();
    while (*s) {
        while (*s == ' ')
            s++;
        if (!memcmp(s, key, klen))
            add_window(s + klen);
        while (*s && *s != ' ')
            s++;
    }
    return vio_ndevs;
}

struct vio_dev *vio_find(u32 device_id, int nth)
{
    vio_discover();
    for (int i = 0; i < vio_ndevs; i++)
        if (vio_devs[i].device_id == device_id && nth-- == 0)
            return &vio_devs[i];
    return NULL;
}

u32 vio_status(struct vio_dev *d) { return rd(d, R_STATUS); }
u32 vio_config32(struct vio_dev *d, u32 off) { return rd(d, R_CONFIG + off); }
u8 vio_config8(struct vio_dev *d, u32 off) { return *(volatile u8 *)(d->base + R_CONFIG + off); }

/* 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (read back). */
int vio_init(struct vio_dev *d, u64 want, const char *who)
{
    if (d->version != 2) {
        printf("%s: virtio-mmio version %u at %lx is not supported (QEMU: "
               "-global virtio-mmio.force-legacy=false)\n", who, d->version, d->base);
        return -1;
    }
    wr(d, R_STATUS, 0);
    for (int i = 0; i < 1000 && rd(d, R_STATUS); i++)
        cpu_relax();
    wr(d, R_STATUS, S_ACKNOWLEDGE);
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(d, R_DEVICE_FEATURES_SEL, 0);
    u64 f = rd(d, R_DEVICE_FEATURES);
    wr(d, R_DEVICE_FEATURES_SEL, 1);
    f |= (u64)rd(d, R_DEVICE_FEATURES) << 32;
    d->offered = f;
    if (!(f & VIRTIO_F_VERSION_1)) {
        printf("%s: device at %lx does not offer VIRTIO_F_VERSION_1\n", who, d->base);
        wr(d, R_STATUS, S_FAILED);
        return -2;
    }
    d->features = f & (want | VIRTIO_F_VERSION_1);
    wr(d, R_DRIVER_FEATURES_SEL, 0);
    wr(d, R_DRIVER_FEATURES, (u32)d->features);
    wr(d, R_DRIVER_FEATURES_SEL, 1);
    wr(d, R_DRIVER_FEATURES, (u32)(d->features >> 32));
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(rd(d, R_STATUS) & S_FEATURES_OK)) {
        printf("%s: device at %lx refused features %lx\n", who, d->base, d->features);
        wr(d, R_STATUS, S_FAILED);
        return -3;
    }
    return 0;
}

void vio_driver_ok(struct vio_dev *d)
{
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* ------------------------------------------------------------------------------------- */
/* split virtqueues (2.7)                                                                */

#define VIO_POOL_QUEUES 8
/* Per queue: descriptor table, available ring, used ring, one 4 KiB page each (VQ_MAX =
 * 256: 4096, 518 and 2054 bytes). */
static u8 vq_pool[VIO_POOL_QUEUES][3][4096] __attribute__((aligned(4096))) VIO_NOINIT;
static int vq_pool_used;

int vq_setup(struct vio_dev *d, struct virtq *q, u16 index, u16 max_entries)
{
    wr(d, R_QUEUE_SEL, index);
    if (rd(d, R_QUEUE_READY))
        return -1;
    u32 max = rd(d, R_QUEUE_NUM_MAX);
    if (!max || vq_pool_used >= VIO_POOL_QUEUES)
        return -1;
    u32 size = VQ_MAX;
    if (max_entries && max_entries < size)
        size = max_entries;
    while (size > max)
        size >>= 1;
    u8 (*pages)[4096] = vq_pool[vq_pool_used++];
    memset(pages, 0, 3 * 4096);
    q->dev = d;
    q->index = index;
    q->size = (u16)size;
    q->desc = (volatile struct vq_desc *)pages[0];
    q->avail = (volatile u16 *)pages[1];
    q->used = (volatile u16 *)pages[2];
    q->avail_idx = q->last_used = 0;
    q->kicks = 0;
    for (u32 i = 0; i < size; i++)
        q->desc[i].next = (u16)(i + 1);
    q->free_head = 0;
    q->num_free = (u16)size;
    q->avail[0] = VQ_AVAIL_F_NO_INTERRUPT;      /* we poll */
    wr(d, R_QUEUE_NUM, size);
    u64 a = (u64)q->desc, b = (u64)q->avail, c = (u64)q->used;
    wr(d, R_QUEUE_DESC_LOW, (u32)a);
    wr(d, R_QUEUE_DESC_HIGH, (u32)(a >> 32));
    wr(d, R_QUEUE_DRIVER_LOW, (u32)b);
    wr(d, R_QUEUE_DRIVER_HIGH, (u32)(b >> 32));
    wr(d, R_QUEUE_DEVICE_LOW, (u32)c);
    wr(d, R_QUEUE_DEVICE_HIGH, (u32)(c >> 32));
    wr(d, R_QUEUE_READY, 1);
    return 0;
}

int vq_add(struct virtq *q, const struct vq_buf *bufs, int n)
{
    if (n <= 0 || n > q->num_free)
        return -1;
    u16 head = q->free_head, idx = head, last = head;
    for (int i = 0; i < n; i++) {
        volatile struct vq_desc *dsc = &q->desc[idx];
        dsc->addr = (u64)bufs[i].addr;
        dsc->len = bufs[i].len;
        dsc->flags = (u16)((bufs[i].write ? VQ_DESC_F_WRITE : 0) | (i + 1 < n ? VQ_DESC_F_NEXT : 0));
        last = idx;
        idx = dsc->next;
    }
    q->free_head = q->desc[last].next;
    q->num_free -= (u16)n;
    q->avail[2 + q->avail_idx % q->size] = head;
    q->avail_idx++;
    return head;
}

void vq_kick(struct virtq *q)
{
    barrier();                                  /* ring entries before idx (x86 TSO) */
    q->avail[1] = q->avail_idx;
    mb();                                       /* idx visible before we read used.flags */
    if (!(q->used[0] & VQ_USED_F_NO_NOTIFY)) {
        wr(q->dev, R_QUEUE_NOTIFY, q->index);
        q->kicks++;
    }
}

int vq_poll(struct virtq *q, u32 *len)
{
    if (q->used[1] == q->last_used)
        return -1;
    barrier();
    const volatile struct vq_used_elem *ring = (const volatile struct vq_used_elem *)(q->used + 2);
    const volatile struct vq_used_elem *e = &ring[q->last_used % q->size];
    u32 id = e->id;
    if (len)
        *len = e->len;
    q->last_used++;
    if (id >= q->size)
        return -1;
    /* Free the chain. */
    u16 i = (u16)id, n = 1;
    while (q->desc[i].flags & VQ_DESC_F_NEXT) {
        i = q->desc[i].next;
        n++;
    }
    q->desc[i].next = q->free_head;
    q->free_head = (u16)id;
    q->num_free += n;
    return (int)id;
}

int vq_wait(struct virtq *q, u32 *len, u64 timeout_us)
{
    u64 t0 = rdtsc(), limit = timeout_us * rt_tsc_khz() / 1000;
    for (;;) {
        int h = vq_poll(q, len);
        if (h >= 0)
            return h;
        if (rdtsc() - t0 > limit)
            return -1;
        cpu_relax();
    }
}

/* ------------------------------------------------------------------------------------- */
/* virtio-blk (5.2)                                                                      */

int vblk_init(struct vblk *b, struct vio_dev *d)
{
    b->dev = d;
    if (vio_init(d, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, "blk"))
        return -1;
    if (vq_setup(d, &b->q, 0, 0))
        return -2;
    b->capacity = vio_config32(d, 0) | (u64)vio_config32(d, 4) << 32;
    b->readonly = !!(d->features & VIRTIO_BLK_F_RO);
    b->can_flush = !!(d->features & VIRTIO_BLK_F_FLUSH);
    vio_driver_ok(d);
    return 0;
}

int vblk_submit(struct vblk *b, u32 type, u64 sector, void *buf, u32 len)
{
    if (b->q.num_free < 3)
        return -1;
    /* The head is the free head: fill its header before publishing the chain. */
    struct vblk_req *r = &b->req[b->q.free_head];
    r->type = type;
    r->reserved = 0;
    r->sector = sector;
    r->status = 0xFF;
    struct vq_buf bufs[3] = {
        {r, 16, 0},
        {buf, len, type == VIRTIO_BLK_T_IN},
        {&r->status, 1, 1},
    };
    if (len)
        return vq_add(&b->q, bufs, 3);
    bufs[1] = bufs[2];
    return vq_add(&b->q, bufs, 2);
}

int vblk_poll(struct vblk *b) { return vq_poll(&b->q, NULL); }

int vblk_io(struct vblk *b, u32 type, u64 sector, void *buf, u32 len)
{
    int head = vblk_submit(b, type, sector, buf, len);
    if (head < 0)
        return -1;
    vq_kick(&b->q);
    int done = vq_wait(&b->q, NULL, VBLK_TIMEOUT_US);
    if (done < 0)
        return -1;
    return b->req[done].status;
}

/* ------------------------------------------------------------------------------------- */
/* virtio-net (5.1)                                                                      */

static void vnet_post(struct vnet *n, int idx)
{
    struct vq_buf buf = {n->rxbuf[idx], VNET_BUF, 1};
    vq_add(&n->rx, &buf, 1);    /* vnet_rx finds the buffer again by its address */
}

int vnet_init(struct vnet *n, struct vio_dev *d)
{
    n->dev = d;
    n->rx_frames = n->tx_frames = 0;
    if (vio_init(d, VIRTIO_NET_F_MAC, "net"))
        return -1;
    if (vq_setup(d, &n->rx, 0, VNET_RXBUFS) || vq_setup(d, &n->tx, 1, 4))
        return -2;
    static const u8 fallback[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
    for (int i = 0; i < 6; i++)
        n->mac[i] = (d->features & VIRTIO_NET_F_MAC) ? vio_config8(d, i) : fallback[i];
    vio_driver_ok(d);
    for (int i = 0; i < VNET_RXBUFS && i < n->rx.size; i++)
        vnet_post(n, i);
    vq_kick(&n->rx);
    return 0;
}

u8 *vnet_rx(struct vnet *n, u32 *len, int *idx)
{
    u32 l;
    int head = vq_poll(&n->rx, &l);
    if (head < 0)
        return NULL;
    /* Find the buffer by its address (the descriptor still holds it). */
    u64 addr = n->rx.desc[head].addr;
    int i = (int)((addr - (u64)n->rxbuf[0]) / VNET_BUF);
    *idx = i;
    n->rx_frames++;
    if (l < VNET_HDR) {
        *len = 0;
        return n->rxbuf[i] + VNET_HDR;
    }
    *len = l - VNET_HDR;
    return n->rxbuf[i] + VNET_HDR;
}

void vnet_rx_done(struct vnet *n, int idx)
{
    vnet_post(n, idx);
    vq_kick(&n->rx);
}

int vnet_tx(struct vnet *n, const void *frame, u32 len)
{
    if (len > VNET_BUF - VNET_HDR)
        len = VNET_BUF - VNET_HDR;
    memset(n->txbuf, 0, VNET_HDR);
    memcpy(n->txbuf + VNET_HDR, frame, len);
    struct vq_buf buf = {n->txbuf, VNET_HDR + len, 0};
    if (vq_add(&n->tx, &buf, 1) < 0)
        return -1;
    vq_kick(&n->tx);
    if (vq_wait(&n->tx, NULL, 1000000) < 0)
        return -1;
    n->tx_frames++;
    return 0;
}

/* ------------------------------------------------------------------------------------- */
/* virtio-rng (5.4)                                                                      */

int vrng_init(struct vrng *r, struct vio_dev *d)
{
    r->dev = d;
    if (vio_init(d, 0, "rng"))
        return -1;
    if (vq_setup(d, &r->q, 0, 4))
        return -2;
    vio_driver_ok(d);
    return 0;
}

int vrng_read(struct vrng *r, void *buf, u32 len)
{
    u8 *p = buf;
    for (int tries = 0; len && tries < 64; tries++) {
        struct vq_buf b = {p, len, 1};
        if (vq_add(&r->q, &b, 1) < 0)
            return -1;
        vq_kick(&r->q);
        u32 got;
        if (vq_wait(&r->q, &got, 1000000) < 0)
            return -1;
        if (got > len)
            got = len;
        p += got;
        len -= got;
    }
    return len ? -1 : 0;
}
