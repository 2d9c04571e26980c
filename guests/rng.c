/*
 * rng: reads 64 bytes from the first virtio-rng device twice (CPL3, polled) and prints
 * both in hex; they must differ and neither may be all zero.
 */
#include "rt/rt.h"
#include "rt/virtio.h"

static struct vrng rng;

static int print_hex(const u8 *b, int n)
{
    char line[2 * 64 + 1];
    int nonzero = 0;
    for (int i = 0; i < n; i++) {
        line[2 * i] = "0123456789abcdef"[b[i] >> 4];
        line[2 * i + 1] = "0123456789abcdef"[b[i] & 15];
        nonzero |= b[i];
    }
    line[2 * n] = 0;
    printf("rng: %s\n", line);
    return nonzero != 0;
}

static u64 user_main(u64 arg)
{
    (void)arg;
    static u8 a[64], b[64];
    struct vio_dev *d = vio_find(VIRTIO_ID_RNG, 0);
    if (!d) {
        printf("rng: no virtio-rng device\n");
        return 2;
    }
    if (d->pci)
        printf("rng: %s\n", vio_where(d));
    if (vrng_init(&rng, d)) {
        printf("rng: %s did not initialise\n", vio_where(d));
        return 2;
    }
    if (vrng_read(&rng, a, sizeof(a)) || vrng_read(&rng, b, sizeof(b))) {
        printf("rng: read timed out\n");
        return 1;
    }
    int ok_a = print_hex(a, 64), ok_b = print_hex(b, 64);
    if (!ok_a || !ok_b) {
        printf("rng: all zero\n");
        return 1;
    }
    if (!memcmp(a, b, 64)) {
        printf("rng: the two reads are equal\n");
        return 1;
    }
    printf("rng: ok\n");
    return 0;
}

int main(void)
{
    rt_tsc_khz();                                   /* calibrate at CPL0 (timeouts) */
    return (int)run_user(user_main, 0);
}
