/* smp: start every AP (INIT-SIPI-SIPI), each CPU checks in on the console. */
#include "rt/rt.h"

#define WAIT_US 5000000     /* give up on the stragglers after 5 s */

static spinlock_t count_lock;
static volatile int checked_in;

static void check_in(int index)
{
    printf("smp: cpu %d apic %u checked in\n", index, lapic_id());
    spin_lock(&count_lock);
    checked_in++;
    spin_unlock(&count_lock);
}

int main(void)
{
    int n = rt_discover_cpus();
    lapic_enable();
    u64 khz = rt_tsc_khz();
    u64 deadline = rdtsc() + (u64)WAIT_US * khz / 1000;
    int self = rt_cpu_index(lapic_id());
    check_in(self < 0 ? 0 : self);
    for (int i = 0; i < n; i++) {
        if (i == self)
            continue;
        u64 now = rdtsc();
        if (now >= deadline)
            break;
        rt_start_ap(i, check_in, (deadline - now) * 1000 / khz);
    }
    while (checked_in < n && rdtsc() < deadline)
        cpu_relax();
    int k = checked_in;
    printf("smp: %d/%d cpus checked in\n", k, n);
    return k == n ? 0 : 1;
}
