//! The allow-list of each kind of Kite thread: the system calls it makes once confined,
//! found by tracing every test scenario and reviewed by hand. Anything else ends the
//! process (see `super`). Arguments are checked where a call could do much more than
//! the thread needs: `ioctl` requests, no executable memory from `mmap` and `mprotect`.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

use super::ThreadKind;

/// System-call rules: calls allowed whatever their arguments (an empty list), or when one
/// of the rules matches.
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

const KVMIO: u32 = 0xae;
const UFFDIO: u32 = 0xaa;

/// `_IOC` with the size of `T`.
const fn ioc<T>(dir: u32, ty: u32, nr: u32) -> u64 {
    ioctl_expr(dir, ty, nr, std::mem::size_of::<T>() as u32) as u64
}

/// `KVM_RUN`.
pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u64;
/// `KVM_GET_REGS` (a crashed vCPU's RIP; a saved vCPU state).
pub const KVM_GET_REGS: u64 = ioc::<kvm_bindings::kvm_regs>(_IOC_READ, KVMIO, 0x81);
/// `KVM_GET_SREGS` (a saved vCPU state, as the other `KVM_GET_*` of a vCPU below).
pub const KVM_GET_SREGS: u64 = ioc::<kvm_bindings::kvm_sregs>(_IOC_READ, KVMIO, 0x83);
/// `KVM_GET_MSRS` (`struct kvm_msrs`: its header).
pub const KVM_GET_MSRS: u64 = ioc::<kvm_bindings::kvm_msrs>(_IOC_READ | _IOC_WRITE, KVMIO, 0x88);
/// `KVM_GET_FPU` (hosts without XSAVE).
pub const KVM_GET_FPU: u64 = ioc::<kvm_bindings::kvm_fpu>(_IOC_READ, KVMIO, 0x8c);
/// `KVM_GET_LAPIC`.
pub const KVM_GET_LAPIC: u64 = ioc::<kvm_bindings::kvm_lapic_state>(_IOC_READ, KVMIO, 0x8e);
/// `KVM_GET_CPUID2` (`struct kvm_cpuid2`: its header).
pub const KVM_GET_CPUID2: u64 =
    ioc::<kvm_bindings::kvm_cpuid2>(_IOC_READ | _IOC_WRITE, KVMIO, 0x91);
/// `KVM_GET_MP_STATE`.
pub const KVM_GET_MP_STATE: u64 = ioc::<kvm_bindings::kvm_mp_state>(_IOC_READ, KVMIO, 0x98);
/// `KVM_GET_VCPU_EVENTS`.
pub const KVM_GET_VCPU_EVENTS: u64 = ioc::<kvm_bindings::kvm_vcpu_events>(_IOC_READ, KVMIO, 0x9f);
/// `KVM_GET_DEBUGREGS`.
pub const KVM_GET_DEBUGREGS: u64 = ioc::<kvm_bindings::kvm_debugregs>(_IOC_READ, KVMIO, 0xa1);
/// `KVM_GET_XSAVE` (hosts without `KVM_CAP_XSAVE2`).
pub const KVM_GET_XSAVE: u64 = ioc::<kvm_bindings::kvm_xsave>(_IOC_READ, KVMIO, 0xa4);
/// `KVM_GET_XCRS`.
pub const KVM_GET_XCRS: u64 = ioc::<kvm_bindings::kvm_xcrs>(_IOC_READ, KVMIO, 0xa6);
/// `KVM_GET_TSC_KHZ`.
pub const KVM_GET_TSC_KHZ: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0xa3, 0) as u64;
/// `KVM_GET_XSAVE2`.
pub const KVM_GET_XSAVE2: u64 = ioc::<kvm_bindings::kvm_xsave>(_IOC_READ, KVMIO, 0xcf);
/// `UFFDIO_REGISTER` (`struct uffdio_register`: a range and two u64s).
pub const UFFDIO_REGISTER: u64 = ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, 0x00, 32) as u64;
/// `UFFDIO_UNREGISTER` (`struct uffdio_range`).
pub const UFFDIO_UNREGISTER: u64 = ioctl_expr(_IOC_READ, UFFDIO, 0x01, 16) as u64;
/// `UFFDIO_WAKE` (`struct uffdio_range`).
pub const UFFDIO_WAKE: u64 = ioctl_expr(_IOC_READ, UFFDIO, 0x02, 16) as u64;
/// `UFFDIO_COPY` (`struct uffdio_copy`).
pub const UFFDIO_COPY: u64 = ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, 0x03, 40) as u64;
/// `UFFDIO_ZEROPAGE` (`struct uffdio_zeropage`).
pub const UFFDIO_ZEROPAGE: u64 = ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, 0x04, 32) as u64;
/// `UFFDIO_POISON` (`struct uffdio_poison`): a page whose source cannot be read.
pub const UFFDIO_POISON: u64 = ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, 0x08, 32) as u64;
/// `TCSETS`: the terminal put back as it was, on the way out.
pub const TCSETS: u64 = 0x5402;
/// `TCGETS`: the terminal's mode read (raw mode for a VM's console).
pub const TCGETS: u64 = 0x5401;
/// `TIOCGPGRP`: whether Kite is in the terminal's foreground (before it takes stdin).
pub const TIOCGPGRP: u64 = 0x540f;

fn cond(arg: u8, op: Op, value: u64) -> Cond {
    Cond::new(arg, Len::Qword, op, value).expect("a valid condition")
}

fn rule(conditions: Vec<Cond>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule with conditions")
}

/// `ioctl` with one of `requests`.
fn ioctls(requests: &[u64]) -> Vec<SeccompRule> {
    requests
        .iter()
        .map(|r| rule(vec![cond(1, Op::Eq, *r)]))
        .collect()
}

/// Calls allowed with any arguments.
fn allow(rules: &mut Rules, calls: &[i64]) {
    for call in calls {
        rules.entry(*call).or_default();
    }
}

/// What every thread does: allocate and free memory (never executable), lock (futex),
/// log (write), drop descriptors, take random seeds, read clocks, handle signals (the
/// vCPU kick), end; and put the terminal back (`ioctl(0, TCSETS)`).
fn common() -> Rules {
    let mut rules = Rules::new();
    allow(
        &mut rules,
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_getrandom,
            libc::SYS_clock_gettime,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    let not_executable = || vec![rule(vec![cond(2, Op::MaskedEq(libc::PROT_EXEC as u64), 0)])];
    rules.insert(libc::SYS_mmap, not_executable());
    rules.insert(libc::SYS_mprotect, not_executable());
    // Freeing memory (the allocator, thread exit, discarding unplugged blocks) and the
    // advice Kite gives guest memory; not advice that acts on the host (HWPOISON,
    // SOFT_OFFLINE, ...).
    rules.insert(
        libc::SYS_madvise,
        [
            libc::MADV_DONTNEED,
            libc::MADV_FREE,
            libc::MADV_HUGEPAGE,
            libc::MADV_DONTDUMP,
        ]
        .iter()
        .map(|advice| rule(vec![cond(2, Op::Eq, *advice as u64)]))
        .collect(),
    );
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![
            cond(0, Op::Eq, libc::STDIN_FILENO as u64),
            cond(1, Op::Eq, TCSETS),
        ])],
    );
    // The standard library checks that a descriptor it takes over is open (debug builds).
    add_fcntls(&mut rules, &[libc::F_GETFD]);
    rules
}

/// Adds `commands` to the thread's allowed `fcntl`s.
fn add_fcntls(rules: &mut Rules, commands: &[libc::c_int]) {
    rules.entry(libc::SYS_fcntl).or_default().extend(
        commands
            .iter()
            .map(|c| rule(vec![cond(1, Op::Eq, *c as u64)])),
    );
}

/// Adds `requests` to the thread's allowed `ioctl`s.
fn add_ioctls(rules: &mut Rules, requests: &[u64]) {
    rules
        .entry(libc::SYS_ioctl)
        .or_default()
        .extend(ioctls(requests));
}

/// An event loop (event-manager over epoll) reading eventfds.
fn event_loop(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_read,
        ],
    );
}

/// Adds `more` to `rules`: a call allowed whatever its arguments in either stays so.
fn merge(rules: &mut Rules, more: Rules) {
    for (call, more_rules) in more {
        match rules.get_mut(&call) {
            None => {
                rules.insert(call, more_rules);
            }
            Some(existing) if existing.is_empty() => {}
            Some(_) if more_rules.is_empty() => {
                rules.insert(call, more_rules);
            }
            Some(existing) => existing.extend(more_rules),
        }
    }
}

/// `ioctl` on KVM (type `KVMIO`) and userfaultfd (`UFFDIO`) descriptors, and the
/// terminal's mode read.
fn build_ioctls() -> Vec<SeccompRule> {
    let of_type = |ty: u32| rule(vec![cond(1, Op::MaskedEq(0xff00), u64::from(ty) << 8)]);
    vec![
        of_type(KVMIO),
        of_type(UFFDIO),
        rule(vec![cond(1, Op::Eq, TCGETS)]),
        rule(vec![cond(1, Op::Eq, TCSETS)]),
        rule(vec![cond(1, Op::Eq, TIOCGPGRP)]),
    ]
}

/// What building a VM takes: opening the kernel, initramfs and disks (and `/dev/kvm`),
/// KVM's VM and vCPU setup, eventfds and timers, userfaultfd, OFD locks, threads.
fn build(rules: &mut Rules) {
    for call in [
        libc::SYS_openat,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_userfaultfd,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        libc::SYS_sched_getaffinity,
        libc::SYS_fcntl,
        libc::SYS_dup,
        // A thread it starts installs its own filter over this one.
        libc::SYS_seccomp,
        libc::SYS_getpgrp,
    ] {
        // Whatever the arguments, even where another kind checks them.
        rules.insert(call, Vec::new());
    }
    merge(rules, Rules::from([(libc::SYS_ioctl, build_ioctls())]));
}

/// What writing a snapshot takes: its directory made, filled (the memory file sized,
/// written where the guest has data, after the pagemap says which pages were touched),
/// synced and renamed into place, or removed after a failure.
fn snapshot(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_mkdir,
            libc::SYS_ftruncate,
            libc::SYS_pwrite64,
            libc::SYS_fsync,
            libc::SYS_renameat2,
            libc::SYS_getdents64,
            libc::SYS_unlinkat,
        ],
    );
}

/// The rules of threads of `kind`.
pub fn rules(kind: ThreadKind) -> Rules {
    rules_of(kind)
}

fn rules_of(kind: ThreadKind) -> Rules {
    let mut rules = common();
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN and its exits: port and MMIO accesses go to devices, which write
            // eventfds (common), read them (a reset drains queue notifications), clone
            // them for a device setup. A paused vCPU saves its own state when asked (its
            // thread owns the descriptor): its last exit completed (KVM_RUN), then each
            // part read (an FPU, XSAVE or XSAVE2 read as the host has them).
            add_ioctls(
                &mut rules,
                &[
                    KVM_RUN,
                    KVM_GET_REGS,
                    KVM_GET_SREGS,
                    KVM_GET_MSRS,
                    KVM_GET_FPU,
                    KVM_GET_LAPIC,
                    KVM_GET_CPUID2,
                    KVM_GET_MP_STATE,
                    KVM_GET_VCPU_EVENTS,
                    KVM_GET_DEBUGREGS,
                    KVM_GET_XSAVE,
                    KVM_GET_XCRS,
                    KVM_GET_XSAVE2,
                    KVM_GET_TSC_KHZ,
                ],
            );
            allow(&mut rules, &[libc::SYS_read]);
            add_fcntls(&mut rules, &[libc::F_DUPFD_CLOEXEC]);
        }
        ThreadKind::Block => {
            event_loop(&mut rules);
            allow(
                &mut rules,
                &[
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                ],
            );
        }
        ThreadKind::Rng => event_loop(&mut rules),
        ThreadKind::Mem => {
            // Plugging and unplugging: regions opened and discarded inside the hotplug
            // area (mprotect, madvise: common), lazy ones registered with userfaultfd.
            event_loop(&mut rules);
            add_ioctls(&mut rules, &[UFFDIO_REGISTER, UFFDIO_UNREGISTER]);
        }
        ThreadKind::FaultHandler => {
            allow(
                &mut rules,
                &[
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_read,
                    libc::SYS_pread64,
                ],
            );
            add_ioctls(
                &mut rules,
                &[UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE, UFFDIO_POISON],
            );
        }
        ThreadKind::Api => {
            // One poll(2) loop over the listener, the stop eventfd and every client:
            // accept4, non-blocking mode (FIONBIO), SO_PEERCRED (getsockopt), reads
            // (read, recvfrom), writes (sendto: send with MSG_NOSIGNAL) and the write
            // side shut before a lingering close (shutdown); an eventfd per answer the
            // VMM thread gives later (an action on the VM's life).
            add_ioctls(&mut rules, &[libc::FIONBIO]);
            allow(
                &mut rules,
                &[
                    libc::SYS_eventfd2,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_accept4,
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_shutdown,
                ],
            );
        }
        ThreadKind::Vmm => {
            // Threads it starts keep its filter under their own, so it allows what each
            // of them does; and what building a VM takes.
            for kind in ThreadKind::ALL {
                if kind != ThreadKind::Vmm {
                    merge(&mut rules, rules_of(kind));
                }
            }
            build(&mut rules);
            snapshot(&mut rules);
        }
        ThreadKind::Main => {
            // The event loop, console input, kicking and waiting for vCPUs, removing the
            // control socket, tearing guest memory down.
            event_loop(&mut rules);
            allow(
                &mut rules,
                &[
                    libc::SYS_tgkill,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_fstat,
                    libc::SYS_shutdown,
                ],
            );
            // Guest memory torn down: lazy ranges unregistered (KVM slots go with the VM).
            add_ioctls(&mut rules, &[UFFDIO_UNREGISTER]);
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From <linux/kvm.h>, <linux/userfaultfd.h>, <asm/ioctls.h>.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_FPU, 0x81a0_ae8c);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_CPUID2, 0xc008_ae91);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_GET_DEBUGREGS, 0x8080_aea1);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
        assert_eq!(KVM_GET_XSAVE2, 0x9000_aecf);
        assert_eq!(KVM_GET_TSC_KHZ, 0xaea3);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
    }
}
