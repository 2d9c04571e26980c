/*
 * blk: the first virtio-blk device, driven from CPL3 with polled completion.
 *
 *   mode=check [start=8 sectors=64]  prints sector 0 (a string the host put there),
 *       writes a pattern over sectors [start, start+sectors) in requests of 1, 2, 4, 8
 *       and 16 sectors all in flight at once, flushes, reads the range back in one
 *       request and verifies it, and checks that a read past the end fails.
 *       Word k (0..63) of sector s is (s * 64 + k) * 0x9E3779B97F4A7C15 + 1 (mod 2^64).
 *       With irq=msix or irq=intx (a virtio-pci disk), four more reads then complete by
 *       interrupt instead of polling: through an MSI-X vector, or through INTx on the
 *       IOAPIC line the firmware (or the VMM) wrote into config space, level-triggered,
 *       the ISR read in the handler.
 *   mode=rounds [rounds=10 start=8 sectors=64 period=50]  round r first reads the range
 *       back and checks it holds round r-1's pattern (r > 1), then writes round r's,
 *       flushes and prints "blk: round r ok"; then spins period ms. A guest restored
 *       from a snapshot mid-run thus checks the disk it finds against its RAM's idea.
 *   mode=bench seq=1M | rand=4K  [ops=N write=0|1 qd=1 warm=2]  N requests of that size,
 *       sequential (wrapping at the end of the disk) or at random aligned offsets, timed
 *       with the TSC; qd requests kept in flight.
 *   A virtio-pci disk is announced first: "blk: virtio-pci 00:01.0 (ECAM)".
 */
#include "rt/rt.h"
#include "rt/virtio.h"

static struct vblk blk;

static u64 pattern(u64 sector, u64 k) { return (sector * 64 + k) * 0x9E3779B97F4A7C15UL + 1; }

static u64 check(u64 start, u64 n, u8 *buf)
{
    static u8 s0[512] __attribute__((aligned(512)));
    int st = vblk_io(&blk, VIRTIO_BLK_T_IN, 0, s0, 512);
    if (st) {
        printf("blk: reading sector 0 failed (status %d)\n", st);
        return 1;
    }
    char text[65];
    int i = 0;
    while (i < 64 && s0[i] >= 0x20 && s0[i] < 0x7F) {
        text[i] = (char)s0[i];
        i++;
    }
    text[i] = 0;
    printf("blk: sector 0 \"%s\"\n", text);
    if (start + n > blk.capacity || start == 0) {
        printf("blk: range %lu+%lu does not fit a %lu-sector disk above sector 0\n", start, n,
               blk.capacity);
        return 1;
    }
    u64 *w = (u64 *)buf;
    for (u64 s = 0; s < n; s++)
        for (u64 k = 0; k < 64; k++)
            w[s * 64 + k] = pattern(start + s, k);
    /* Writes of 1, 2, 4, 8, 16, 1, ... sectors, all queued before one kick. */
    int pending = 0;
    u64 s = 0, size = 1;
    while (s < n) {
        u64 len = size < n - s ? size : n - s;
        if (vblk_submit(&blk, VIRTIO_BLK_T_OUT, start + s, buf + s * 512, (u32)(len * 512)) < 0) {
            vq_kick(&blk.q);
            while (pending) {
                int h = vq_wait(&blk.q, NULL, VBLK_TIMEOUT_US);
                if (h < 0 || blk.req[h].status) {
                    printf("blk: write failed (status %d)\n", h < 0 ? -1 : blk.req[h].status);
                    return 1;
                }
                pending--;
            }
            continue;
        }
        pending++;
        s += len;
        size = size == 16 ? 1 : size * 2;
    }
    vq_kick(&blk.q);
    while (pending) {
        int h = vq_wait(&blk.q, NULL, VBLK_TIMEOUT_US);
        if (h < 0 || blk.req[h].status) {
            printf("blk: write failed (status %d)\n", h < 0 ? -1 : blk.req[h].status);
            return 1;
        }
        pending--;
    }
    if (blk.can_flush) {
        st = vblk_io(&blk, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
        if (st) {
            printf("blk: flush failed (status %d)\n", st);
            return 1;
        }
    } else {
        printf("blk: device offers no flush\n");
    }
    memset(buf, 0, n * 512);
    st = vblk_io(&blk, VIRTIO_BLK_T_IN, start, buf, (u32)(n * 512));
    if (st) {
        printf("blk: read back failed (status %d)\n", st);
        return 1;
    }
    for (s = 0; s < n; s++)
        for (u64 k = 0; k < 64; k++)
            if (w[s * 64 + k] != pattern(start + s, k)) {
                printf("blk: mismatch at sector %lu word %lu: %lx\n", start + s, k, w[s * 64 + k]);
                return 1;
            }
    st = vblk_io(&blk, VIRTIO_BLK_T_IN, blk.capacity, buf, 512);
    if (st != 1) {
        printf("blk: read past the end gave status %d, not IOERR (1)\n", st);
        return 1;
    }
    printf("blk: ok %lu sectors\n", n);
    return 0;
}

#define IRQ_VECTOR 0x45
static volatile u64 irq_count;
static volatile int irq_intx;

static void blk_irq(struct trap_frame *tf)
{
    (void)tf;
    if (irq_intx)
        vio_isr(blk.dev);                       /* reading the ISR lowers INTx (4.1.4.5) */
    irq_count++;
    lapic_eoi();
}

/* Four reads of sector 0 completed by interrupts (MSI-X or INTx), not by polling. */
static u64 irq_test(const char *mode, u8 *buf)
{
    struct vio_dev *d = blk.dev;
    u8 apic = (u8)lapic_id();
    if (!memcmp(mode, "msix", 5)) {
        if (vio_pci_msix(d, &blk.q, 1, IRQ_VECTOR, apic)) {
            printf("blk: the device has no MSI-X vector 1\n");
            return 1;
        }
    } else if (!memcmp(mode, "intx", 5)) {
        u8 line = vio_pci_intx_line(d);
        if (line >= 24) {
            printf("blk: no INTx line in config space (%u)\n", line);
            return 1;
        }
        irq_intx = 1;
        ioapic_route_level(line, IRQ_VECTOR, apic);
        printf("blk: intx line %u\n", line);
    } else {
        printf("blk: unknown irq=%s (msix or intx)\n", mode);
        return 1;
    }
    vq_want_interrupts(&blk.q);
    u64 limit = VBLK_TIMEOUT_US * rt_tsc_khz() / 1000;
    for (int i = 0; i < 4; i++) {
        u64 seen = irq_count, t0 = rdtsc();
        if (vblk_submit(&blk, VIRTIO_BLK_T_IN, 0, buf, 512) < 0)
            return 1;
        vq_kick(&blk.q);
        while (irq_count == seen) {
            if (rdtsc() - t0 > limit) {
                printf("blk: no %s interrupt for request %d\n", mode, i);
                return 1;
            }
            cpu_relax();
        }
        int h = vblk_poll(&blk);
        if (h < 0 || blk.req[h].status) {
            printf("blk: interrupt without a completed request (%d)\n", h);
            return 1;
        }
    }
    printf("blk: %s: 4 requests completed by %lu interrupts\n", mode, irq_count);
    return 0;
}

static u64 rpattern(u64 r, u64 sector, u64 k) { return pattern(sector, k) ^ r * 0xD1B54A32D192ED03UL; }

static u64 rounds(u64 n_rounds, u64 start, u64 n, u64 period, u8 *buf)
{
    u64 *w = (u64 *)buf;
    u64 khz = rt_tsc_khz();
    if (start + n > blk.capacity || start == 0) {
        printf("blk: range %lu+%lu does not fit the disk above sector 0\n", start, n);
        return 1;
    }
    for (u64 r = 1; r <= n_rounds; r++) {
        if (r > 1) {
            int st = vblk_io(&blk, VIRTIO_BLK_T_IN, start, buf, (u32)(n * 512));
            if (st) {
                printf("blk: round %lu: read failed (status %d)\n", r, st);
                return 1;
            }
            for (u64 s = 0; s < n; s++)
                for (u64 k = 0; k < 64; k++)
                    if (w[s * 64 + k] != rpattern(r - 1, start + s, k)) {
                        printf("blk: round %lu: sector %lu word %lu is %lx, not round %lu's\n",
                               r, start + s, k, w[s * 64 + k], r - 1);
                        return 1;
                    }
        }
        for (u64 s = 0; s < n; s++)
            for (u64 k = 0; k < 64; k++)
                w[s * 64 + k] = rpattern(r, start + s, k);
        int st = vblk_io(&blk, VIRTIO_BLK_T_OUT, start, buf, (u32)(n * 512));
        if (!st && blk.can_flush)
            st = vblk_io(&blk, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
        if (st) {
            printf("blk: round %lu: write failed (status %d)\n", r, st);
            return 1;
        }
        printf("blk: round %lu ok\n", r);
        u64 until = rdtsc() + period * khz;
        while (rdtsc() < until)
            cpu_relax();
    }
    return 0;
}

static u64 bench(u8 *buf, u64 bs, int rnd, u64 ops, int write, u64 qd, u64 warm)
{
    u64 blocks = blk.capacity * 512 / bs;
    if (!blocks) {
        printf("blk: disk smaller than one %lu-byte block\n", bs);
        return 1;
    }
    if (write)
        for (u64 i = 0; i < bs * qd / 8; i++)
            ((u64 *)buf)[i] = i * 0x9E3779B97F4A7C15UL;
    u64 lcg = 0x2545F4914F6CDD1DUL, next = 0, submitted = 0, done = 0, total = warm + ops;
    u64 t0 = 0, khz = rt_tsc_khz();
    u32 type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    if (warm == 0)
        t0 = rdtsc();
    while (done < total) {
        int queued = 0;
        while (submitted < total && submitted - done < qd) {
            u64 block;
            if (rnd) {
                lcg = lcg * 6364136223846793005UL + 1442695040888963407UL;
                block = (lcg >> 17) % blocks;
            } else {
                block = next++ % blocks;
            }
            /* Buffer slots may be shared by out-of-order requests: the data is not used. */
            u64 slot = submitted % qd;
            if (vblk_submit(&blk, type, block * bs / 512, buf + slot * bs, (u32)bs) < 0)
                break;
            submitted++;
            queued = 1;
        }
        if (queued)
            vq_kick(&blk.q);
        int h = vq_wait(&blk.q, NULL, VBLK_TIMEOUT_US);
        if (h < 0) {
            printf("blk: request timed out after %lu done\n", done);
            return 1;
        }
        if (blk.req[h].status) {
            printf("blk: request failed (status %d)\n", blk.req[h].status);
            return 1;
        }
        done++;
        if (done == warm)
            t0 = rdtsc();
    }
    u64 ticks = rdtsc() - t0;
    u64 us = ticks * 1000 / khz;
    if (!us)
        us = 1;
    u64 bytes = ops * bs;
    u64 mbps10 = bytes * 10 / us;                   /* MB/s (10^6 bytes), one decimal */
    u64 iops10 = ops * 10000000UL / us;
    printf("blk: %s-%s bytes=%lu us=%lu MB/s=%lu.%lu iops=%lu.%lu\n", rnd ? "rand" : "seq",
           write ? "write" : "read", bytes, us, mbps10 / 10, mbps10 % 10, iops10 / 10,
           iops10 % 10);
    return 0;
}

/* n sectors' worth of buffers after the image, or NULL (said why) for a bad n or no room. */
static u8 *buffers(u64 n)
{
    if (n == 0 || n > 2048) {
        printf("blk: sectors=%lu out of range 1..2048\n", n);
        return NULL;
    }
    u8 *buf = vio_ram_after_image(n * 512);
    if (!buf)
        printf("blk: not enough RAM for the buffers\n");
    return buf;
}

static u64 user_main(u64 arg)
{
    (void)arg;
    struct vio_dev *d = vio_find(VIRTIO_ID_BLOCK, 0);
    if (!d) {
        printf("blk: no virtio-blk device (%d virtio-mmio devices on the command line)\n",
               vio_ndevs);
        return 2;
    }
    if (d->pci)
        printf("blk: %s\n", vio_where(d));
    if (vblk_init(&blk, d)) {
        printf("blk: %s did not initialise\n", vio_where(d));
        return 2;
    }
    printf("blk: capacity %lu sectors%s\n", blk.capacity, blk.readonly ? " (read-only)" : "");
    char mode[16] = "check", v[32];
    rt_cmdline_str("mode", mode, sizeof(mode));
    if (!memcmp(mode, "check", 6)) {
        u64 start = rt_cmdline_uint("start", 8), n = rt_cmdline_uint("sectors", 64);
        u8 *buf = buffers(n);
        if (!buf)
            return 1;
        u64 bad = check(start, n, buf);
        if (!bad && rt_cmdline_str("irq", v, sizeof(v)))
            bad = irq_test(v, buf);
        return bad;
    }
    if (!memcmp(mode, "rounds", 7)) {
        u64 n = rt_cmdline_uint("sectors", 64);
        u8 *buf = buffers(n);
        if (!buf)
            return 1;
        return rounds(rt_cmdline_uint("rounds", 10), rt_cmdline_uint("start", 8), n,
                      rt_cmdline_uint("period", 50), buf);
    }
    if (!memcmp(mode, "bench", 6)) {
        int rnd = 0;
        u64 bs;
        if (rt_cmdline_str("rand", v, sizeof(v))) {
            rnd = 1;
            bs = vio_parse_size(v, NULL);
        } else {
            bs = rt_cmdline_str("seq", v, sizeof(v)) ? vio_parse_size(v, NULL) : 1 << 20;
        }
        u64 qd = rt_cmdline_uint("qd", 1);
        if (bs == 0 || bs % 512 || bs > (4 << 20) || qd == 0 || qd > 64) {
            printf("blk: block size %lu / qd %lu out of range\n", bs, qd);
            return 1;
        }
        u8 *buf = vio_ram_after_image(bs * qd);
        if (!buf) {
            printf("blk: not enough RAM for %lu x %lu bytes of buffers\n", qd, bs);
            return 1;
        }
        return bench(buf, bs, rnd, rt_cmdline_uint("ops", 100), (int)rt_cmdline_uint("write", 0),
                     qd, rt_cmdline_uint("warm", 2));
    }
    printf("blk: unknown mode=%s (check, rounds or bench)\n", mode);
    return 1;
}

int main(void)
{
    rt_tsc_khz();                                   /* calibrate at CPL0 */
    char v[8];
    if (rt_cmdline_str("irq", v, sizeof(v))) {      /* interrupts arrive at CPL3 */
        lapic_enable();
        rt_set_handler(IRQ_VECTOR, blk_irq);
    }
    return (int)run_user(user_main, 0);
}
