/* pio: benchmark guest: count=N outb writes to port 0x80 from CPL3 (IOPL=3). */
#include "rt/rt.h"

static u64 user_pio(u64 n)
{
    for (u64 i = 0; i < n; i++)
        __asm__ volatile("outb %%al, $0x80" : : "a"(0) : "memory");
    return n;
}

int main(void)
{
    u64 n = rt_cmdline_uint("count", 100000);
    printf("pio: start\n");
    u64 done = run_user(user_pio, n);
    printf("pio: %lu writes\n", done);
    return 0;
}
