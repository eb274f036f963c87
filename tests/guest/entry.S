/*
 * Kite's test guest, kernel-mode part: as little as possible, since kernel-mode code may
 * run under KVM's instruction emulator. Kite enters here in 64-bit mode (Linux 64-bit boot
 * protocol, %rsi = zero page). Map the first 16 GiB (RAM, MMIO, the hotplug area) for
 * user mode, load a GDT with user
 * segments and a TSS, an IDT with one gate, and drop to ring 3, where guest_main runs
 * natively and does its MMIO itself.
 *
 * Port output goes through the gate: user code puts the port in %dx and the byte in %al and
 * executes ud2; the #UD handler does the out and returns past the ud2. (Hosts whose KVM
 * emulates guest kernel code, kvm_pvm, do not honour IOPL for a guest that is not
 * paravirtualized, so ring 3 cannot do port I/O itself there.)
 */
    .code64
    .section .text.entry, "ax"
    .global _start
_start:
    cli
    /* 16 page directories of 2 MiB pages: present, writable, user, large. */
    lea     page_dirs(%rip), %rdi
    mov     $0x87, %rax
    mov     $8192, %ecx
1:  mov     %rax, (%rdi)
    add     $0x200000, %rax
    add     $8, %rdi
    dec     %ecx
    jnz     1b
    /* PDPT entries 0-15 -> the page directories; PML4 entry 0 -> the PDPT. */
    lea     pdpt(%rip), %rdi
    lea     page_dirs(%rip), %rax
    or      $0x7, %rax
    mov     $16, %ecx
2:  mov     %rax, (%rdi)
    add     $0x1000, %rax
    add     $8, %rdi
    dec     %ecx
    jnz     2b
    lea     pdpt(%rip), %rax
    or      $0x7, %rax
    lea     pml4(%rip), %rdi
    mov     %rax, (%rdi)
    mov     %rdi, %cr3
    /* Same kernel selectors as Kite's boot GDT (code 0x08, data 0x10), plus user ones and
     * the TSS (its base patched in here: the linker cannot split an address). */
    lea     tss(%rip), %rax
    lea     gdt_tss(%rip), %rdi
    mov     %ax, 2(%rdi)
    shr     $16, %rax
    mov     %al, 4(%rdi)
    mov     %ah, 7(%rdi)
    shr     $16, %rax
    mov     %eax, 8(%rdi)
    lea     kernel_stack_top(%rip), %rax
    lea     tss(%rip), %rdi
    mov     %rax, 4(%rdi)               /* RSP0 */
    lgdt    gdt_desc(%rip)
    mov     $0x28, %ax
    ltr     %ax
    /* The #UD gate (vector 6): a 64-bit interrupt gate to ud_gate, DPL 0. */
    lea     ud_gate(%rip), %rax
    lea     idt(%rip), %rdi
    mov     %ax, 6*16(%rdi)
    movw    $0x08, 6*16+2(%rdi)
    movw    $0x8e00, 6*16+4(%rdi)
    shr     $16, %rax
    mov     %ax, 6*16+6(%rdi)
    shr     $16, %rax
    mov     %eax, 6*16+8(%rdi)
    lidt    idt_desc(%rip)
    /* To ring 3: SS, RSP, RFLAGS (interrupts off), CS, RIP; the zero page in %rdi. */
    lea     kernel_stack_top(%rip), %rsp
    mov     %rsi, %rdi
    pushq   $0x1b
    lea     user_stack_top(%rip), %rax
    push    %rax
    pushq   $0x0002
    pushq   $0x23
    lea     guest_main(%rip), %rax
    push    %rax
    iretq

/* #UD from user mode: out %al, %dx, then resume after the two-byte ud2. */
ud_gate:
    out     %al, %dx
    addq    $2, (%rsp)
    iretq

    .section .data
    .align 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff    /* 0x10 kernel data */
    .quad 0x00cff3000000ffff    /* 0x18 user data */
    .quad 0x00affb000000ffff    /* 0x20 user code, 64-bit */
gdt_tss:
    .quad 0x0000890000000067    /* 0x28 TSS (available), base patched at start */
    .quad 0
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt
idt_desc:
    .word 32 * 16 - 1
    .quad idt

    .section .bss
    .align 4096
idt:        .skip 32 * 16
    .align 16
tss:        .skip 104
    .align 4096
kernel_stack: .skip 16 * 1024
kernel_stack_top:
    .align 4096
pml4:       .skip 4096
pdpt:       .skip 4096
page_dirs:  .skip 16 * 4096
user_stack: .skip 64 * 1024
user_stack_top:

    .section .note.GNU-stack, "", @progbits
