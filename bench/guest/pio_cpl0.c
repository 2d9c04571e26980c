/*
 * pio_cpl0: bench-only variant of guests/pio.c that does its count=N `outb` to port 0x80
 * at CPL0 instead of CPL3.  bench/run.py falls back to it (and says so in the table and the
 * JSON) when the bundled pio guest cannot do port I/O from CPL3 on the host's KVM: under
 * PVM the guest's IOPL=3 is not honoured and the CPL3 `outb` takes #GP.
 * At CPL0 the few loop instructions are emulated (~3 M instr/s on that host, i.e. ~1 us per
 * iteration), which is small next to the cost of the exit itself (tens of us).
 * Built by bench/run.py against the guests' runtime (guests/rt), output in bench/results/.
 */
#include "rt/rt.h"

int main(void)
{
    u64 n = rt_cmdline_uint("count", 100000);
    printf("pio: start\n");
    for (u64 i = 0; i < n; i++)
        __asm__ volatile("outb %%al, $0x80" : : "a"(0) : "memory");
    printf("pio: %lu writes\n", n);
    return 0;
}
