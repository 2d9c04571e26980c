; bootsect: a two-stage boot sector for BIOS boots (corevisor run --bios --disk IMG).
;
; The BIOS loads sector 0 at 0x7C00 and jumps there in real mode with the boot drive
; in DL. Stage 1 (this sector) prints through the BIOS's teletype service (int 10h,
; AH=0Eh: SeaBIOS sends it to COM1 through its serial console), loads stage 2 (sectors
; 1..STAGE2_SECTORS) to 0x7E00 with int 13h AH=42h (an LBA read) and checks the magic
; word at its end. Stage 2 reads sector 1 again with int 13h AH=02h (a CHS read) and
; compares it with what AH=42h loaded, asks int 12h for conventional memory and int 15h
; AX=E820h for the memory map, prints what it found, waits two timer ticks (the BIOS's
; serial console sends a line's last character on its next tick) and exits through port
; 0xF4 (QEMU's isa-debug-exit; corevisor exits with the byte written): 0 if everything
; matched, 1 otherwise. Output, one line each (tests/kvm/test_bios.py asserts it):
;
;   boot: stage 1 from drive 0x80
;   boot: stage 2: 4 sectors by int 13h AH=42h, magic ok
;   boot: int 13h AH=02h read of sector 1 matches
;   boot: int 12h: 639 KiB, int 15h E820: N entries
;   boot: exit 0
;
; Built with nasm (guests/Makefile): a raw disk image, stage 2 and padding included.

        bits 16
        org 0x7C00

STAGE2_SECTORS  equ 4
STAGE2_ADDR     equ 0x7E00
CHS_BUF         equ 0x9000
E820_BUF        equ 0xA000
MAGIC           equ 0x5A17
DISK_SECTORS    equ 2048                ; the image: 1 MiB (BIOSes want a few cylinders)

stage1:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7C00
        sti
        cld
        mov [drive], dl
        mov si, msg_stage1
        call print
        mov al, [drive]
        call print_hex8
        call newline

        mov si, dap                     ; int 13h AH=42h: extended read, LBA 1..4
        mov ah, 0x42
        mov dl, [drive]
        int 0x13
        jc read_failed
        cmp word [stage2_magic], MAGIC
        jne bad_magic
        jmp stage2

read_failed:
        mov si, msg_read_failed
        call print
        mov al, ah
        call print_hex8
        call newline
        jmp fail

bad_magic:
        mov si, msg_bad_magic
        call print
fail:
        mov al, 1
exit:                                   ; AL = status
        sti                             ; two timer ticks first: SeaBIOS's serial console
        mov cx, 2                       ; sends its last character on a tick (sercon.c)
.tick:
        mov bx, [0x46C]                 ; the BDA's tick counter
.same:
        hlt
        cmp bx, [0x46C]
        je .same
        loop .tick
        out 0xF4, al
.halt:
        cli
        hlt
        jmp .halt

; print the NUL-terminated string at DS:SI through int 10h AH=0Eh
print:
        lodsb
        test al, al
        jz .done
        mov ah, 0x0E
        mov bx, 0x0007
        int 0x10
        jmp print
.done:
        ret

newline:
        mov si, msg_crlf
        jmp print

; print AL as "0x" and two hex digits
print_hex8:
        push ax
        mov si, msg_0x
        call print
        pop ax
        push ax
        shr al, 4
        call .digit
        pop ax
        and al, 0x0F
.digit:
        add al, '0'
        cmp al, '9'
        jbe .out
        add al, 'a' - '0' - 10
.out:
        mov ah, 0x0E
        mov bx, 0x0007
        int 0x10
        ret

dap:                                    ; disk address packet
        db 0x10, 0
        dw STAGE2_SECTORS
        dw STAGE2_ADDR, 0
        dq 1

drive:          db 0
msg_stage1:     db "boot: stage 1 from drive ", 0
msg_read_failed: db "boot: int 13h AH=42h failed, AH=", 0
msg_bad_magic:  db "boot: stage 2 magic is wrong", 13, 10, 0
msg_0x:         db "0x", 0
msg_crlf:       db 13, 10, 0

        times 510 - ($ - $$) db 0
        dw 0xAA55

; ---------------------------------------------------------------------------------------
stage2:
        mov si, msg_stage2
        call print

        mov ax, 0x0201                  ; int 13h AH=02h: read 1 sector, CHS 0/0/2 = LBA 1
        mov cx, 0x0002
        xor dh, dh
        mov dl, [drive]
        mov bx, CHS_BUF
        int 0x13
        jc .chs_failed
        mov si, STAGE2_ADDR
        mov di, CHS_BUF
        mov cx, 256
        repe cmpsw
        jne .chs_differs
        mov si, msg_chs_ok
        call print

        int 0x12                        ; conventional memory in KiB
        mov [kib], ax
        xor ebx, ebx                    ; int 15h E820: count the entries
        xor bp, bp
.e820:
        mov eax, 0xE820
        mov edx, 0x534D4150             ; "SMAP"
        mov ecx, 20
        mov di, E820_BUF
        int 0x15
        jc .e820_done
        cmp eax, 0x534D4150
        jne .e820_done
        inc bp
        test ebx, ebx
        jnz .e820
.e820_done:
        mov si, msg_int12
        call print
        mov ax, [kib]
        call print_dec
        mov si, msg_e820
        call print
        mov ax, bp
        call print_dec
        mov si, msg_entries
        call print
        test bp, bp
        jz .no_map
        mov si, msg_exit0
        call print
        xor al, al
        jmp exit
.no_map:
        mov si, msg_exit1
        call print
        jmp fail
.chs_failed:
        mov si, msg_chs_failed
        call print
        jmp fail
.chs_differs:
        mov si, msg_chs_differs
        call print
        jmp fail

; print AX in decimal
print_dec:
        xor cx, cx
        mov bx, 10
.divide:
        xor dx, dx
        div bx
        push dx
        inc cx
        test ax, ax
        jnz .divide
.emit:
        pop ax
        add al, '0'
        mov ah, 0x0E
        push cx
        mov bx, 0x0007
        int 0x10
        pop cx
        loop .emit
        ret

kib:            dw 0
msg_stage2:     db "boot: stage 2: 4 sectors by int 13h AH=42h, magic ok", 13, 10, 0
msg_chs_ok:     db "boot: int 13h AH=02h read of sector 1 matches", 13, 10, 0
msg_chs_failed: db "boot: int 13h AH=02h failed", 13, 10, 0
msg_chs_differs: db "boot: int 13h AH=02h read differs from AH=42h", 13, 10, 0
msg_int12:      db "boot: int 12h: ", 0
msg_e820:       db " KiB, int 15h E820: ", 0
msg_entries:    db " entries", 13, 10, 0
msg_exit0:      db "boot: exit 0", 13, 10, 0
msg_exit1:      db "boot: exit 1", 13, 10, 0

        times 512 + STAGE2_SECTORS * 512 - 2 - ($ - $$) db 0
stage2_magic:   dw MAGIC
        times DISK_SECTORS * 512 - ($ - $$) db 0
