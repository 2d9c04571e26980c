/* hello: boot-protocol check: banner, command line, CPU count and RAM, exit=N status. */
#include "rt/rt.h"

int main(void)
{
    printf("hello: Hello from a corevisor guest!\n");
    printf("hello: cmdline \"%s\"\n", rt_cmdline());
    int cpus = rt_discover_cpus();
    printf("hello: cpus=%d mem=%luKiB\n", cpus, rt_mem_kib());
    u32 status = (u32)rt_cmdline_uint("exit", 0);
    printf("hello: exit %u\n", status);
    return (int)status;
}
