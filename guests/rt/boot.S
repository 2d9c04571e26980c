/*
 * corevisor test-guest runtime: boot entry (PVH and multiboot v1), long-mode switch,
 * interrupt stubs, CPL3 entry/return and the AP start-up trampoline.
 *
 * Everything here runs at CPL0, which the test host emulates instruction by instruction,
 * so it is kept short: no big loops besides filling the 4 page directories.
 */

#define MB_MAGIC        0x1BADB002
#define MB_FLAGS        0x00000003          /* page-align modules, want memory info */
#define MB_BOOT_MAGIC   0x2BADB002
#define PVH_MAGIC       0x336ec578

#define SEL_CODE64      0x08
#define SEL_DATA        0x10
#define SEL_CODE32      0x18
#define SEL_UCODE       0x23                /* 0x20 | RPL3 */
#define SEL_UDATA       0x2B                /* 0x28 | RPL3 */

#define MSR_EFER        0xC0000080
#define EFER_LME        0x100

        .section .note.GNU-stack, "", @progbits

/* ---- multiboot v1 header ------------------------------------------------------------ */
        .section .multiboot, "a"
        .balign 4
        .globl mb_header
mb_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

/* ---- PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) --------------------------------------- */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* namesz: "Xen\0" */
        .long 4                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_start         /* 32-bit physical entry */

/* ---- 32-bit entry points ----------------------------------------------------------- */
        .section .text.boot, "ax"
        .code32

/* ELF entry (multiboot loaders, generic loaders): eax = 0x2BADB002 for multiboot. */
        .globl _start
_start:
        cli
        cld
        cmpl $MB_BOOT_MAGIC, %eax
        jne 1f
        movl $1, %ecx                   /* boot kind 1: multiboot, ebx = multiboot info */
        jmp common32
1:      xorl %ecx, %ecx                 /* boot kind 0: unknown */
        testl %ebx, %ebx
        jz common32
        cmpl $PVH_MAGIC, (%ebx)
        jne common32
        /* fall through: it is a PVH start_info after all */

/* PVH entry: ebx = physical address of struct hvm_start_info. */
        .globl pvh_start
pvh_start:
        cli
        cld
        movl $2, %ecx                   /* boot kind 2: PVH */

common32:
        movl %ecx, %ebp
        movl %ebx, %esi
        lgdt gdt_ptr
        movl $SEL_DATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movl %eax, %fs
        movl %eax, %gs
        ljmp $SEL_CODE32, $1f
1:      movl $boot_stack_top, %esp

        /* Zero .bss (page tables, IDT, globals; not the stacks). */
        movl $__bss_start, %edi
        movl $__bss_end, %ecx
        subl %edi, %ecx
        shrl $2, %ecx
        xorl %eax, %eax
        rep stosl

        movl %ebp, boot_kind
        movl %esi, boot_info

        /* PML4[0] -> PDPT, PDPT[0..3] -> PD0..PD3: P | RW | US. */
        movl $pdpt + 7, pml4
        movl $pd + 0x0007, pdpt
        movl $pd + 0x1007, pdpt + 8
        movl $pd + 0x2007, pdpt + 16
        movl $pd + 0x3007, pdpt + 24
        /* 2048 PDEs of 2 MiB: P | RW | US | PS, identity map of 0..4 GiB. */
        movl $pd, %edi
        movl $0x87, %eax
        movl $2048, %ecx
2:      movl %eax, (%edi)
        addl $0x200000, %eax
        addl $8, %edi
        decl %ecx
        jnz 2b

        call enter_long_mode
        ljmp $SEL_CODE64, $long_entry

/* Shared by the BSP and the APs: paging on with our PML4, EFER.LME, CR4.PAE. */
enter_long_mode:
        movl $pml4, %eax
        movl %eax, %cr3
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $MSR_EFER, %ecx
        rdmsr
        orl $EFER_LME, %eax
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* PG | PE */
        andl $~0x60000000, %eax         /* caches on (clear CD, NW) */
        movl %eax, %cr0
        ret

/* APs arrive here from the real-mode trampoline, in 32-bit protected mode. */
        .globl ap_entry32
ap_entry32:
        movl $SEL_DATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movl ap_boot_stack, %esp
        call enter_long_mode
        ljmp $SEL_CODE64, $ap_long_entry

/* ---- 64-bit entry ------------------------------------------------------------------ */
        .code64
long_entry:
        movl $SEL_DATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        xorl %eax, %eax
        movl %eax, %fs
        movl %eax, %gs
        movq $boot_stack_top, %rsp
        xorl %ebp, %ebp
        call rt_start                   /* never returns */
3:      cli
        hlt
        jmp 3b

ap_long_entry:
        movl $SEL_DATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        xorl %eax, %eax
        movl %eax, %fs
        movl %eax, %gs
        movl ap_boot_stack(%rip), %esp
        xorl %ebp, %ebp
        call rt_ap_start                /* never returns */
4:      cli
        hlt
        jmp 4b

/* ---- interrupt stubs: 256 of them, 16 bytes apart from isr_stubs ------------------- */
        .text
        .balign 16
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        .if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq $0                        /* no CPU error code: push a dummy */
        .endif
        pushq $vec
        jmp isr_common
        .set vec, vec + 1
        .endr

isr_common:
        cmpq $0x80, (%rsp)
        je user_return
        /* PVM (this host's /dev/kvm) raises #UD for "int $0x80" at CPL3 instead of using the
         * gate: treat #UD at exactly that instruction the same way. */
        cmpq $6, (%rsp)
        jne 1f
        cmpq $user_exit_insn, 16(%rsp)
        je user_return
1:
        pushq %r15
        pushq %r14
        pushq %r13
        pushq %r12
        pushq %r11
        pushq %r10
        pushq %r9
        pushq %r8
        pushq %rbp
        pushq %rdi
        pushq %rsi
        pushq %rdx
        pushq %rcx
        pushq %rbx
        pushq %rax
        movq %rsp, %rdi                 /* struct trap_frame * */
        cld
        call rt_trap
        popq %rax
        popq %rbx
        popq %rcx
        popq %rdx
        popq %rsi
        popq %rdi
        popq %rbp
        popq %r8
        popq %r9
        popq %r10
        popq %r11
        popq %r12
        popq %r13
        popq %r14
        popq %r15
        addq $16, %rsp                  /* vector, error code */
        iretq

/* ---- CPL3 support ------------------------------------------------------------------- */
/* u64 run_user(u64 (*fn)(u64), u64 arg): run fn(arg) at CPL3 with IF=1 and IOPL=3 on the
 * user stack; returns fn's result once the user side executes int $0x80. BSP only. */
        .globl run_user
run_user:
        pushfq
        pushq %rbx
        pushq %rbp
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, user_saved_rsp(%rip)
        movq %rsp, %rax
        andq $~15, %rax
        movq %rax, tss + 4(%rip)        /* TSS.rsp0: traps from CPL3 land below this frame */
        pushq $SEL_UDATA                /* ss */
        movq $user_stack_top, %rax
        pushq %rax                      /* rsp */
        pushq $0x3202                   /* rflags: IOPL=3, IF=1 */
        pushq $SEL_UCODE                /* cs */
        movq $user_trampoline, %rax
        pushq %rax                      /* rip */
        iretq

/* CPL3: rdi = fn, rsi = arg. */
user_trampoline:
        movq %rdi, %rax
        movq %rsi, %rdi
        call *%rax
user_exit_insn:
        int $0x80                       /* back to run_user's caller, rax = result */
5:      jmp 5b

/* int $0x80 from CPL3 (via isr_common): drop the trap frame, resume run_user's caller. */
user_return:
        movq user_saved_rsp(%rip), %rsp
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %rbp
        popq %rbx
        popfq
        ret

/* ---- AP trampoline: copied to 0x8000 (SIPI vector 0x08), entered in real mode ------ */
        .section .rodata
        .code16
        .balign 16
        .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
        cli
        cld
        movw %cs, %ax
        movw %ax, %ds
        lgdtl tramp_gdtr - ap_tramp_start
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $SEL_CODE32, $ap_entry32
        .balign 8
tramp_gdtr:
        .word gdt_end - gdt - 1
        .long gdt
ap_tramp_end:
        .code64

/* ---- data ---------------------------------------------------------------------------- */
        .data
        .balign 16
        .globl gdt, gdt_tss
gdt:
        .quad 0                         /* 0x00 null */
        .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00CF9A000000FFFF        /* 0x18 kernel code, 32-bit */
        .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit, DPL3 */
        .quad 0x00CFF2000000FFFF        /* 0x28 user data, DPL3 */
gdt_tss:
        .quad 0, 0                      /* 0x30 TSS (filled in by rt_start) */
gdt_end:

        .balign 8
        .word 0, 0, 0
        .globl gdt_ptr
gdt_ptr:                                /* 2-byte limit + 8-byte base (6 used in 32-bit) */
        .word gdt_end - gdt - 1
        .quad gdt

        .globl boot_kind, boot_info, ap_boot_stack, user_saved_rsp
        .balign 8
boot_kind:      .long 0
boot_info:      .long 0
ap_boot_stack:  .quad 0
user_saved_rsp: .quad 0

/* ---- page tables (zeroed .bss) -------------------------------------------------------- */
        .section .bss.pagetables, "aw", @nobits
        .balign 4096
        .globl pml4, pdpt, pd
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096

/* ---- stacks (not zeroed) ----------------------------------------------------------- */
        .section .stack, "aw", @nobits
        .balign 16
        .skip 16384
        .globl boot_stack_top
boot_stack_top:
        .skip 16384
        .globl user_stack_top
user_stack_top:
        .balign 16
        .globl ap_stacks
ap_stacks:                              /* MAX_CPUS (16) x 8 KiB */
        .skip 16 * 8192
