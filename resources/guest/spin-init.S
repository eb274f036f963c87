/*
 * An /init that makes no system call and never exits. Where guest user space cannot make
 * system calls (a stock kernel on a kvm_pvm host), the guest kernel then stays up after
 * `Run /init`, serving its devices (memory hotplug tests). Built with the machine's gcc.
 */
    .globl _start
    .text
_start:
    pause
    jmp     _start
    .section .note.GNU-stack, "", @progbits
