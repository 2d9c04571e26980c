/*
 * corevisor test guests: linked (and loaded) at 1 MiB physical, identity mapped.
 * Preprocessed twice by the Makefile:
 *   default:          ELF64 with a PVH note and a multiboot header at file offset 0x1FF0
 *   -DMULTIBOOT_ONLY: multiboot header first, no PVH note (converted to ELF32 afterwards)
 *
 * Why 0x1FF0: the multiboot spec (and GRUB) search the first 8192 bytes of the file,
 * but QEMU's -kernel loader only looks at offsets below 8144, and when it finds a
 * multiboot header in an ELF64 file it refuses to boot it ("Cannot load x86-64 image,
 * give a 32bit one") instead of trying PVH. At 0x1FF0 (the .text section starts at file
 * offset 0x1000, see ASSERT below) the header is inside the spec's window and outside
 * QEMU's, so QEMU boots the ELF64 image through its PVH note.
 */
OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(_start)

PHDRS
{
    text PT_LOAD FLAGS(5);      /* R X */
    data PT_LOAD FLAGS(6);      /* R W */
#ifndef MULTIBOOT_ONLY
    note PT_NOTE FLAGS(4);      /* the PVH entry note */
#endif
}

SECTIONS
{
    . = 0x100000;
    __image_start = .;

    .text : {
#ifdef MULTIBOOT_ONLY
        KEEP(*(.multiboot))
        *(.text.boot)
#else
        *(.text.boot)
        ASSERT(. <= 0x100FF0, "boot code overlaps the multiboot header slot");
        . = 0xFF0;
        KEEP(*(.multiboot))
#endif
        *(.text.unlikely .text.unlikely.*)
        *(.text.startup .text.startup.*)
        *(.text .text.*)
    } :text

    .rodata : {
        *(.rodata .rodata.*)
    } :text

#ifndef MULTIBOOT_ONLY
    .note.Xen : {
        KEEP(*(.note.Xen))
    } :text :note
#endif

    . = ALIGN(4096);
    .data : {
        *(.data .data.*)
    } :data

    .bss (NOLOAD) : {
        . = ALIGN(4096);
        __bss_start = .;
        *(.bss.pagetables)
        *(.bss .bss.* COMMON)
        . = ALIGN(16);
        __bss_end = .;
        /* Stacks: part of the image's memory size, but never zeroed (saves CPL0 time). */
        *(.stack)
        . = ALIGN(16);
    } :data

    __image_end = .;

    /DISCARD/ : {
        *(.eh_frame*) *(.comment) *(.note.GNU-stack) *(.note.gnu.*) *(.gnu.*)
#ifdef MULTIBOOT_ONLY
        *(.note.Xen)
#endif
    }
}
