/*
 * Bare-metal virtio drivers for the test guests: virtio-mmio version 2 and modern
 * virtio-pci (virtio 1.x), split virtqueues, polled completion; blk, net and rng on top.
 *
 * virtio-mmio devices are found the way Linux finds them on x86 without PCI: from the
 * command line's `virtio_mmio.device=SIZE@ADDR:IRQ` entries (corevisor appends one per
 * device; QEMU -M microvm adds them too, but only with acpi=off, and its transports must
 * be told `-global virtio-mmio.force-legacy=false` to speak version 2). Each window is
 * probed (magic "virt", version 2, device ID != 0).
 *
 * virtio-pci devices are found on PCI bus 0: through ECAM when the ACPI tables have an
 * MCFG (corevisor, QEMU q35), else through ports 0xCF8/0xCFC (QEMU -M pc); `pci=cf8`
 * on the command line forces the ports, `pci=off` skips PCI. A modern function
 * (1af4:1040+type) is used through its vendor capabilities (common, notify, ISR and
 * device configuration in memory BARs the firmware or VMM assigned); MSI-X or INTx can
 * be turned on for a queue (vio_pci_msix, vio_pci_intx_line, vio_isr) by a guest that
 * wants interrupts instead of polling.
 *
 * Everything here works at CPL3 as well as CPL0: the registers are plain memory accesses
 * (the runtime's identity map is user-accessible) and completion is polled, so a guest
 * can run its whole I/O loop in user mode (natively on the PVM test host). The driver
 * sets VIRTQ_AVAIL_F_NO_INTERRUPT on every queue: the device need not raise its line.
 * rt_tsc_khz() must have been called once at CPL0 before any timeout below is used.
 *
 * Memory: rings come from a static pool (VIO_POOL_QUEUES queues of up to VQ_MAX entries),
 * buffers are the caller's; guest-physical = virtual (identity map).
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "rt.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

#define VIRTIO_F_VERSION_1 (1UL << 32)
#define VIRTIO_F_EVENT_IDX (1UL << 29)

#define VIO_MAX_DEVS 16
#define VQ_MAX 256              /* entries per queue we use at most */

struct vio_dev {
    u64 base;                   /* MMIO window (virtio-mmio) */
    u32 size;
    u32 irq;                    /* GSI from the command line (IOAPIC pin) */
    u32 version;                /* 2 (1 = legacy: refused) */
    u32 device_id;
    u32 vendor_id;
    u64 offered;                /* device features (after vio_init) */
    u64 features;               /* negotiated */
    /* virtio-pci */
    int pci;                    /* 1: a virtio-pci function (the fields below) */
    u16 bdf;                    /* bus << 8 | device << 3 | function */
    u64 common, isr, devcfg, notify;    /* capability windows in the BARs */
    u32 notify_mul;
    u32 msix_cap;               /* config offset of the MSI-X capability, 0 if none */
    u64 msix_table;
    u32 msix_vectors;
};

struct vq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2

struct vq_used_elem {
    u32 id;
    u32 len;
};

struct virtq {
    struct vio_dev *dev;
    u16 index, size;
    volatile struct vq_desc *desc;
    volatile u16 *avail;        /* flags, idx, ring[size], used_event */
    volatile u16 *used;         /* flags, idx, then struct vq_used_elem ring[size] */
    u16 free_head, num_free;
    u16 avail_idx;              /* next avail idx we publish */
    u16 last_used;              /* used idx we have consumed up to */
    u64 kicks;
    u64 notify;                 /* virtio-pci: the queue's notify address */
};

/* One buffer of a chain: device-readable (write = 0) or device-writable (write = 1). */
struct vq_buf {
    const void *addr;
    u32 len;
    u32 write;
};

/* Big driver/guest buffers that need no zeroing: in the image's never-zeroed .stack area
 * (zeroing .bss is CPL0 work, emulated on the test host). */
#define VIO_NOINIT __attribute__((section(".stack,\"aw\",@nobits#")))

/* RAM past the loaded image, 2 MiB aligned, for len bytes; NULL if RAM is too small.
 * Contents are whatever was there (not zeroed). */
void *vio_ram_after_image(u64 len);

/* ---- command line (the runtime's rt_cmdline) ---- */
/* Copy the value of key=VALUE into out (NUL-terminated); 1 if found, else 0. */
/* "1M", "4K", "512", "0x1000" -> bytes; sets *end past the number (NULL allowed). */
u64 vio_parse_size(const char *s, const char **end);

/* ---- discovery and set-up ---- */
extern struct vio_dev vio_devs[VIO_MAX_DEVS];
extern int vio_ndevs;
int vio_discover(void);                         /* parses the command line once, probes */
struct vio_dev *vio_find(u32 device_id, int nth);
/* Reset, ACKNOWLEDGE|DRIVER, negotiate VERSION_1 | (offered & want), FEATURES_OK.
 * 0 on success, negative on refusal (and prints why, prefixed by who). */
int vio_init(struct vio_dev *d, u64 want, const char *who);
int vq_setup(struct vio_dev *d, struct virtq *q, u16 index, u16 max_entries);
void vio_driver_ok(struct vio_dev *d);
u32 vio_status(struct vio_dev *d);
u32 vio_config32(struct vio_dev *d, u32 off);   /* 32-bit config read */
u8 vio_config8(struct vio_dev *d, u32 off);
/* "virtio-pci 00:01.0 (ECAM)" for a PCI device, "virtio-mmio at ADDR" otherwise. */
const char *vio_where(struct vio_dev *d);

/* ---- virtio-pci interrupts (call between vq_setup and vio_driver_ok) ---- */
/* PCI configuration space of a device (ECAM or 0xCF8, whichever discovery used). */
u32 vio_pci_read32(struct vio_dev *d, u32 off);
void vio_pci_write16(struct vio_dev *d, u32 off, u16 v);
/* Enable MSI-X and send queue q's interrupts as vector (IDT) to local APIC apic through
 * table entry `entry`; 0 ok, -1 if the device has no such entry or refused it. */
int vio_pci_msix(struct vio_dev *d, struct virtq *q, u32 entry, u8 vector, u8 apic);
/* The INTx line firmware (or the VMM) wrote into config space, 0xFF if none. */
u8 vio_pci_intx_line(struct vio_dev *d);
/* Read (and so clear) the ISR: bit 0 used buffers, bit 1 configuration change. */
u8 vio_isr(struct vio_dev *d);
/* Ask the device to interrupt for queue q's used buffers (clears NO_INTERRUPT). */
void vq_want_interrupts(struct virtq *q);

/* ---- split virtqueue ---- */
int vq_add(struct virtq *q, const struct vq_buf *bufs, int n);  /* head, or -1 if full */
void vq_kick(struct virtq *q);                  /* publish + notify (unless suppressed) */
int vq_poll(struct virtq *q, u32 *len);         /* completed head, or -1 */
int vq_wait(struct virtq *q, u32 *len, u64 timeout_us);     /* -1 on timeout */

/* ---- virtio-blk ---- */
#define VIRTIO_BLK_F_RO (1UL << 5)
#define VIRTIO_BLK_F_FLUSH (1UL << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_S_OK 0
#define VBLK_TIMEOUT_US 10000000UL

struct vblk_req {
    u32 type;
    u32 reserved;
    u64 sector;
    u8 status;
} __attribute__((aligned(32)));

struct vblk {
    struct vio_dev *dev;
    struct virtq q;
    u64 capacity;               /* 512-byte sectors */
    int readonly, can_flush;
    struct vblk_req req[VQ_MAX];    /* indexed by the chain's head descriptor */
};

int vblk_init(struct vblk *b, struct vio_dev *d);
/* Asynchronous: queue a request (no kick), returns its head or -1 if the queue is full. */
int vblk_submit(struct vblk *b, u32 type, u64 sector, void *buf, u32 len);
/* One completed request: its head (status in b->req[head].status), or -1 if none yet. */
int vblk_poll(struct vblk *b);
/* Synchronous: one request, kick, wait; returns the virtio status (0 ok), or -1 timeout. */
int vblk_io(struct vblk *b, u32 type, u64 sector, void *buf, u32 len);

/* ---- virtio-net ---- */
#define VIRTIO_NET_F_MAC (1UL << 5)
#define VNET_HDR 12             /* struct virtio_net_hdr_v1 */
#define VNET_RXBUFS 16
#define VNET_BUF 2048

struct vnet {
    struct vio_dev *dev;
    struct virtq rx, tx;
    u8 mac[6];
    u8 rxbuf[VNET_RXBUFS][VNET_BUF] __attribute__((aligned(64)));
    u8 txbuf[VNET_BUF] __attribute__((aligned(64)));
    u64 rx_frames, tx_frames;
};

int vnet_init(struct vnet *n, struct vio_dev *d);
/* A received frame (Ethernet header first, vnet header stripped) or NULL; *idx names the
 * buffer to hand back with vnet_rx_done once the frame has been used. */
u8 *vnet_rx(struct vnet *n, u32 *len, int *idx);
void vnet_rx_done(struct vnet *n, int idx);
/* Transmit one frame (copied) and wait for the device to take it; 0 ok, -1 timeout. */
int vnet_tx(struct vnet *n, const void *frame, u32 len);

/* ---- virtio-rng ---- */
struct vrng {
    struct vio_dev *dev;
    struct virtq q;
};
int vrng_init(struct vrng *r, struct vio_dev *d);
/* Fill buf with len random bytes (several requests if the device gives fewer); 0 ok. */
int vrng_read(struct vrng *r, void *buf, u32 len);

#endif
