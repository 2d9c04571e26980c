/*
 * Bare-metal virtio drivers over virtio-mmio (version 2) and modern virtio-pci:
 * discovery (the command line; PCI bus 0 through ECAM or 0xCF8), feature negotiation,
 * split virtqueues with polled completion, and blk / net / rng on top. See virtio.h
 * for the conventions; virtio 1.x spec sections in the comments.
 */
#include "virtio.h"
#include "pci.h"

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
static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }

/* virtio-pci common configuration (4.1.4.3) */
#define C_DFSELECT 0x00
#define C_DF 0x04
#define C_GFSELECT 0x08
#define C_GF 0x0C
#define C_MSIX_CONFIG 0x10
#define C_NUM_QUEUES 0x12
#define C_STATUS 0x14
#define C_Q_SELECT 0x16
#define C_Q_SIZE 0x18
#define C_Q_MSIX 0x1A
#define C_Q_ENABLE 0x1C
#define C_Q_NOTIFY_OFF 0x1E
#define C_Q_DESC 0x20
#define C_Q_DRIVER 0x28
#define C_Q_DEVICE 0x30
#define NO_VECTOR 0xFFFF

/* The device status register, of either transport. */
static u32 status_read(struct vio_dev *d) { return d->pci ? rd8(d->common + C_STATUS) : rd(d, R_STATUS); }
static void status_write(struct vio_dev *d, u32 v)
{
    if (d->pci)
        wr8(d->common + C_STATUS, (u8)v);
    else
        wr(d, R_STATUS, v);
}

/* 32 bits of the device's (or the driver's) features, word sel. */
static u32 features_read(struct vio_dev *d, u32 sel)
{
    if (!d->pci) {
        wr(d, R_DEVICE_FEATURES_SEL, sel);
        return rd(d, R_DEVICE_FEATURES);
    }
    mmio_write32(d->common + C_DFSELECT, sel);
    return mmio_read32(d->common + C_DF);
}

static void features_write(struct vio_dev *d, u32 sel, u32 v)
{
    if (!d->pci) {
        wr(d, R_DRIVER_FEATURES_SEL, sel);
        wr(d, R_DRIVER_FEATURES, v);
        return;
    }
    mmio_write32(d->common + C_GFSELECT, sel);
    mmio_write32(d->common + C_GF, v);
}

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

/* ---- PCI bus 0 (ECAM when the ACPI tables have an MCFG, else 0xCF8/0xCFC) ---- */

#define PCI_VENDOR_VIRTIO 0x1AF4
#define PCI_DEVICE_MODERN 0x1040
#define VCAP_COMMON 1
#define VCAP_NOTIFY 2
#define VCAP_ISR 3
#define VCAP_DEVICE 4

static u32 cfg_read32(u16 bdf, u32 off) { return pci_read32(bdf, off); }
static void cfg_write16(u16 bdf, u32 off, u16 v) { pci_write16(bdf, off, v); }
static u8 cfg_read8(u16 bdf, u32 off) { return pci_read8(bdf, off); }
static u64 bar_address(u16 bdf, u32 bar) { return pci_bar_address(bdf, bar); }

u32 vio_pci_read32(struct vio_dev *d, u32 off) { return cfg_read32(d->bdf, off); }
void vio_pci_write16(struct vio_dev *d, u32 off, u16 v) { cfg_write16(d->bdf, off, v); }

/* One modern virtio-pci function: its capabilities, its BARs enabled. */
static void add_pci(u16 bdf, u32 id)
{
    if (vio_ndevs >= VIO_MAX_DEVS)
        return;
    struct vio_dev *d = &vio_devs[vio_ndevs];
    memset(d, 0, sizeof(*d));
    d->pci = 1;
    d->bdf = bdf;
    d->device_id = id - PCI_DEVICE_MODERN;
    d->vendor_id = PCI_VENDOR_VIRTIO;
    d->version = 2;
    cfg_write16(bdf, 0x04, (u16)(cfg_read32(bdf, 0x04) | 0x6));     /* memory, bus master */
    int ok = 0;
    u32 id_next;
    for (u32 cap = cfg_read8(bdf, 0x34) & 0xFC, n = 0; cap && n < 48;
         cap = (id_next >> 8) & 0xFC, n++) {
        id_next = cfg_read32(bdf, cap);
        if ((id_next & 0xFF) == PCI_CAP_MSIX) {
            u32 table = cfg_read32(bdf, cap + 4);
            d->msix_cap = cap;
            d->msix_vectors = ((id_next >> 16) & 0x7FF) + 1;
            d->msix_table = bar_address(bdf, table & 7) + (table & ~7u);
        } else if ((id_next & 0xFF) == PCI_CAP_VENDOR) {
            u32 w = cfg_read32(bdf, cap), type = (w >> 24) & 0xFF;
            u32 bar = cfg_read32(bdf, cap + 4) & 0xFF, off = cfg_read32(bdf, cap + 8);
            u64 base = bar_address(bdf, bar);
            u64 at = base + off;
            if (!base || at >= (4UL << 30))
                continue;                       /* not assigned, or beyond our identity map */
            if (type == VCAP_COMMON)
                d->common = at, ok |= 1;
            else if (type == VCAP_NOTIFY)
                d->notify = at, d->notify_mul = cfg_read32(bdf, cap + 16), ok |= 2;
            else if (type == VCAP_ISR)
                d->isr = at, ok |= 4;
            else if (type == VCAP_DEVICE)
                d->devcfg = at, ok |= 8;
        }
    }
    if (ok == 15)
        vio_ndevs++;
}

static void scan_pci(void)
{
    if (pci_init() < 0)
        return;
    for (u32 dev = 0; dev < 32; dev++) {
        u32 id = cfg_read32((u16)(dev << 3), 0);
        u32 device = id >> 16;
        if ((id & 0xFFFF) == PCI_VENDOR_VIRTIO && device >= PCI_DEVICE_MODERN &&
            device < PCI_DEVICE_MODERN + 0x40)
            add_pci((u16)(dev << 3), device);
    }
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
    scan_pci();
    return vio_ndevs;
}

static void fmt(char *buf, size_t n, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    rt_vsnprintf(buf, n, f, ap);
    va_end(ap);
}

const char *vio_where(struct vio_dev *d)
{
    static char buf[48];
    if (!d->pci)
        fmt(buf, sizeof(buf), "virtio-mmio at %lx", d->base);
    else
        fmt(buf, sizeof(buf), "virtio-pci %02x:%02x.%x (%s)", d->bdf >> 8, (d->bdf >> 3) & 31,
            d->bdf & 7, pci_uses_ports() ? "0xCF8" : "ECAM");
    return buf;
}

int vio_pci_msix(struct vio_dev *d, struct virtq *q, u32 entry, u8 vector, u8 apic)
{
    if (!d->pci || !d->msix_cap || entry >= d->msix_vectors || !d->msix_table)
        return -1;
    u64 e = d->msix_table + 16 * entry;
    mmio_write32(e + 0, 0xFEE00000u | (u32)apic << 12);  /* address: this local APIC */
    mmio_write32(e + 4, 0);
    mmio_write32(e + 8, vector);                         /* fixed, edge */
    mmio_write32(e + 12, 0);                             /* unmasked */
    u32 ctrl = cfg_read32(d->bdf, d->msix_cap) >> 16;
    cfg_write16(d->bdf, d->msix_cap + 2, (u16)((ctrl | 0x8000) & ~0x4000));   /* enable */
    wr16(d->common + C_Q_SELECT, q->index);
    wr16(d->common + C_Q_MSIX, (u16)entry);
    return rd16(d->common + C_Q_MSIX) == entry ? 0 : -1;
}

u8 vio_pci_intx_line(struct vio_dev *d) { return d->pci ? cfg_read8(d->bdf, 0x3C) : 0xFF; }

u8 vio_isr(struct vio_dev *d) { return d->pci ? rd8(d->isr) : (u8)rd(d, R_INTERRUPT_STATUS); }

void vq_want_interrupts(struct virtq *q) { q->avail[0] = 0; }

struct vio_dev *vio_find(u32 device_id, int nth)
{
    vio_discover();
    for (int i = 0; i < vio_ndevs; i++)
        if (vio_devs[i].device_id == device_id && nth-- == 0)
            return &vio_devs[i];
    return NULL;
}

u32 vio_status(struct vio_dev *d) { return status_read(d); }
u32 vio_config32(struct vio_dev *d, u32 off)
{
    return d->pci ? mmio_read32(d->devcfg + off) : rd(d, R_CONFIG + off);
}
u8 vio_config8(struct vio_dev *d, u32 off)
{
    return d->pci ? rd8(d->devcfg + off) : *(volatile u8 *)(d->base + R_CONFIG + off);
}

/* 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (read back). */
int vio_init(struct vio_dev *d, u64 want, const char *who)
{
    if (d->version != 2) {
        printf("%s: virtio-mmio version %u at %lx is not supported (QEMU: "
               "-global virtio-mmio.force-legacy=false)\n", who, d->version, d->base);
        return -1;
    }
    status_write(d, 0);
    for (int i = 0; i < 1000 && status_read(d); i++)
        cpu_relax();
    status_write(d, S_ACKNOWLEDGE);
    status_write(d, S_ACKNOWLEDGE | S_DRIVER);
    u64 f = features_read(d, 0);
    f |= (u64)features_read(d, 1) << 32;
    d->offered = f;
    if (!(f & VIRTIO_F_VERSION_1)) {
        printf("%s: %s does not offer VIRTIO_F_VERSION_1\n", who, vio_where(d));
        status_write(d, S_FAILED);
        return -2;
    }
    d->features = f & (want | VIRTIO_F_VERSION_1);
    features_write(d, 0, (u32)d->features);
    features_write(d, 1, (u32)(d->features >> 32));
    status_write(d, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(status_read(d) & S_FEATURES_OK)) {
        printf("%s: %s refused features %lx\n", who, vio_where(d), d->features);
        status_write(d, S_FAILED);
        return -3;
    }
    return 0;
}

void vio_driver_ok(struct vio_dev *d)
{
    status_write(d, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* ------------------------------------------------------------------------------------- */
/* split virtqueues (2.7)                                                                */

#define VIO_POOL_QUEUES 8
/* Per queue: descriptor table, available ring, used ring, one 4 KiB page each (VQ_MAX =
 * 256: 4096, 518 and 2054 bytes). */
static u8 vq_pool[VIO_POOL_QUEUES][3][4096] __attribute__((aligned(4096))) VIO_NOINIT;
static int vq_pool_used;

/* The virtio-pci half of vq_setup: select the queue, write its layout, enable it. */
static void pci_queue_layout(struct vio_dev *d, struct virtq *q)
{
    u64 c = d->common, a = (u64)q->desc, b = (u64)q->avail, u = (u64)q->used;
    wr16(c + C_Q_SIZE, q->size);
    mmio_write32(c + C_Q_DESC, (u32)a);
    mmio_write32(c + C_Q_DESC + 4, (u32)(a >> 32));
    mmio_write32(c + C_Q_DRIVER, (u32)b);
    mmio_write32(c + C_Q_DRIVER + 4, (u32)(b >> 32));
    mmio_write32(c + C_Q_DEVICE, (u32)u);
    mmio_write32(c + C_Q_DEVICE + 4, (u32)(u >> 32));
    q->notify = d->notify + (u64)rd16(c + C_Q_NOTIFY_OFF) * d->notify_mul;
    wr16(c + C_Q_ENABLE, 1);
}

int vq_setup(struct vio_dev *d, struct virtq *q, u16 index, u16 max_entries)
{
    u32 max;
    if (d->pci) {
        wr16(d->common + C_Q_SELECT, index);
        if (rd16(d->common + C_Q_ENABLE))
            return -1;
        max = rd16(d->common + C_Q_SIZE);
    } else {
        wr(d, R_QUEUE_SEL, index);
        if (rd(d, R_QUEUE_READY))
            return -1;
        max = rd(d, R_QUEUE_NUM_MAX);
    }
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
    if (d->pci) {
        pci_queue_layout(d, q);
        return 0;
    }
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
        if (q->dev->pci)
            wr16(q->notify, q->index);
        else
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
