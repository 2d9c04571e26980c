/*
 * net: answers ARP requests and ICMP echo requests for ip= (default 10.0.0.2) on the
 * first virtio-net device (CPL3, polled) until it has sent count= (default 3) echo
 * replies, or timeout= (default 30) seconds pass.
 */
#include "rt/rt.h"
#include "rt/virtio.h"

static struct vnet net VIO_NOINIT;
static u8 my_ip[4];
static u8 reply[VNET_BUF];

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put16(u8 *p, u16 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

static u16 csum(const u8 *p, u32 n)
{
    u32 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2)
        s += be16(p + i);
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (u16)~s;
}

static int parse_ip(const char *s, u8 out[4])
{
    for (int i = 0; i < 4; i++) {
        u32 v = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9') {
            v = v * 10 + (u32)(*s++ - '0');
            digits++;
        }
        if (!digits || v > 255 || (i < 3 && *s++ != '.'))
            return -1;
        out[i] = (u8)v;
    }
    return *s == 0 ? 0 : -1;
}

/* 1 if an echo reply was sent, 0 if the frame was handled otherwise, -1 on TX failure. */
static int handle(const u8 *f, u32 len)
{
    if (len < 14)
        return 0;
    u16 type = be16(f + 12);
    if (type == 0x0806 && len >= 42) {                      /* ARP */
        const u8 *a = f + 14;
        if (be16(a) != 1 || be16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4 ||
            be16(a + 6) != 1 || memcmp(a + 24, my_ip, 4))
            return 0;
        memcpy(reply, f + 6, 6);
        memcpy(reply + 6, net.mac, 6);
        put16(reply + 12, 0x0806);
        u8 *r = reply + 14;
        put16(r, 1);
        put16(r + 2, 0x0800);
        r[4] = 6;
        r[5] = 4;
        put16(r + 6, 2);
        memcpy(r + 8, net.mac, 6);
        memcpy(r + 14, my_ip, 4);
        memcpy(r + 18, a + 8, 10);                          /* their MAC and IP */
        if (vnet_tx(&net, reply, 42))
            return -1;
        printf("net: arp reply to %u.%u.%u.%u\n", a[14], a[15], a[16], a[17]);
        return 0;
    }
    if (type != 0x0800 || len < 34)
        return 0;
    const u8 *ip = f + 14;
    u32 ihl = (ip[0] & 15) * 4, total = be16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl + 8 || 14 + total > len ||
        ip[9] != 1 || memcmp(ip + 16, my_ip, 4) || (be16(ip + 6) & 0x3FFF))
        return 0;                                           /* not an unfragmented ICMP to us */
    const u8 *icmp = ip + ihl;
    if (icmp[0] != 8 || 14 + total > sizeof(reply))
        return 0;
    memcpy(reply, f + 6, 6);
    memcpy(reply + 6, net.mac, 6);
    put16(reply + 12, 0x0800);
    u8 *rip = reply + 14;
    memcpy(rip, ip, total);
    memcpy(rip + 12, ip + 16, 4);
    memcpy(rip + 16, ip + 12, 4);
    rip[8] = 64;
    put16(rip + 10, 0);
    put16(rip + 10, csum(rip, ihl));
    u8 *ric = rip + ihl;
    ric[0] = 0;
    put16(ric + 2, 0);
    put16(ric + 2, csum(ric, total - ihl));
    if (vnet_tx(&net, reply, 14 + total))
        return -1;
    return 1;
}

static u64 user_main(u64 arg)
{
    (void)arg;
    char v[32] = "10.0.0.2";
    rt_cmdline_str("ip", v, sizeof(v));
    if (parse_ip(v, my_ip)) {
        printf("net: ip=%s is not a dotted IPv4 address\n", v);
        return 2;
    }
    u64 count = rt_cmdline_uint("count", 3), timeout = rt_cmdline_uint("timeout", 30);
    struct vio_dev *d = vio_find(VIRTIO_ID_NET, 0);
    if (!d) {
        printf("net: no virtio-net device\n");
        return 2;
    }
    if (d->pci)
        printf("net: %s\n", vio_where(d));
    if (vnet_init(&net, d)) {
        printf("net: %s did not initialise\n", vio_where(d));
        return 2;
    }
    const u8 *m = net.mac;
    printf("net: up mac=%02x:%02x:%02x:%02x:%02x:%02x ip=%u.%u.%u.%u\n", m[0], m[1], m[2], m[3],
           m[4], m[5], my_ip[0], my_ip[1], my_ip[2], my_ip[3]);
    u64 replies = 0, khz = rt_tsc_khz(), t0 = rdtsc();
    while (replies < count) {
        if (rdtsc() - t0 > timeout * 1000 * khz) {
            printf("net: timeout after %lu echo replies\n", replies);
            return 1;
        }
        u32 len;
        int idx;
        u8 *f = vnet_rx(&net, &len, &idx);
        if (!f) {
            cpu_relax();
            continue;
        }
        int r = handle(f, len);
        if (r > 0) {
            const u8 *ip = f + 14;
            replies++;
            printf("net: echo reply %lu to %u.%u.%u.%u seq=%u\n", replies, ip[12], ip[13],
                   ip[14], ip[15], be16(ip + (ip[0] & 15) * 4 + 6));
        }
        vnet_rx_done(&net, idx);
        if (r < 0) {
            printf("net: transmit timed out\n");
            return 1;
        }
    }
    printf("net: done, %lu echo replies\n", replies);
    return 0;
}

int main(void)
{
    rt_tsc_khz();                                   /* calibrate at CPL0 (timeouts) */
    return (int)run_user(user_main, 0);
}
