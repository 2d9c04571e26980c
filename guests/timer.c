/* timer: UART THR-empty interrupt through the IOAPIC, then a periodic LAPIC timer
 * interrupting a CPL3 busy loop. */
#include "rt/rt.h"

#define UART_VECTOR 0x24
#define TIMER_VECTOR 0x40
#define TICKS 20
#define COM1 0x3F8

static volatile int uart_irqs;
static volatile u32 ticks;

static void uart_irq(struct trap_frame *tf)
{
    (void)tf;
    (void)inb(COM1 + 2);        /* IIR: acknowledges the THR-empty interrupt */
    outb(COM1 + 1, 0x00);       /* IER: off again */
    uart_irqs++;
    lapic_eoi();
}

static void timer_irq(struct trap_frame *tf)
{
    (void)tf;
    ticks++;
    lapic_eoi();
}

static u64 user_loop(u64 target)
{
    u64 n = 0;
    while (ticks < target)
        n++;
    return n;
}

int main(void)
{
    lapic_enable();
    u64 khz = rt_tsc_khz();
    u32 bsp = lapic_id();

    /* Interrupt-driven UART: ISA IRQ 4 -> IOAPIC pin 4 -> UART_VECTOR on the BSP. */
    rt_set_handler(UART_VECTOR, uart_irq);
    ioapic_route(4, UART_VECTOR, (u8)bsp);
    outb(COM1 + 4, 0x0B);       /* MCR: DTR | RTS | OUT2 (IRQ enable) */
    outb(COM1 + 1, 0x02);       /* IER: THR empty */
    u64 deadline = rdtsc() + 1000000 * khz / 1000;     /* 1 s */
    sti();
    while (!uart_irqs && rdtsc() < deadline)
        cpu_relax();
    cli();
    outb(COM1 + 1, 0x00);
    if (!uart_irqs) {
        printf("timer: uart irq missing\n");
        return 2;
    }
    printf("timer: uart irq ok\n");

    /* Periodic LAPIC timer at ~100 Hz while CPL3 spins. */
    u32 init = rt_lapic_ticks_10ms ? rt_lapic_ticks_10ms : 625000;
    rt_set_handler(TIMER_VECTOR, timer_irq);
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, (1 << 17) | TIMER_VECTOR);     /* periodic */
    lapic_write(LAPIC_TIMER_INIT, init);
    u64 iterations = run_user(user_loop, TICKS);
    lapic_write(LAPIC_LVT_TIMER, 1 << 16);
    lapic_write(LAPIC_TIMER_INIT, 0);
    printf("timer: %u ticks\n", ticks);
    printf("timer: user loop ran %lu iterations\n", iterations);
    return 0;
}
