/*
 * rtos: a small preemptive RTOS, the demo's main guest.
 *
 * - Tasks run at CPL3, each with its own 8 KiB user stack and saved register frame
 *   (struct trap_frame). The kernel is nothing but interrupt and trap handlers; it has
 *   no threads of its own, so a context switch is copying frames in and out of the
 *   frame the CPU pushed on the kernel stack (TSS.rsp0) before it IRETs.
 * - Each CPU has its own run queue, GDT + TSS (own rsp0 and I/O bitmap) and periodic
 *   LAPIC timer (hz=100); APs are started with INIT/SIPI by the runtime.
 * - Fixed priorities (0 = most urgent), round-robin among equals on each tick; a
 *   doorbell interrupt that readies a more urgent task preempts at once.
 * - System calls: rax = number, rdi/rsi/rdx = arguments, result in rax. Entered by
 *   default with `ud2` at one known address (rtos_sys_site) that the #UD handler
 *   recognises (`int $0x80` from CPL3 raises #UD on the PVM test host anyway), or with
 *   sys=syscall through SYSCALL (per-CPU LSTAR stubs, IRETQ back). Measured on the PVM
 *   host: ~3.3 us per SYSCALL round trip vs ~65 us through #UD, BUT on PVM the SYSCALL
 *   variant loses interrupts: after a while a task runs at CPL3 with RFLAGS.IF=0 and
 *   the timer never preempts it again (seen under QEMU-KVM and corevisor; it runs
 *   correctly under QEMU TCG), hence opt-in. Both paths present the kernel a frame whose
 *   rip is *at* the 2-byte instruction; a system call that must block leaves it there,
 *   so it simply runs again once the task is woken.
 * - With no CPU runnable task the CPU IRETs (CPL0 to CPL0) into `sti; hlt` on its idle
 *   stack.
 * CPL0 work per tick is a few hundred instructions: CPL0 is emulated on the test host.
 */
#include "rt/rt.h"
#include "rt/pv.h"

#define NCPU 8
#define NTASK 6
#define USTACK 8192
#define KSTACK 8192
#define TIMER_VEC 0x40
#define DB_VEC 0x50                 /* + kernel channel index */
#define NKCHAN 2

enum { SYS_WRITE, SYS_EXIT, SYS_YIELD, SYS_SLEEP, SYS_SEND, SYS_RECV, SYS_WDOG, SYS_TICKS };
enum { T_FREE, T_READY, T_SLEEP, T_RECV, T_DEAD };

/* Stacks: in the runtime's never-zeroed .stack section (zeroing is slow at CPL0 here). */
__asm__(".pushsection .stack, \"aw\", @nobits\n"
        ".balign 16\n"
        ".globl rtos_ustacks, rtos_kstacks, rtos_istacks\n"
        "rtos_ustacks: .skip " "393216" "\n"     /* NCPU * NTASK * USTACK */
        "rtos_kstacks: .skip " "65536" "\n"      /* NCPU * KSTACK */
        "rtos_istacks: .skip " "65536" "\n"      /* NCPU * KSTACK */
        ".popsection\n");
extern u8 rtos_ustacks[], rtos_kstacks[], rtos_istacks[];
_Static_assert(NCPU * NTASK * USTACK == 393216, "ustacks");
_Static_assert(NCPU * KSTACK == 65536, "kstacks");

/* System-call stubs (CPL3): rtos_sys_sc / rtos_sys_ud (nr, a, b, c). Both instructions
 * are 2 bytes long. */
__asm__(".text\n"
        ".globl rtos_sys_sc\n"
        "rtos_sys_sc:\n"
        "  movq %rdi, %rax\n"
        "  movq %rsi, %rdi\n"
        "  movq %rdx, %rsi\n"
        "  movq %rcx, %rdx\n"
        "  syscall\n"
        "  ret\n"
        ".globl rtos_sys_ud\n"
        "rtos_sys_ud:\n"
        "  movq %rdi, %rax\n"
        "  movq %rsi, %rdi\n"
        "  movq %rdx, %rsi\n"
        "  movq %rcx, %rdx\n"
        ".globl rtos_sys_site\n"
        "rtos_sys_site:\n"
        "  ud2\n"
        "  ret\n"
        ".globl rtos_idle\n"
        "rtos_idle:\n"
        "  sti\n"
        "  hlt\n"
        "  jmp rtos_idle\n");
i64 rtos_sys_sc(u64 nr, u64 a, u64 b, u64 c);
i64 rtos_sys_ud(u64 nr, u64 a, u64 b, u64 c);
extern char rtos_sys_site[], rtos_idle[];
static i64 (*rtos_sys)(u64 nr, u64 a, u64 b, u64 c) = rtos_sys_ud;

/*
 * SYSCALL entry: one 32-byte stub per CPU (LSTAR differs per CPU, so no swapgs or
 * per-CPU segment is needed to find the kernel stack). Each saves the user rsp, switches
 * to its CPU's TSS.rsp0 stack and builds the same struct trap_frame an interrupt from
 * CPL3 gets (vector 0x80); the common exit is IRETQ, so a context switch works exactly
 * as in the interrupt handlers. RFLAGS.IF/TF/DF/AC/NT are masked by FMASK.
 */
__asm__(".text\n"
        ".balign 32\n"
        ".globl rtos_sc_entries\n"
        "rtos_sc_entries:\n"
        ".set sci, 0\n"
        ".rept 8\n"
        "  .balign 32\n"
        "  movq %rsp, rtos_sc_ursp + 8 * sci(%rip)\n"
        "  movq rtos_sc_kstack + 8 * sci(%rip), %rsp\n"
        "  pushq $0x2B\n"
        "  pushq rtos_sc_ursp + 8 * sci(%rip)\n"
        "  jmp rtos_sc_common\n"
        "  .set sci, sci + 1\n"
        ".endr\n"
        "rtos_sc_common:\n"
        "  pushq %r11\n"          /* rflags */
        "  pushq $0x23\n"         /* cs */
        "  pushq %rcx\n"          /* rip (after the syscall instruction) */
        "  pushq $0\n"            /* error */
        "  pushq $0x80\n"         /* vector */
        "  pushq %r15\n pushq %r14\n pushq %r13\n pushq %r12\n pushq %r11\n"
        "  pushq %r10\n pushq %r9\n pushq %r8\n pushq %rbp\n pushq %rdi\n"
        "  pushq %rsi\n pushq %rdx\n pushq %rcx\n pushq %rbx\n pushq %rax\n"
        "  movq %rsp, %rdi\n"
        "  cld\n"
        "  call rtos_syscall_entry\n"
        "  popq %rax\n popq %rbx\n popq %rcx\n popq %rdx\n popq %rsi\n"
        "  popq %rdi\n popq %rbp\n popq %r8\n popq %r9\n popq %r10\n"
        "  popq %r11\n popq %r12\n popq %r13\n popq %r14\n popq %r15\n"
        "  addq $16, %rsp\n"
        "  iretq\n");
extern char rtos_sc_entries[];
u64 rtos_sc_ursp[8], rtos_sc_kstack[8];
_Static_assert(NCPU == 8, "rtos_sc_entries has 8 stubs");
static int use_syscall;

struct task {
    struct trap_frame f;
    const char *name;
    int state, prio, essential, chan;
    u64 wake, slices, ticks;
    i64 code;
};

struct ktss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 iobitmap[0x1000 / 8 + 1];    /* ports 0..0xFFF allowed, the rest refused */
} __attribute__((packed));

struct cpu {
    struct task t[NTASK];
    int n, cur, index;
    u8 apic;
    volatile u64 tick;
    volatile int up;
};

static struct cpu cpus[NCPU];
static u64 cpu_gdt[NCPU][8] __attribute__((aligned(16)));
static struct ktss cpu_tss[NCPU] __attribute__((aligned(16)));
static u8 apic2cpu[256];
static int ncpus = 1;

extern u64 gdt[];                   /* the runtime's GDT (boot.S) */

/* configuration (command line) */
static u64 cfg_msgs, cfg_hz, cfg_wdms, cfg_wdkick, cfg_wdkicks, cfg_gap;
static int cfg_wdfail, cfg_relay, have_abi;

/* kernel channels: 0 = the link to the peer (or a loopback), 1 = loopback's far side */
static struct pv_chan kchan[NKCHAN];
static int nkchan;
static u8 loopback_mem[4096] __attribute__((aligned(4096)));

static inline struct cpu *this_cpu(void) { return &cpus[apic2cpu[lapic_id()]]; }

/* ------------------------------------------------------------------------------------- */
/* user side (CPL3)                                                                      */

static i64 sys_write(const char *s, u64 n) { return rtos_sys(SYS_WRITE, (u64)s, n, 0); }
static void sys_exit(i64 code) { rtos_sys(SYS_EXIT, (u64)code, 0, 0); }
static void sys_yield(void) { rtos_sys(SYS_YIELD, 0, 0, 0); }
static void sys_sleep(u64 ticks) { rtos_sys(SYS_SLEEP, ticks, 0, 0); }
static i64 sys_send(int ch, const void *b, u64 n) { return rtos_sys(SYS_SEND, (u64)ch, (u64)b, n); }
static i64 sys_recv(int ch, void *b, u64 n) { return rtos_sys(SYS_RECV, (u64)ch, (u64)b, n); }
static i64 sys_wdog(u64 ms) { return rtos_sys(SYS_WDOG, ms, 0, 0); }

static void uprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void uprintf(const char *fmt, ...)
{
    char buf[160];
    va_list ap;
    va_start(ap, fmt);
    int n = pv_vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    sys_write(buf, n < (int)sizeof(buf) ? (u64)n : sizeof(buf) - 1);
}

static void task_entry(u64 (*fn)(u64), u64 arg)
{
    sys_exit((i64)fn(arg));
    for (;;)
        ;
}

static u64 parse_num(const char *s)
{
    u64 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u64)(*s++ - '0');
    return v;
}

static u64 producer(u64 arg)
{
    (void)arg;
    char msg[32];
    for (u64 i = 1; i <= cfg_msgs; i++) {
        int n = pv_snprintf(msg, sizeof(msg), "ping %lu", i);
        i64 r = sys_send(0, msg, (u64)n);
        if (r < 0) {
            uprintf("rtos: send failed: %ld\n", r);
            return 1;
        }
        uprintf("rtos: sent \"%s\"\n", msg);
        if (cfg_gap)
            sys_sleep(cfg_gap);
    }
    return 0;
}

static u64 consumer(u64 arg)
{
    (void)arg;
    char msg[PV_MSG_MAX + 1];
    u64 bad = 0;
    for (u64 i = 1; i <= cfg_msgs; i++) {
        i64 n = sys_recv(0, msg, PV_MSG_MAX);
        if (n < 0) {
            uprintf("rtos: recv failed: %ld\n", n);
            return 1;
        }
        msg[n] = 0;
        uprintf("rtos: received \"%s\"\n", msg);
        if (n < 6 || memcmp(msg, "pong ", 5) || parse_num(msg + 5) != i)
            bad++;
    }
    if (bad)
        uprintf("rtos: %lu unexpected replies\n", bad);
    return bad ? 1 : 0;
}

/* Loopback peer (no hypervisor ABI): answers "ping K" with "pong K" on kernel channel 1. */
static u64 echo(u64 arg)
{
    (void)arg;
    char msg[PV_MSG_MAX + 1], reply[PV_MSG_MAX + 1];
    for (;;) {
        i64 n = sys_recv(1, msg, PV_MSG_MAX);
        if (n < 0)
            return 1;
        msg[n] = 0;
        int m = pv_snprintf(reply, sizeof(reply), "pong %s", n > 5 ? msg + 5 : "?");
        sys_send(1, reply, (u64)m);
    }
}

static u64 watchdog_task(u64 arg)
{
    (void)arg;
    for (u64 k = 1;; k++) {
        i64 r = sys_wdog(cfg_wdms);
        if (k == 1)
            uprintf("rtos: watchdog %s, %lu ms, kicked every %lu ticks\n",
                    r == 0 ? "armed" : "unavailable", cfg_wdms, cfg_wdkick);
        if (cfg_wdfail && k >= cfg_wdkicks) {
            uprintf("rtos: stopped kicking the watchdog after %lu kicks, spinning\n", k);
            for (;;)
                __asm__ volatile("pause");
        }
        sys_sleep(cfg_wdkick);
    }
    return 0;
}

static volatile u64 worker_iters[NCPU];

/* Background CPU hog: xorshift, counting iterations; never blocks, only preempted. */
static u64 worker(u64 cpu)
{
    u64 x = 88172645463325252UL + cpu;
    for (;;) {
        for (int i = 0; i < 4096; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        worker_iters[cpu] += 4096;
        if (x == 0)
            sys_yield();    /* never: keeps x live */
    }
    return 0;
}

static volatile u64 sleeper_wakeups[NCPU];

static u64 sleeper(u64 cpu)
{
    for (;;) {
        sys_sleep(10);
        sleeper_wakeups[cpu]++;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------- */
/* kernel (CPL0, interrupts off)                                                         */

static struct task *task_create(struct cpu *c, const char *name, u64 (*fn)(u64), u64 arg,
                                int prio, int essential)
{
    if (c->n >= NTASK)
        return NULL;
    int i = c->n++;
    struct task *t = &c->t[i];
    memset(t, 0, sizeof(*t));
    u64 top = (u64)rtos_ustacks + ((u64)c->index * NTASK + (u64)i + 1) * USTACK;
    t->f.rip = (u64)task_entry;
    t->f.cs = 0x23;
    t->f.ss = 0x2B;
    t->f.rflags = 0x202;            /* IF */
    t->f.rsp = top - 8;             /* as if called: rsp + 8 is 16-byte aligned */
    t->f.rdi = (u64)fn;
    t->f.rsi = arg;
    t->name = name;
    t->prio = prio;
    t->essential = essential;
    t->state = T_READY;
    return t;
}

static void idle_frame(struct cpu *c, struct trap_frame *tf)
{
    memset(tf, 0, sizeof(*tf));
    tf->rip = (u64)rtos_idle;
    tf->cs = 0x08;
    tf->ss = 0x10;
    tf->rflags = 0x202;
    tf->rsp = (u64)rtos_istacks + (u64)(c->index + 1) * KSTACK;
}

/* Pick the next task and switch tf to it. rotate: round-robin among equal priorities
 * (tick, yield, block); else the current task keeps the CPU unless a more urgent one is
 * ready (wake-up from a doorbell). */
static void schedule(struct cpu *c, struct trap_frame *tf, int rotate)
{
    int cur = c->cur, best = -1, n = c->n;
    for (int k = 0; k < n; k++) {
        int i = cur < 0 ? k : (cur + 1 + k) % n;
        struct task *t = &c->t[i];
        if (t->state == T_READY && (best < 0 || t->prio < c->t[best].prio))
            best = i;
    }
    if (!rotate && cur >= 0 && c->t[cur].state == T_READY && best >= 0 &&
        c->t[cur].prio <= c->t[best].prio)
        best = cur;
    if (best == cur)
        return;
    if (cur >= 0 && (tf->cs & 3) == 3)
        c->t[cur].f = *tf;
    if (best >= 0) {
        *tf = c->t[best].f;
        c->t[best].slices++;
    } else {
        idle_frame(c, tf);
    }
    c->cur = best;
}

static void wake_ready(struct cpu *c)
{
    for (int i = 0; i < c->n; i++) {
        struct task *t = &c->t[i];
        if (t->state == T_SLEEP && c->tick >= t->wake)
            t->state = T_READY;
        else if (t->state == T_RECV && pv_chan_rx_pending(&kchan[t->chan]))
            t->state = T_READY;     /* fallback for a lost doorbell, or none at all */
    }
}

static void crash(void);
static u64 cfg_crashafter;

static void timer_irq(struct trap_frame *tf)
{
    struct cpu *c = this_cpu();
    c->tick++;
    if (cfg_crashafter && c->tick == cfg_crashafter && c == &cpus[0])
        crash();
    if (c->cur >= 0)
        c->t[c->cur].ticks++;
    wake_ready(c);
    lapic_eoi();
    schedule(c, tf, 1);
}

static void doorbell_irq(struct trap_frame *tf)
{
    struct cpu *c = this_cpu();
    int ch = (int)tf->vector - DB_VEC;
    lapic_eoi();
    if (ch < 0 || ch >= nkchan)
        return;
    kchan[ch].irqs++;
    int woke = 0;
    for (int i = 0; i < c->n; i++) {
        struct task *t = &c->t[i];
        if (t->state == T_RECV && t->chan == ch) {
            t->state = T_READY;
            woke = 1;
        }
    }
    if (woke)
        schedule(c, tf, 0);
}

static void panic_trap(struct trap_frame *tf)
{
    pv_printf("rtos: kernel trap %lu err %lx rip %lx cs %lx rsp %lx\n", tf->vector, tf->error,
              tf->rip, tf->cs, tf->rsp);
    rt_exit(99);
}

static void shutdown(i64 code)
{
    if (have_abi)
        pv_watchdog(0);
    for (int k = 0; k < ncpus; k++) {
        struct cpu *c = &cpus[k];
        if (!c->up)
            continue;
        for (int i = 0; i < c->n; i++) {
            struct task *t = &c->t[i];
            if (!memcmp(t->name, "worker", 7))
                pv_printf("rtos: worker cpu %d: %lu slices, %lu ticks, %lu iterations\n", k,
                          t->slices, t->ticks, worker_iters[k]);
        }
    }
    if (nkchan == 1)
        pv_printf("rtos: channel %d: %u doorbell interrupts\n", kchan[0].idx, kchan[0].irqs);
    else if (nkchan)
        pv_printf("rtos: loopback: %u doorbell interrupts\n", kchan[0].irqs);
    pv_printf("rtos: done\n");
    rt_exit((u32)code);
}

static void task_exit(struct cpu *c, struct trap_frame *tf, i64 code)
{
    struct task *t = &c->t[c->cur];
    t->state = T_DEAD;
    t->code = code;
    if (t->essential) {
        i64 status = 0;
        int alive = 0;
        for (int i = 0; i < c->n; i++) {
            if (c->t[i].essential && c->t[i].state != T_DEAD)
                alive = 1;
            if (c->t[i].essential && c->t[i].state == T_DEAD && c->t[i].code)
                status = c->t[i].code;
        }
        if (!alive)
            shutdown(status);
    }
    schedule(c, tf, 1);
}

static void task_fault(struct trap_frame *tf)
{
    if ((tf->cs & 3) != 3)
        panic_trap(tf);
    struct cpu *c = this_cpu();
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    pv_printf("rtos: task %s killed: trap %lu err %lx rip %lx cr2 %lx\n", c->t[c->cur].name,
              tf->vector, tf->error, tf->rip, cr2);
    task_exit(c, tf, 100 + (i64)tf->vector);
}

static int user_range_ok(u64 p, u64 n) { return p < 0x100000000UL && n <= 0x100000000UL - p; }

static i64 k_write(const char *s, u64 n)
{
    if (!user_range_ok((u64)s, n))
        return -PV_EFAULT;
    if (have_abi)
        return pv_console_write(s, n);
    char buf[129];
    for (u64 done = 0; done < n;) {
        u64 k = n - done > 128 ? 128 : n - done;
        memcpy(buf, s + done, k);
        buf[k] = 0;
        printf("%s", buf);
        done += k;
    }
    return (i64)n;
}

static void syscall(struct cpu *c, struct trap_frame *tf)
{
    struct task *t = &c->t[c->cur];
    u64 a = tf->rdi, b = tf->rsi, n = tf->rdx;
    i64 r = 0;
    switch (tf->rax) {
    case SYS_WRITE:
        r = k_write((const char *)a, b);
        break;
    case SYS_EXIT:
        task_exit(c, tf, (i64)a);
        return;
    case SYS_YIELD:
        tf->rax = 0;
        tf->rip += 2;
        schedule(c, tf, 1);
        return;
    case SYS_SLEEP:
        t->wake = c->tick + (a ? a : 1);
        t->state = T_SLEEP;
        tf->rax = 0;
        tf->rip += 2;
        schedule(c, tf, 1);
        return;
    case SYS_SEND:
        if (a >= (u64)nkchan || !user_range_ok(b, n)) {
            r = -PV_EINVAL;
            break;
        }
        r = pv_chan_send(&kchan[a], (const void *)b, (u32)n);
        if (r == -PV_EAGAIN) {      /* ring full: retry after a tick (rip stays on ud2) */
            t->wake = c->tick + 1;
            t->state = T_SLEEP;
            schedule(c, tf, 1);
            return;
        }
        if (r == 0)
            r = pv_chan_kick(&kchan[a]);
        break;
    case SYS_RECV:
        if (a >= (u64)nkchan || !user_range_ok(b, n)) {
            r = -PV_EINVAL;
            break;
        }
        r = pv_chan_recv(&kchan[a], (void *)b, (u32)n);
        if (r == -PV_EAGAIN) {      /* block until the doorbell (rip stays on ud2) */
            t->chan = (int)a;
            t->state = T_RECV;
            schedule(c, tf, 1);
            return;
        }
        break;
    case SYS_WDOG:
        r = have_abi ? pv_watchdog(a) : -PV_ENOSYS;
        break;
    case SYS_TICKS:
        r = (i64)c->tick;
        break;
    default:
        r = -PV_ENOSYS;
        break;
    }
    tf->rax = (u64)r;
    tf->rip += 2;
}

void rtos_syscall_entry(struct trap_frame *tf);
void rtos_syscall_entry(struct trap_frame *tf)
{
    tf->rip -= 2;               /* as if trapped at the instruction, like the ud2 path */
    syscall(this_cpu(), tf);
}

static void ud_trap(struct trap_frame *tf)
{
    if ((tf->cs & 3) == 3 && tf->rip == (u64)rtos_sys_site) {
        syscall(this_cpu(), tf);
        return;
    }
    task_fault(tf);
}

static inline void wrmsr(u32 m, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(m), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline u64 rdmsr(u32 m)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(m));
    return (u64)hi << 32 | lo;
}

/* Own GDT (the runtime's entries + this CPU's TSS at 0x30) and TSS, on this CPU. */
static void cpu_tables(struct cpu *c)
{
    int k = c->index;
    struct ktss *ts = &cpu_tss[k];
    memset(ts, 0, sizeof(*ts));
    ts->rsp0 = (u64)rtos_kstacks + (u64)(k + 1) * KSTACK;
    ts->iomap_base = __builtin_offsetof(struct ktss, iobitmap);
    ts->iobitmap[sizeof(ts->iobitmap) - 1] = 0xFF;
    u64 *g = cpu_gdt[k];
    memcpy(g, gdt, 6 * 8);
    u64 base = (u64)ts, limit = sizeof(*ts) - 1;
    g[6] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89UL << 40) |
           ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56;
    g[7] = base >> 32;
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) d = {8 * 8 - 1, (u64)g};
    __asm__ volatile("lgdt %0; ltr %w1" : : "m"(d), "r"(0x30) : "memory");
    if (use_syscall) {
        rtos_sc_kstack[k] = ts->rsp0;
        wrmsr(0xC0000080, rdmsr(0xC0000080) | 1);         /* EFER.SCE */
        wrmsr(0xC0000081, (u64)0x08 << 32);               /* STAR: kernel CS 0x08, SS 0x10 */
        wrmsr(0xC0000082, (u64)rtos_sc_entries + 32 * (u64)k);    /* LSTAR */
        wrmsr(0xC0000084, 0x47700);                       /* FMASK: AC NT DF IF TF */
    }
}

static void timer_start(void)
{
    u64 per10ms = rt_lapic_ticks_10ms ? rt_lapic_ticks_10ms : 625000;
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, (1 << 17) | TIMER_VEC);    /* periodic */
    lapic_write(LAPIC_TIMER_INIT, (u32)(per10ms * 100 / cfg_hz));
}

static void __attribute__((noreturn)) enter_idle(struct cpu *c)
{
    c->cur = -1;
    c->up = 1;
    timer_start();
    u64 top = (u64)rtos_istacks + (u64)(c->index + 1) * KSTACK;
    __asm__ volatile("movq %0, %%rsp; jmp rtos_idle" : : "r"(top) : "memory");
    __builtin_unreachable();
}

static void ap_main(int table_index)
{
    (void)table_index;
    struct cpu *c = this_cpu();
    cpu_tables(c);
    task_create(c, "sleeper", sleeper, (u64)c->index, 1, 0);
    task_create(c, "worker", worker, (u64)c->index, 3, 0);
    enter_idle(c);
}

static void crash(void)
{
    pv_printf("rtos: crashing on purpose (triple fault)\n");
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) empty = {0, 0};
    __asm__ volatile("cli; lidt %0; ud2" : : "m"(empty));
}

int main(void)
{
    cfg_msgs = rt_cmdline_uint("msgs", 5);
    cfg_hz = rt_cmdline_uint("hz", 100);
    if (cfg_hz < 10 || cfg_hz > 1000)
        cfg_hz = 100;
    cfg_wdms = rt_cmdline_uint("wdms", 500);
    cfg_wdkick = rt_cmdline_uint("wdkick", 10);
    cfg_wdkicks = rt_cmdline_uint("wdkicks", 3);
    cfg_wdfail = (int)rt_cmdline_uint("wdfail", 0);
    cfg_gap = rt_cmdline_uint("gap", 2);
    cfg_relay = pv_cmdline_is("path", "relay", 0);
    int smp = (int)rt_cmdline_uint("smp", 1);

    u32 ea, eb, ec, ed;
    cpuid(0x80000001, 0, &ea, &eb, &ec, &ed);
    use_syscall = (ed >> 11) & 1 && pv_cmdline_is("sys", "syscall", 0);
    if (use_syscall)
        rtos_sys = rtos_sys_sc;
    lapic_enable();
    rt_tsc_khz();
    have_abi = pv_present();
    int n = rt_discover_cpus();
    ncpus = smp ? (n > NCPU ? NCPU : n) : 1;
    u8 bsp = (u8)lapic_id();
    int self = rt_cpu_index(bsp);
    if (self < 0)
        self = 0;
    /* cpus[0] is always the BSP; APs follow in table order */
    int k = 1;
    for (int i = 0; i < n && k < ncpus; i++)
        if (i != self) {
            cpus[k].index = k;
            cpus[k].apic = rt_apic_ids[i];
            apic2cpu[rt_apic_ids[i]] = (u8)k;
            k++;
        }
    cpus[0].apic = bsp;
    apic2cpu[bsp] = 0;

    pv_printf("rtos: start cpus=%d hz=%lu abi=%d msgs=%lu sys=%s\n", ncpus, cfg_hz, have_abi,
              cfg_msgs, use_syscall ? "syscall" : "ud2");
    if (rt_cmdline_uint("crash", 0))
        crash();
    cfg_crashafter = rt_cmdline_uint("crashafter", 0);

    rt_set_handler(TIMER_VEC, timer_irq);
    rt_set_handler(6, ud_trap);
    static const u8 faults[] = {0, 1, 3, 4, 5, 7, 10, 11, 12, 13, 14, 16, 17, 19};
    for (unsigned i = 0; i < sizeof(faults); i++)
        rt_set_handler(faults[i], task_fault);

    struct cpu *c = &cpus[0];
    cpu_tables(c);
    if (!cfg_wdfail) {
        u64 ch = rt_cmdline_uint("chan", 0);
        int r = have_abi ? pv_chan_open(&kchan[0], (int)ch, 0) : -PV_ENOSYS;
        if (r == 0) {
            kchan[0].relay = cfg_relay;
            nkchan = 1;
            pv_chan_route_irq(&kchan[0], DB_VEC, bsp);
            pv_printf("rtos: channel %lu gpa=0x%lx size=%lu gsi=%u flags=0x%x path=%s\n", ch,
                      kchan[0].gpa, kchan[0].size, kchan[0].gsi, kchan[0].flags,
                      cfg_relay ? "relay" : "kernel");
        } else {
            pv_printf("rtos: no channel %lu (%d), using an in-guest loopback\n", ch, r);
            pv_chan_open_local(&kchan[0], loopback_mem, sizeof(loopback_mem), 0);
            pv_chan_route_irq(&kchan[0], DB_VEC, bsp);
            pv_chan_peer_view(&kchan[1], &kchan[0]);
            pv_chan_route_irq(&kchan[1], DB_VEC + 1, bsp);
            kchan[0].peer_vector = DB_VEC + 1;
            kchan[0].peer_apic = bsp;
            nkchan = 2;
            task_create(c, "echo", echo, 0, 1, 0);
        }
        for (int i = 0; i < nkchan; i++)
            rt_set_handler(DB_VEC + i, doorbell_irq);   /* the RTOS's own handler */
        task_create(c, "consumer", consumer, 0, 1, 1);
        task_create(c, "producer", producer, 0, 1, 1);
    }
    task_create(c, "watchdog", watchdog_task, 0, 0, 0);
    task_create(c, "worker", worker, 0, 3, 0);

    for (int i = 1; i < ncpus; i++)
        if (!rt_start_ap(rt_cpu_index(cpus[i].apic), ap_main, 1000000))
            pv_printf("rtos: cpu %d (apic %u) did not start\n", i, cpus[i].apic);
    enter_idle(c);
}
