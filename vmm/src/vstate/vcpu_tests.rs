//! Tests of the vCPU run loop, pause protocol and state save/restore, on real KVM.

use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use kvm_bindings::{kvm_mp_state, kvm_regs, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use memory::{MemorySlots, SlotMapping};
use vm_device::bus::{PioAddressOffset, PioRange};
use vm_device::MutDevicePio;

use super::*;
use crate::seccomp::SeccompMode;
use crate::vstate::persist::VmState;
use crate::vstate::vm::tests::{vm, Memory};
use crate::vstate::vm::KvmSlots;

/// Longest a test waits for the guest (a busy machine, guest code emulated).
const PATIENCE: Duration = Duration::from_secs(30);
/// Guest RAM, from address 0.
const RAM: usize = 0x10000;
/// Where vCPU `n`'s code is.
const fn code(n: u8) -> u64 {
    0x1000 + 0x10 * n as u64
}
/// The port vCPU `n` counts through (two bytes wide).
const fn port(n: u8) -> u16 {
    0x10 + 2 * n as u16
}
/// Offsets in the code of its instructions: `in`, `out`, `jmp`.
const IN: u64 = 0;
const OUT: u64 = 2;
const JMP: u64 = 4;

/// 16-bit real-mode code: `l: in ax, PORT; out PORT, ax; jmp l`: the guest reads a
/// counter from the port's device and writes each value back. Emulator-friendly; a
/// port access repeated or lost shows as a value written twice or missing.
fn counter(port: u16) -> [u8; 6] {
    [0xe5, port as u8, 0xe7, port as u8, 0xeb, 0xfa]
}

/// A port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    In,
    Out,
}

/// The device behind a vCPU's port: a counter the guest reads, and the values it
/// wrote back.
#[derive(Default)]
struct Counter {
    /// What the next read gives.
    next: u16,
    /// Values written, in order.
    outs: Vec<u16>,
    /// The VM is paused right after this access (by the vCPU thread, which parks
    /// before its next `KVM_RUN`: the exit of that access not completed yet).
    pause_after: Option<(Access, u16, Arc<VcpuControl>)>,
}

#[derive(Default)]
struct Shared {
    counter: Mutex<Counter>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counter> {
        self.counter.lock().unwrap()
    }

    /// The values written once there are more than `count` (panics past `PATIENCE`).
    fn outs_beyond(&self, count: usize) -> Vec<u16> {
        let deadline = Instant::now() + PATIENCE;
        let mut counter = self.lock();
        while counter.outs.len() <= count {
            let now = Instant::now();
            assert!(
                now < deadline,
                "the guest wrote {} values, not more than {count}, in {PATIENCE:?}",
                counter.outs.len()
            );
            counter = self
                .changed
                .wait_timeout(counter, deadline - now)
                .unwrap()
                .0;
        }
        counter.outs.clone()
    }
}

struct Port(Arc<Shared>);

impl Port {
    fn accessed(counter: &mut Counter, access: Access, value: u16) {
        if let Some((at, when, control)) = &counter.pause_after {
            if (*at, *when) == (access, value) {
                control.pause();
                counter.pause_after = None;
            }
        }
    }
}

impl MutDevicePio for Port {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        let mut counter = self.0.lock();
        let value = counter.next;
        counter.next = value.wrapping_add(1);
        data.copy_from_slice(&value.to_le_bytes());
        Self::accessed(&mut counter, Access::In, value);
    }

    fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, data: &[u8]) {
        let value = u16::from_le_bytes(data.try_into().expect("a 2-byte write"));
        let mut counter = self.0.lock();
        if counter.outs.len() < 1 << 20 {
            counter.outs.push(value);
        }
        Self::accessed(&mut counter, Access::Out, value);
        self.0.changed.notify_all();
    }
}

/// A VM whose vCPU `n` counts through port `port(n)` with its code at `code(n)`, in
/// real mode. Fields drop in order: vCPUs, VM, slots, then memory.
struct Counting {
    vcpus: Vec<Vcpu>,
    vm: Vm,
    ports: Vec<Arc<Shared>>,
    _slots: Arc<KvmSlots>,
    memory: Memory,
}

impl Counting {
    /// With `count` vCPUs, vCPU `n`'s counter from `n << 12`; or, with `copy_of`,
    /// that VM's memory and counters (for vCPUs to restore).
    fn new(vm: Vm, count: u8, copy_of: Option<&mut Counting>) -> Counting {
        let mut memory = Memory::new(RAM);
        let ports: Vec<Arc<Shared>> = (0..count).map(|_| Arc::default()).collect();
        match copy_of {
            Some(other) => {
                memory.bytes().copy_from_slice(other.memory.bytes());
                for (port, theirs) in ports.iter().zip(&other.ports) {
                    port.lock().next = theirs.lock().next;
                }
            }
            None => {
                for n in 0..count {
                    let at = code(n) as usize;
                    memory.bytes()[at..at + 6].copy_from_slice(&counter(port(n)));
                    ports[usize::from(n)].lock().next = u16::from(n) << 12;
                }
            }
        }
        let slots = vm.memory_slots();
        slots
            .map(&SlotMapping {
                slot: 0,
                guest_addr: 0,
                size: RAM as u64,
                host_addr: memory.addr(),
            })
            .unwrap();
        let mut io = IoManager::new();
        for (n, shared) in ports.iter().enumerate() {
            // Two bytes: the guest reads and writes AX.
            let range = PioRange::new(PioAddress(port(n as u8)), 2).unwrap();
            io.register_pio(range, Arc::new(Mutex::new(Port(Arc::clone(shared)))))
                .unwrap();
        }
        let io = Arc::new(io);
        let vcpus: Vec<Vcpu> = (0..count)
            .map(|n| Vcpu::new(&vm, n, count, Arc::clone(&io)).unwrap())
            .collect();
        Counting {
            vcpus,
            vm,
            ports,
            _slots: slots,
            memory,
        }
    }

    /// Points every vCPU at its code, in real mode, runnable.
    fn boot(&self) {
        for vcpu in &self.vcpus {
            let mut sregs = vcpu.fd.get_sregs().unwrap();
            (sregs.cs.base, sregs.cs.selector) = (0, 0);
            vcpu.fd.set_sregs(&sregs).unwrap();
            let regs = kvm_regs {
                rip: code(vcpu.id),
                rflags: 0x2,
                ..Default::default()
            };
            vcpu.fd.set_regs(&regs).unwrap();
            let runnable = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            vcpu.fd.set_mp_state(runnable).unwrap();
        }
    }

    /// Starts the vCPUs on their threads, under Kite's seccomp filter for vCPUs (a
    /// call it does not allow ends the test process).
    fn start(&mut self, control: &Arc<VcpuControl>) -> Running {
        install_kick_handler().unwrap();
        let confinement = Confinement::new(SeccompMode::On).unwrap();
        let (tx, stops) = channel();
        let stop_event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let handles = self
            .vcpus
            .drain(..)
            .map(|vcpu| {
                vcpu.start(
                    Arc::clone(control),
                    tx.clone(),
                    stop_event.try_clone().unwrap(),
                    Arc::clone(&confinement),
                )
                .unwrap()
            })
            .collect();
        Running {
            control: Arc::clone(control),
            handles,
            stops,
        }
    }
}

struct Running {
    control: Arc<VcpuControl>,
    handles: Vec<VcpuHandle>,
    stops: Receiver<(u8, VcpuStop)>,
}

impl Running {
    /// Pauses the VM and waits until every vCPU is parked.
    fn pause(&self) {
        self.control.pause();
        self.wait_paused();
    }

    /// Waits until every vCPU is parked (the VM paused by a device).
    fn wait_paused(&self) {
        let kick = || self.handles.iter().for_each(VcpuHandle::kick);
        assert!(
            self.control
                .wait_paused(self.handles.len(), Instant::now() + PATIENCE, kick),
            "the vCPUs did not pause"
        );
    }

    /// Stops the vCPUs; each must stop because asked to.
    fn stop(self) {
        self.control.stop();
        let deadline = Instant::now() + PATIENCE;
        for handle in self.handles {
            assert!(handle.stop(deadline), "a vCPU did not stop");
        }
        for (id, why) in self.stops.try_iter() {
            assert_eq!(why, VcpuStop::Requested, "vCPU {id}");
        }
    }
}

/// What a saved vCPU's registers must say of its counter: the value last read is in
/// AX, whichever instruction is next (so an IN whose exit was not completed, its value
/// lost, shows).
fn check_counter(state: &VcpuState, counter: &Counter) {
    let offset = state.regs.rip - code(state.id);
    assert!(
        [IN, OUT, JMP].contains(&offset),
        "vCPU {}: offset {offset}",
        state.id
    );
    assert_eq!(
        state.regs.rax as u16,
        counter.next.wrapping_sub(1),
        "vCPU {}: AX at offset {offset} is not the value last read",
        state.id
    );
}

/// The parts in which two states of a vCPU differ, but for the TSC, which moves on
/// (and the TSC deadline, which may follow it), and for the XSAVE header's XSTATE_BV:
/// whether the host's XSAVE marked a component in its initial state (seen here for
/// SSE, depending on the host's timing) says nothing of the state, whose area KVM
/// fills with the initial values either way.
fn differing_parts(a: &VcpuState, b: &VcpuState) -> Vec<&'static str> {
    let msrs = |state: &VcpuState| {
        let mut msrs = state.msrs.clone();
        msrs.retain(|m| ![0x10, 0x6e0].contains(&m.index));
        msrs
    };
    /// XSTATE_BV: bytes 512 to 519 of the area.
    const XSTATE_BV: std::ops::Range<usize> = 128..130;
    let xsave = |state: &VcpuState| {
        state.xsave.clone().map(|mut area| {
            area[XSTATE_BV].fill(0);
            area
        })
    };
    [
        ("id", a.id == b.id),
        ("CPUID", a.cpuid == b.cpuid),
        ("MSRs", msrs(a) == msrs(b)),
        ("registers", a.regs == b.regs),
        ("special registers", a.sregs == b.sregs),
        ("XSAVE", xsave(a) == xsave(b)),
        ("FPU", a.fpu == b.fpu),
        ("XCRs", a.xcrs == b.xcrs),
        ("debug registers", a.debug_regs == b.debug_regs),
        ("local APIC", a.lapic == b.lapic),
        ("MP state", a.mp_state == b.mp_state),
        ("vCPU events", a.vcpu_events == b.vcpu_events),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(part, _)| part)
    .collect()
}

/// Has `first` paused right after vCPU 0's `access` of `value` (armed while it does
/// not run: the guest is fast).
fn pause_after(first: &Counting, control: &Arc<VcpuControl>, access: Access, value: u16) {
    first.ports[0].lock().pause_after = Some((access, value, Arc::clone(control)));
}

/// Waits for `first` to pause (see [`pause_after`]) as `access` of `value` asked,
/// saves its state, restores it into a new VM with a copy of its memory and counter,
/// and checks that the new VM goes on counting exactly where the first stopped; then
/// that the first does too when resumed (with `then`, armed first).
fn save_restore_after(
    first: &mut Counting,
    running: &Running,
    (access, value): (Access, u16),
    next_offset: u64,
    then: Option<(Access, u16)>,
) {
    running.wait_paused();
    assert!(
        first.ports[0].lock().pause_after.is_none(),
        "paused by the device"
    );
    let outs = first.ports[0].lock().outs.clone();
    assert_eq!(
        *outs.last().unwrap(),
        value - u16::from(access == Access::In)
    );

    let states = running
        .control
        .save_states(1, Instant::now() + PATIENCE)
        .expect("the paused vCPU's state");
    let vm_state = first.vm.save_state().expect("the VM's state");
    assert_eq!(states.len(), 1);
    check_counter(&states[0], &first.ports[0].lock());
    assert_eq!(
        states[0].regs.rip,
        code(0) + next_offset,
        "its exit completed"
    );
    assert!(states[0].msrs.iter().any(|m| m.index == 0x10), "the TSC");

    // What a snapshot file holds.
    let json = serde_json::to_string(&states).unwrap();
    let states_back: Vec<VcpuState> = serde_json::from_str(&json).unwrap();
    assert_eq!(states_back, states);
    let vm_json = serde_json::to_string(&vm_state).unwrap();
    let vm_state_back: VmState = serde_json::from_str(&vm_json).unwrap();
    assert_eq!(serde_json::to_string(&vm_state_back).unwrap(), vm_json);

    // Another VM, with a copy of the memory and the device, and the saved state.
    let mut second = Counting::new(vm().unwrap(), 1, Some(first));
    second.vm.restore_state(&vm_state_back).unwrap();
    second.vcpus[0].restore(&states_back[0]).unwrap();
    // Read back before it runs: what was restored.
    let restored = second.vcpus[0].save_state().unwrap();
    assert_eq!(differing_parts(&restored, &states[0]), Vec::<&str>::new());
    let running2 = second.start(&Arc::new(VcpuControl::default()));
    let went_on = second.ports[0].outs_beyond(2);
    let expected: Vec<u16> = (1..=3)
        .map(|i| outs.last().unwrap().wrapping_add(i))
        .collect();
    assert_eq!(
        went_on[..3],
        expected,
        "the restored guest goes on from {outs:?}"
    );
    running2.stop();

    // And the paused one goes on the same way when resumed.
    if let Some((access, value)) = then {
        pause_after(first, &running.control, access, value);
    }
    running.control.resume();
    let went_on = first.ports[0].outs_beyond(outs.len() + 2);
    assert_eq!(went_on[outs.len()..outs.len() + 3], expected);
}

#[test]
fn a_restored_vcpu_goes_on_where_the_saved_one_stopped() {
    let Some(vm) = vm() else {
        return;
    };
    let mut first = Counting::new(vm, 1, None);
    first.boot();
    let control = Arc::new(VcpuControl::default());
    // Paused with the guest's read of 20 not completed: AX is set (and RIP moved past
    // the IN) at the next KVM_RUN, which the save makes.
    pause_after(&first, &control, Access::In, 20);
    let running = first.start(&control);
    let write_40 = (Access::Out, 40);
    save_restore_after(&mut first, &running, (Access::In, 20), OUT, Some(write_40));
    // Paused after its write of 40 (complete or not, as KVM does it).
    save_restore_after(&mut first, &running, write_40, JMP, None);
    running.stop();
}

#[test]
fn a_paused_vms_vcpus_save_their_states_or_say_why_not() {
    let Some(vm) = vm() else {
        return;
    };
    let mut machine = Counting::new(vm, 2, None);
    machine.boot();
    let control = Arc::new(VcpuControl::default());
    let running = machine.start(&control);
    machine.ports[0].outs_beyond(3);
    machine.ports[1].outs_beyond(3);
    let later = || Instant::now() + PATIENCE;

    // Running: an error at once, whatever the deadline.
    assert!(matches!(
        control.save_states(2, later()),
        Err(VcpuError::NotPaused { count: 2, .. })
    ));

    running.pause();
    let states = control.save_states(2, later()).expect("both states");
    assert_eq!(states.iter().map(|s| s.id).collect::<Vec<_>>(), [0, 1]);
    for (state, port) in states.iter().zip(&machine.ports) {
        check_counter(state, &port.lock());
    }
    // Each has its own local APIC (the ID register).
    assert_ne!(
        states[0].lapic.regs[0x20..0x24],
        states[1].lapic.regs[0x20..0x24]
    );

    // More vCPUs than are paused: an error at once.
    assert!(matches!(
        control.save_states(3, later()),
        Err(VcpuError::NotPaused {
            paused: 2,
            count: 3
        })
    ));

    // Past its deadline: an error, not a wait; the answers coming late are dropped.
    let asked = Instant::now();
    assert!(matches!(
        control.save_states(2, asked),
        Err(VcpuError::SaveTimeout { saved: 0, count: 2 })
    ));
    assert!(asked.elapsed() < Duration::from_secs(1));

    // Asked again in time: the same states (the vCPUs stayed paused).
    let again = control.save_states(2, later()).expect("both states again");
    assert_eq!(
        again.iter().map(|s| (s.id, s.regs)).collect::<Vec<_>>(),
        states.iter().map(|s| (s.id, s.regs)).collect::<Vec<_>>()
    );

    // Resumed: they count on, and their states are no longer to be had.
    control.resume();
    let counted = machine.ports[1].lock().outs.len();
    machine.ports[1].outs_beyond(counted);
    assert!(matches!(
        control.save_states(2, later()),
        Err(VcpuError::NotPaused { count: 2, .. })
    ));

    // Stopped: the vCPU threads are gone.
    running.stop();
    control.pause();
    assert!(matches!(
        control.save_states(2, later()),
        Err(VcpuError::VcpuGone { gone: 2 })
    ));
}

#[test]
fn vcpus_that_never_ran_are_saved_and_a_state_goes_only_to_its_own_vcpu() {
    let Some(vm1) = vm() else {
        return;
    };
    // Not booted: vCPU 0 runnable at the reset vector, vCPU 1 waiting for a SIPI.
    let mut machine = Counting::new(vm1, 2, None);
    let states: Vec<VcpuState> = machine
        .vcpus
        .iter_mut()
        .map(|vcpu| vcpu.save_state().unwrap())
        .collect();
    assert_eq!(states[0].mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
    assert_eq!(states[1].mp_state.mp_state, KVM_MP_STATE_UNINITIALIZED);
    assert_eq!(states[0].regs.rip, 0xfff0);
    assert!(matches!(
        machine.vcpus[0].restore(&states[1]),
        Err(VcpuError::WrongVcpu { id: 0, state: 1 })
    ));
    let mut other = Counting::new(vm().unwrap(), 2, Some(&mut machine));
    for (vcpu, state) in other.vcpus.iter_mut().zip(&states) {
        vcpu.restore(state).unwrap();
        let restored = vcpu.save_state().unwrap();
        assert_eq!(differing_parts(&restored, state), Vec::<&str>::new());
    }
}

#[test]
fn a_tsc_of_another_frequency_is_scaled_or_refused() {
    let Some(vm1) = vm() else {
        return;
    };
    let mut machine = Counting::new(vm1, 1, None);
    let mut state = machine.vcpus[0].save_state().unwrap();
    let here = state.tsc_khz.expect("KVM tells the TSC frequency");
    state.tsc_khz = Some(here + 100_000);
    let mut other = Counting::new(vm().unwrap(), 1, Some(&mut machine));
    match other.vcpus[0].restore(&state) {
        // A host with TSC scaling runs the guest's TSC at its old rate.
        Ok(()) => assert_eq!(
            other.vcpus[0].save_state().unwrap().tsc_khz,
            Some(here + 100_000)
        ),
        Err(e) => assert!(
            e.to_string().contains(&format!(
                "the snapshot's TSC ran at {} kHz, this host's at {here} kHz",
                here + 100_000
            )),
            "{e}"
        ),
    }
}

/// A kick that lands after the vCPU last looked at why it might stop, just before it
/// enters `KVM_RUN`, is not lost: that `KVM_RUN` returns at once, the guest running no
/// further; the next one runs the guest as usual.
#[test]
fn a_kick_just_before_kvm_run_is_not_lost() {
    let Some(vm) = vm() else {
        return;
    };
    let mut guest = Counting::new(vm, 1, None);
    guest.boot();
    install_kick_handler().unwrap();
    let mut vcpu = guest.vcpus.pop().unwrap();
    let counter = Arc::clone(&guest.ports[0]);
    let _kicks = KickTarget::set(&mut vcpu.fd);
    // SAFETY: sends the kick signal, whose handler is installed, to this very thread; the
    // handler has run by the time the call returns.
    let sent = unsafe { libc::pthread_kill(libc::pthread_self(), SIGRTMIN()) };
    assert_eq!(sent, 0);
    assert!(matches!(vcpu.run_once(), RunState::Running));
    assert_eq!(counter.lock().next, 0, "the guest ran after the kick");
    assert_eq!(
        vcpu.fd.get_kvm_run().immediate_exit,
        0,
        "the kick stays set"
    );
    assert!(matches!(vcpu.run_once(), RunState::Running));
    assert_eq!(counter.lock().next, 1, "the guest did not run on");
}
