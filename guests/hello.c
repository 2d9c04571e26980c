/* hello: boot-protocol check: banner, command line, CPU count, RAM, RTC time, exit=N. */
#include "rt/rt.h"

static u8 cmos(u8 reg)
{
    outb(0x70, reg);
    return inb(0x71);
}

static u32 bcd(u8 v, int binary)
{
    return binary ? v : (u32)(v >> 4) * 10 + (v & 0xF);
}

/* Read the CMOS clock the way firmware does: wait out an update, honour BCD/binary. */
static void print_rtc(void)
{
    if (cmos(0x0D) == 0xFF) {                       /* no CMOS at 0x70 (QEMU microvm) */
        printf("hello: rtc absent\n");
        return;
    }
    for (u32 n = 0; (cmos(0x0A) & 0x80) && n < 100000; n++)
        ;
    int binary = cmos(0x0B) & 0x04;
    u32 s = bcd(cmos(0x00), binary), m = bcd(cmos(0x02), binary), h = bcd(cmos(0x04), binary);
    u32 d = bcd(cmos(0x07), binary), mo = bcd(cmos(0x08), binary), y = bcd(cmos(0x09), binary);
    u32 c = bcd(cmos(0x32), binary);
    printf("hello: rtc %02u%02u-%02u-%02u %02u:%02u:%02u\n", c ? c : 20, y, mo, d, h, m, s);
}

int main(void)
{
    printf("hello: Hello from a corevisor guest!\n");
    printf("hello: cmdline \"%s\"\n", rt_cmdline());
    int cpus = rt_discover_cpus();
    printf("hello: cpus=%d mem=%luKiB\n", cpus, rt_mem_kib());
    print_rtc();
    u32 status = (u32)rt_cmdline_uint("exit", 0);
    printf("hello: exit %u\n", status);
    return (int)status;
}
