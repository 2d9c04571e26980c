/* sensor: a driver for the example user device (examples/sensor.py, a temperature sensor
 * at ports 0x700-0x703 with a level-triggered IRQ 5): reads the temperature, sets an
 * alarm threshold `rise` degrees above it, takes the alarm interrupt `count` times
 * (each time raising the threshold again), then prints what it saw. With `second=PORT`
 * it also reads the temperature of a second sensor there at the end. With `log=1` it
 * gives a sensor that keeps a log in guest memory (tests/kvm/userdevs.py: u32 address
 * written to +4, one u32 per alarm) a buffer of its own, with `log=ADDR` that address,
 * and prints what arrived and the status's error bit. */
#include "rt/rt.h"

#define TEMP 0
#define THRESHOLD 1
#define STATUS 2
#define CONTROL 3
#define LOG_ADDR 4
#define STATUS_LOG_ERROR 2
#define SENSOR_VECTOR 0x25
#define MAX_ALARMS 16

static u16 port;
static u8 rise;
static volatile int alarms;
static volatile u8 alarm_temp[MAX_ALARMS];
static volatile int spurious;
static volatile u32 logbuf[MAX_ALARMS];

/* Level-triggered: quiet the device (new threshold, then clear the alarm) before the EOI,
 * or the still-high line would interrupt again at once. An interrupt with no alarm set is
 * spurious, as a driver must expect: the PVM test host delivers a level-triggered
 * interrupt once more after its EOI although the line was lowered before it (measured:
 * one extra per alarm; none when the same device is edge-triggered). */
static void sensor_irq(struct trap_frame *tf)
{
    (void)tf;
    if (!(inb(port + STATUS) & 1)) {
        spurious++;
        lapic_eoi();
        return;
    }
    u8 t = inb(port + TEMP);
    if (alarms < MAX_ALARMS)
        alarm_temp[alarms] = t;
    alarms++;
    outb(port + THRESHOLD, (u8)(t + rise));
    outb(port + STATUS, 1);
    lapic_eoi();
}

int main(void)
{
    port = (u16)rt_cmdline_uint("port", 0x700);
    rise = (u8)rt_cmdline_uint("rise", 3);
    int count = (int)rt_cmdline_uint("count", 3);
    u32 timeout_ms = (u32)rt_cmdline_uint("timeout", 3000);
    u16 second = (u16)rt_cmdline_uint("second", 0);
    u64 log = rt_cmdline_uint("log", 0);
    if (count > MAX_ALARMS)
        count = MAX_ALARMS;

    lapic_enable();
    (void)rt_tsc_khz();                                     /* calibrates the LAPIC timer */
    u8 t = inb(port + TEMP);
    if (t == 0xFF) {
        printf("sensor: no sensor at 0x%x (it reads 0xff)\n", port);
        return 2;
    }
    printf("sensor: temperature %u C\n", t);

    if (log) {
        u32 addr = log == 1 ? (u32)(u64)logbuf : (u32)log;
        outl(port + LOG_ADDR, addr);
        printf("sensor: log at 0x%x\n", addr);
    }
    rt_set_handler(SENSOR_VECTOR, sensor_irq);
    ioapic_route_level_high(5, SENSOR_VECTOR, (u8)lapic_id());
    outb(port + THRESHOLD, (u8)(t + rise));
    outb(port + CONTROL, 1);
    printf("sensor: alarm at %u C, interrupt on\n", inb(port + THRESHOLD));

    int seen = 0;
    while (seen < count) {
        if (!rt_wait_count(&alarms, seen, timeout_ms)) {
            printf("sensor: no alarm within %u ms\n", timeout_ms);
            break;
        }
        for (; seen < alarms && seen < count; seen++)
            printf("sensor: alarm %d at %u C\n", seen + 1, alarm_temp[seen]);
    }
    outb(port + CONTROL, 0);
    printf("sensor: done, %d alarms, now %u C\n", seen, inb(port + TEMP));
    if (spurious)
        printf("sensor: %d spurious interrupts\n", spurious);
    if (log) {
        u8 st = inb(port + STATUS);
        if (st & STATUS_LOG_ERROR)
            printf("sensor: log write failed (status 0x%x)\n", st);
        for (int i = 0; log == 1 && i < seen; i++)
            printf("sensor: log %d: %u C\n", i + 1, logbuf[i]);
    }
    if (second)
        printf("sensor: second sensor at 0x%x: %u C\n", second, inb(second + TEMP));
    return seen == count ? 0 : 1;
}
