/*
 * ptstress: page-table stress, the memory-virtualization benchmark guest.
 *
 *   pages=256 spaces=4 iters=200 warm=1 pattern=seq|rand|shared
 *
 * `spaces` address spaces, each its own page-table set (PML4 -> PDPT -> PD -> PTs) that
 * shares the runtime's identity map (PML4[0]) and maps a private window of `pages` 4 KiB
 * pages at 512 GiB (PML4[1]). One iteration visits every space in turn:
 *   1. switch to it: a system call (`int $0x81`) whose CPL0 side writes CR3;
 *   2. map: write `pages` PTEs, page k -> a frame chosen by the pattern;
 *   3. touch: store a word in each page through the window, read it back through the
 *      identity map (so a wrong mapping is caught);
 *   4. unmap: clear the PTEs. The next CR3 write flushes their TLB entries.
 * Patterns: seq (space s, page k -> its own frame s * pages + k, every iteration);
 * rand (a different scattering over the spaces * pages pool at each visit, from a
 * fixed-seed LCG); shared (page k -> frame k in every space: one frame, several
 * mappings).
 *
 * Steps 2-4 run at CPL3, writing the page tables through the user-accessible identity
 * map; only the CR3 write (step 1) is CPL0, a trap handler of a few dozen instructions
 * (the PVM test host emulates CPL0). That is the work an OS kernel does for mmap,
 * page faults, munmap and context switches, and exactly what shadow paging makes
 * expensive (each PTE write to a shadowed table, each first touch, each CR3 write can
 * trap to the hypervisor) and nested paging (EPT/NPT) leaves in the guest.
 *
 * Output (two lines):
 *   ptstress: pages=<P> spaces=<S> iters=<N> pattern=<p>
 *   ptstress: iters=<N> ns_per_iter=<T> ns_per_page=<t> cr3_switches=<N*S> tsc_khz=<k>
 * `warm` untimed iterations come first; time is the TSC's, in ns from rt_tsc_khz().
 * Exit status 0; 1 after "ptstress: mismatch iter <i> space <s> page <k>" (the first)
 * and "ptstress: <n> mismatches"; 2 after "ptstress: bad parameters ..." or
 * "ptstress: needs <K> KiB of RAM".
 */
#include "rt/rt.h"

#define WINDOW 0x0000008000000000UL /* PML4 index 1: 512 GiB */
#define PTE_P 0x1UL
#define PTE_RW 0x2UL
#define PTE_US 0x4UL
#define PTE_FLAGS (PTE_P | PTE_RW | PTE_US)
#define PAGE 4096UL
#define MAX_SPACES 64
#define MAX_PAGES 65536 /* a 256 MiB window: 128 page tables per space */

enum { SEQ, RAND, SHARED };

extern u64 pml4[];          /* the runtime's page tables (boot.S) */
extern char __image_end[];

/* The CR3 switch, a system call: rdi = the new CR3, `int $0x81` through a DPL3 gate.
 * Under PVM (the test host) `int $N` at CPL3 raises #UD instead of using the gate, and
 * SYSCALL lands on LSTAR still at CPL3 (a CR3 write there is a #GP, measured), so the
 * #UD handler treats #UD at exactly this instruction as the call. */
#define SWITCH_VECTOR 0x81
__asm__(".text\n"
        ".globl ptstress_switch, ptstress_switch_site\n"
        "ptstress_switch:\n"
        "ptstress_switch_site:\n"
        "  int $0x81\n"
        "  ret\n");
void ptstress_switch(u64 cr3);
extern char ptstress_switch_site[];

static void switch_handler(struct trap_frame *tf)
{
    __asm__ volatile("mov %0, %%cr3" : : "r"(tf->rdi) : "memory");
}

static void ud_handler(struct trap_frame *tf)
{
    if (tf->rip != (u64)ptstress_switch_site) {
        printf("ptstress: unexpected #UD at rip %lx\n", tf->rip);
        rt_exit(99);
    }
    switch_handler(tf);
    tf->rip += 2; /* past the 2-byte int $0x81 */
}

struct space {
    u64 *pml4, *pdpt, *pd, *pt; /* pt: npt contiguous page tables */
};

static struct space spaces[MAX_SPACES];
static u64 cfg_pages, cfg_spaces, cfg_iters, cfg_warm, cfg_pattern, frames_base, nframes;
static const char *pattern_names[] = {"seq", "rand", "shared"};
static u64 lcg = 0x2545F4914F6CDD1DUL, rand_mul, rand_off;

static u64 next_random(void)
{
    lcg = lcg * 6364136223846793005UL + 1442695040888963407UL;
    return lcg >> 33;
}

static u64 gcd(u64 a, u64 b)
{
    while (b) {
        u64 t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* pattern=rand: a new bijection k -> (mul * k + off) mod nframes for each visit, so
 * the pages of one visit never share a frame (mul coprime with nframes). */
static void new_permutation(void)
{
    do
        rand_mul = next_random() % nframes;
    while (gcd(rand_mul, nframes) != 1);
    rand_off = next_random() % nframes;
}

static u64 frame_for(u64 s, u64 k)
{
    if (cfg_pattern == SEQ)
        return s * cfg_pages + k;
    if (cfg_pattern == SHARED)
        return k;
    return (rand_mul * k + rand_off) % nframes;
}

/* Lay out the page tables and the frame pool after the image; 0 if RAM is too small. */
static u64 setup_spaces(void)
{
    u64 npt = (cfg_pages + 511) / 512;
    u64 per_space = (3 + npt) * PAGE;
    nframes = cfg_pattern == SHARED ? cfg_pages : cfg_pages * cfg_spaces;
    u64 base = ((u64)__image_end + 0x1FFFFF) & ~0x1FFFFFUL;
    frames_base = base + cfg_spaces * per_space;
    u64 end = frames_base + nframes * PAGE;
    if (end > rt_mem_kib() * 1024 || end > 0xC0000000UL) {
        printf("ptstress: needs %lu KiB of RAM\n", end / 1024);
        return 0;
    }
    memset((void *)base, 0, cfg_spaces * per_space);
    for (u64 s = 0; s < cfg_spaces; s++) {
        u8 *p = (u8 *)(base + s * per_space);
        struct space *sp = &spaces[s];
        sp->pml4 = (u64 *)p;
        sp->pdpt = (u64 *)(p + PAGE);
        sp->pd = (u64 *)(p + 2 * PAGE);
        sp->pt = (u64 *)(p + 3 * PAGE);
        sp->pml4[0] = pml4[0]; /* the shared identity map */
        sp->pml4[1] = (u64)sp->pdpt | PTE_FLAGS;
        sp->pdpt[0] = (u64)sp->pd | PTE_FLAGS;
        for (u64 j = 0; j < npt; j++)
            sp->pd[j] = ((u64)sp->pt + j * PAGE) | PTE_FLAGS;
    }
    return 1;
}

static u64 mismatches;

/* One visit of space s in iteration it (only the first mismatch of a run is printed). */
static void visit(u64 it, u64 s)
{
    struct space *sp = &spaces[s];
    ptstress_switch((u64)sp->pml4);
    if (cfg_pattern == RAND)
        new_permutation();
    for (u64 k = 0; k < cfg_pages; k++)
        sp->pt[k] = (frames_base + frame_for(s, k) * PAGE) | PTE_FLAGS;
    for (u64 k = 0; k < cfg_pages; k++)
        *(volatile u64 *)(WINDOW + k * PAGE) = (it << 32) | (s << 16) | k;
    for (u64 k = 0; k < cfg_pages; k++) {
        u64 phys = sp->pt[k] & ~0xFFFUL;
        if (*(volatile u64 *)phys != ((it << 32) | (s << 16) | k) && !mismatches++)
            printf("ptstress: mismatch iter %lu space %lu page %lu\n", it, s, k);
    }
    for (u64 k = 0; k < cfg_pages; k++)
        sp->pt[k] = 0;
}

static u64 bench(u64 unused)
{
    (void)unused;
    char pat[16] = "seq";
    cfg_pages = rt_cmdline_uint("pages", 256);
    cfg_spaces = rt_cmdline_uint("spaces", 4);
    cfg_iters = rt_cmdline_uint("iters", 200);
    cfg_warm = rt_cmdline_uint("warm", 1);
    rt_cmdline_str("pattern", pat, sizeof(pat));
    cfg_pattern = 3;
    for (u64 i = 0; i < 3; i++)
        if (!memcmp(pat, pattern_names[i], strlen(pattern_names[i]) + 1))
            cfg_pattern = i;
    if (cfg_pattern == 3 || !cfg_pages || cfg_pages > MAX_PAGES || !cfg_spaces ||
        cfg_spaces > MAX_SPACES) {
        printf("ptstress: bad parameters (pages=1..%d spaces=1..%d pattern=seq|rand|shared)\n",
               MAX_PAGES, MAX_SPACES);
        return 2;
    }
    printf("ptstress: pages=%lu spaces=%lu iters=%lu pattern=%s\n", cfg_pages, cfg_spaces,
           cfg_iters, pattern_names[cfg_pattern]);
    if (!setup_spaces())
        return 2;
    for (u64 it = 0; it < cfg_warm; it++)
        for (u64 s = 0; s < cfg_spaces; s++)
            visit(it, s);
    u64 t0 = rdtsc();
    for (u64 it = cfg_warm; it < cfg_warm + cfg_iters; it++)
        for (u64 s = 0; s < cfg_spaces; s++)
            visit(it, s);
    u64 cycles = rdtsc() - t0;
    ptstress_switch((u64)pml4);
    if (mismatches) {
        printf("ptstress: %lu mismatches\n", mismatches);
        return 1;
    }
    u64 khz = rt_tsc_khz();
    u64 ns = khz ? cycles * 1000000 / khz : 0;
    u64 iters = cfg_iters ? cfg_iters : 1;
    printf("ptstress: iters=%lu ns_per_iter=%lu ns_per_page=%lu cr3_switches=%lu tsc_khz=%lu\n",
           cfg_iters, ns / iters, ns / (iters * cfg_spaces * cfg_pages),
           cfg_iters * cfg_spaces, khz);
    return 0;
}

int main(void)
{
    rt_tsc_khz(); /* calibrated at CPL0, once */
    rt_set_user_gate(SWITCH_VECTOR, switch_handler);
    rt_set_handler(6, ud_handler);
    return (int)run_user(bench, 0);
}
