/*
 * kvm_floor: the smallest VMM that boots corevisor's bundled PVH guests, used as the
 * benchmark floor.  It does what every VMM has to do for these guests and nothing else:
 *
 *   /dev/kvm -> VM -> one anonymous memory slot -> TSS address, in-kernel irqchip, PIT
 *   -> one vCPU with the host-supported CPUID -> ELF PT_LOAD segments + PVH entry note
 *   -> GDT, hvm_start_info (command line, memory map, RSDP), a one-CPU MP table and
 *      an empty ACPI RSDT
 *   -> 32-bit protected-mode registers
 *   -> KVM_RUN loop.
 *
 * Exits handled in the loop (the same ones corevisor's device models handle):
 *   out 0x3F8          serial THR: the byte goes to stdout (write(2), unbuffered),
 *                      unless LCR.DLAB (out 0x3FB) makes it the divisor latch
 *   in  0x3FD          serial LSR: 0x60 (THR empty, transmitter idle)
 *   out 0x80           the "device model" under test: a counter
 *   out 0xF4           isa-debug-exit style: exit(status)
 *   other in           0xFF; other out: ignored
 *   MMIO               reads 0xFF, writes ignored (the in-kernel irqchip owns the LAPIC)
 *   anything else      message on stderr, exit 1
 *
 * Usage: kvm_floor IMAGE CMDLINE      (KVM_FLOOR_VERBOSE=1: exit counts on stderr)
 *
 * Written from scratch for corevisor's bench/; Linux <linux/kvm.h> only.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEM_SIZE        (64ULL << 20)
#define GDT_ADDR        0x0500ULL
#define START_INFO_ADDR 0x1000ULL
#define MEMMAP_ADDR     0x1100ULL
#define CMDLINE_ADDR    0x2000ULL
#define CMDLINE_MAX     0x1000ULL
#define TSS_ADDR        0xfffbd000ULL
#define LOW_RAM_END     0x9fc00ULL
#define MPTABLE_ADDR    0x9fc00ULL      /* start of the EBDA, the first place guests scan */
#define RSDP_ADDR       0x9fc60ULL      /* after the MP table, 16-byte aligned */
#define RSDT_ADDR       0x9fc80ULL
#define BDA_EBDA_SEG    0x40eULL
#define HIGH_RAM_START  0x100000ULL

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578u

#define PORT_COM1       0x3f8
#define PORT_COM1_LCR   0x3fb
#define PORT_COM1_LSR   0x3fd
#define PORT_POST       0x80
#define PORT_EXIT       0xf4

struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
};

static void die(const char *what)
{
    fprintf(stderr, "kvm_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *what)
{
    fprintf(stderr, "kvm_floor: %s\n", what);
    exit(1);
}

static uint8_t *mem;

static void *gpa(uint64_t addr, uint64_t len)
{
    if (addr > MEM_SIZE || len > MEM_SIZE - addr)
        fail("guest address outside RAM");
    return mem + addr;
}

/* Load PT_LOAD segments at their physical addresses; return the PVH 32-bit entry. */
static uint32_t load_elf(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat");
    size_t size = (size_t)st.st_size;
    uint8_t *img = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (img == MAP_FAILED)
        die("mmap image");
    close(fd);

    if (size < sizeof(Elf64_Ehdr))
        fail("image too small");
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)img;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_machine != EM_X86_64 || eh->e_phentsize != sizeof(Elf64_Phdr))
        fail("not an x86-64 ELF64 image");
    if (eh->e_phoff > size || (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > size - eh->e_phoff)
        fail("program headers outside the file");

    int64_t entry = -1;
    const Elf64_Phdr *ph = (const Elf64_Phdr *)(img + eh->e_phoff);
    for (int i = 0; i < eh->e_phnum; i++) {
        const Elf64_Phdr *p = &ph[i];
        if (p->p_offset > size || p->p_filesz > size - p->p_offset)
            fail("segment outside the file");
        if (p->p_type == PT_LOAD) {
            if (p->p_filesz > p->p_memsz)
                fail("segment filesz > memsz");
            uint8_t *dst = gpa(p->p_paddr, p->p_memsz);
            memcpy(dst, img + p->p_offset, p->p_filesz);
            memset(dst + p->p_filesz, 0, p->p_memsz - p->p_filesz);
        } else if (p->p_type == PT_NOTE) {
            uint64_t off = 0;
            while (off + sizeof(Elf64_Nhdr) <= p->p_filesz) {
                const Elf64_Nhdr *n = (const Elf64_Nhdr *)(img + p->p_offset + off);
                uint64_t name_off = off + sizeof(*n);
                uint64_t desc_off = name_off + ((n->n_namesz + 3) & ~3u);
                uint64_t next = desc_off + ((n->n_descsz + 3) & ~3u);
                if (next > p->p_filesz)
                    break;
                const char *name = (const char *)(img + p->p_offset + name_off);
                if (n->n_type == XEN_ELFNOTE_PHYS32_ENTRY && n->n_namesz == 4 &&
                    !memcmp(name, "Xen", 4) && n->n_descsz >= 4) {
                    uint32_t e32;
                    memcpy(&e32, img + p->p_offset + desc_off, 4);
                    entry = e32;
                }
                off = next;
            }
        }
    }
    munmap(img, size);
    if (entry < 0)
        fail("no PVH entry note (Xen ELF note type 18)");
    return (uint32_t)entry;
}

static uint8_t checksum(const uint8_t *p, size_t n)
{
    uint8_t sum = 0;
    while (n--)
        sum += *p++;
    return (uint8_t)-sum;
}

/*
 * A minimal Intel MP table (spec 1.4) for one CPU: floating pointer + configuration table
 * with a single processor entry.  The bundled guests look for it to count CPUs; without
 * one they scan the BIOS area byte range by range at CPL0 (emulated here, ~0.1 s).
 */
static void write_mptable(void)
{
    uint8_t *fp = gpa(MPTABLE_ADDR, 16 + 44 + 20);
    uint8_t *ct = fp + 16;
    uint32_t ct_addr = (uint32_t)MPTABLE_ADDR + 16;
    uint16_t ct_len = 44 + 20, one = 1;
    uint32_t lapic = 0xfee00000;
    memset(fp, 0, 16 + ct_len);

    memcpy(fp, "_MP_", 4);
    memcpy(fp + 4, &ct_addr, 4);
    fp[8] = 1;                      /* length in 16-byte units */
    fp[9] = 4;                      /* spec revision 1.4 */
    fp[10] = checksum(fp, 16);

    memcpy(ct, "PCMP", 4);
    memcpy(ct + 4, &ct_len, 2);
    ct[6] = 4;
    memcpy(ct + 8, "KVMFLOOR", 8);
    memcpy(ct + 16, "BENCH       ", 12);
    memcpy(ct + 34, &one, 2);       /* entry count */
    memcpy(ct + 36, &lapic, 4);
    uint8_t *cpu = ct + 44;
    cpu[0] = 0;                     /* processor entry */
    cpu[1] = 0;                     /* LAPIC ID */
    cpu[2] = 0x14;                  /* LAPIC version */
    cpu[3] = 3;                     /* enabled | bootstrap processor */
    ct[7] = checksum(ct, ct_len);

    uint16_t seg = (uint16_t)(MPTABLE_ADDR >> 4);
    memcpy(gpa(BDA_EBDA_SEG, 2), &seg, 2);
}

/*
 * ACPI: an RSDP (revision 0) pointing at an RSDT with no tables.  The guests always look
 * for an RSDP too (start_info.rsdp_paddr, else a scan of 0xE0000-0xFFFFF at emulated CPL0);
 * an empty RSDT tells them "no MADT" at once, and the MP table counts the CPUs.
 */
static void write_acpi(void)
{
    uint8_t *rsdp = gpa(RSDP_ADDR, 20);
    uint8_t *rsdt = gpa(RSDT_ADDR, 36);
    uint32_t rsdt_addr = (uint32_t)RSDT_ADDR, rsdt_len = 36, one = 1;
    memset(rsdp, 0, 20);
    memcpy(rsdp, "RSD PTR ", 8);
    memcpy(rsdp + 9, "KVMFLR", 6);
    rsdp[15] = 0;                   /* ACPI 1.0 */
    memcpy(rsdp + 16, &rsdt_addr, 4);
    rsdp[8] = checksum(rsdp, 20);

    memset(rsdt, 0, 36);
    memcpy(rsdt, "RSDT", 4);
    memcpy(rsdt + 4, &rsdt_len, 4);
    rsdt[8] = 1;                    /* revision */
    memcpy(rsdt + 10, "KVMFLR", 6);
    memcpy(rsdt + 16, "BENCH   ", 8);
    memcpy(rsdt + 24, &one, 4);
    rsdt[9] = checksum(rsdt, 36);
}

static uint64_t gdt_entry(uint32_t base, uint32_t limit, uint16_t flags)
{
    /* flags: access byte in bits 0-7, G/DB/L/AVL nibble in bits 12-15 */
    return ((uint64_t)(base & 0xff000000) << 32) | ((uint64_t)(flags & 0xf0ff) << 40) |
           ((uint64_t)(limit & 0x000f0000) << 32) | ((uint64_t)(base & 0x00ffffff) << 16) |
           (uint64_t)(limit & 0x0000ffff);
}

static struct kvm_segment seg_from(uint16_t sel, uint64_t desc)
{
    struct kvm_segment s = {0};
    s.selector = sel;
    s.base = (uint32_t)(((desc >> 16) & 0xffffff) | ((desc >> 32) & 0xff000000));
    uint32_t limit = (uint32_t)((desc & 0xffff) | ((desc >> 32) & 0xf0000));
    s.g = (desc >> 55) & 1;
    s.limit = s.g ? (limit << 12) | 0xfff : limit;
    s.type = (desc >> 40) & 0xf;
    s.s = (desc >> 44) & 1;
    s.dpl = (desc >> 45) & 3;
    s.present = (desc >> 47) & 1;
    s.avl = (desc >> 52) & 1;
    s.l = (desc >> 53) & 1;
    s.db = (desc >> 54) & 1;
    return s;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s IMAGE CMDLINE\n", argv[0]);
        return 2;
    }
    const char *image = argv[1], *cmdline = argv[2];
    int verbose = getenv("KVM_FLOOR_VERBOSE") != NULL;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        fail("unexpected KVM API version");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");

    mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
               -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    if (ioctl(vm, KVM_SET_TSS_ADDR, (unsigned long)TSS_ADDR) < 0)
        die("KVM_SET_TSS_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = 0};
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
        die("KVM_CREATE_PIT2");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    /* CPUID: whatever the host KVM supports, grown until it fits. */
    struct kvm_cpuid2 *cpuid = NULL;
    for (int nent = 64;; nent *= 2) {
        cpuid = realloc(cpuid, sizeof(*cpuid) + (size_t)nent * sizeof(struct kvm_cpuid_entry2));
        if (!cpuid)
            fail("out of memory");
        memset(cpuid, 0, sizeof(*cpuid));
        cpuid->nent = (uint32_t)nent;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
            break;
        if (errno != E2BIG || nent > 4096)
            die("KVM_GET_SUPPORTED_CPUID");
    }
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");

    /* Guest image and boot data. */
    uint32_t entry = load_elf(image);

    uint64_t gdt[5] = {
        0,
        gdt_entry(0, 0xfffff, 0xa09b),   /* 0x08: code64 */
        gdt_entry(0, 0xfffff, 0xc09b),   /* 0x10: code32, flat */
        gdt_entry(0, 0xfffff, 0xc093),   /* 0x18: data, flat */
        gdt_entry(0, 0x67, 0x008b),      /* 0x20: 32-bit TSS (busy) */
    };
    memcpy(gpa(GDT_ADDR, sizeof(gdt)), gdt, sizeof(gdt));

    size_t cl = strlen(cmdline);
    if (cl >= CMDLINE_MAX)
        fail("command line too long");
    memcpy(gpa(CMDLINE_ADDR, cl + 1), cmdline, cl + 1);

    struct hvm_memmap_table_entry mm[2] = {
        {.addr = 0, .size = LOW_RAM_END, .type = 1},
        {.addr = HIGH_RAM_START, .size = MEM_SIZE - HIGH_RAM_START, .type = 1},
    };
    memcpy(gpa(MEMMAP_ADDR, sizeof(mm)), mm, sizeof(mm));

    struct hvm_start_info si = {
        .magic = HVM_START_MAGIC, .version = 1, .cmdline_paddr = CMDLINE_ADDR,
        .memmap_paddr = MEMMAP_ADDR, .memmap_entries = 2, .rsdp_paddr = RSDP_ADDR,
    };
    memcpy(gpa(START_INFO_ADDR, sizeof(si)), &si, sizeof(si));
    write_mptable();
    write_acpi();

    /* 32-bit protected mode, paging off, flat segments (PVH entry state). */
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs = seg_from(0x10, gdt[2]);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg_from(0x18, gdt[3]);
    sregs.tr = seg_from(0x20, gdt[4]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = sizeof(gdt) - 1;
    sregs.cr0 = 0x11; /* PE | ET */
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = {0};
    regs.rip = entry;
    regs.rbx = START_INFO_ADDR;
    regs.rflags = 2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    /* The exit loop. */
    uint64_t post_writes = 0, io_exits = 0, mmio_exits = 0;
    uint8_t lcr = 0; /* serial LCR: with DLAB (bit 7) set, port 0x3F8 is the divisor latch */
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            io_exits++;
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint32_t len = (uint32_t)run->io.size * run->io.count;
            uint16_t port = run->io.port;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (port == PORT_POST) {
                    post_writes += run->io.count;
                } else if (port == PORT_COM1_LCR) {
                    lcr = data[0];
                } else if (port == PORT_COM1 && !(lcr & 0x80)) {
                    for (uint32_t i = 0; i < run->io.count; i++) {
                        ssize_t w;
                        do
                            w = write(1, data + (size_t)i * run->io.size, 1);
                        while (w < 0 && errno == EINTR);
                    }
                } else if (port == PORT_EXIT) {
                    uint32_t status = 0;
                    memcpy(&status, data, run->io.size < 4 ? run->io.size : 4);
                    if (verbose)
                        fprintf(stderr, "kvm_floor: exit status %u, port80 writes %llu, "
                                        "io exits %llu, mmio exits %llu\n",
                                status, (unsigned long long)post_writes,
                                (unsigned long long)io_exits, (unsigned long long)mmio_exits);
                    exit((int)(status & 0xff));
                }
            } else {
                memset(data, port == PORT_COM1_LSR ? 0x60 : 0xff, len);
            }
            break;
        }
        case KVM_EXIT_MMIO:
            mmio_exits++;
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
            break;
        case KVM_EXIT_SHUTDOWN:
            fail("guest shutdown (triple fault)");
            break;
        case KVM_EXIT_HLT:
            fail("guest halted");
            break;
        case KVM_EXIT_INTERNAL_ERROR:
            fprintf(stderr, "kvm_floor: internal error, suberror %u\n", run->internal.suberror);
            exit(1);
        case KVM_EXIT_FAIL_ENTRY:
            fprintf(stderr, "kvm_floor: entry failed, reason 0x%llx\n",
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            exit(1);
        default:
            fprintf(stderr, "kvm_floor: unhandled exit reason %u\n", run->exit_reason);
            exit(1);
        }
    }
}
