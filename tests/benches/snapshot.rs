//! Snapshot and restore benchmark, with its baselines (cold boots of the same guests) in the
//! same run; prints medians with their spread (min–max), ratios, and PASS/MISS against
//! the targets of issue 15:
//!
//! (a) restore → vCPU 0's first `KVM_RUN` (Kite logs it at info level with the
//!     `CLOCK_MONOTONIC` time; the benchmark subtracts the time it started the process),
//!     → its first exit, → the first console output, → the next complete progress line,
//!     for the test guest (`kite.test=snapshot`, 512 MiB) restored lazy, private and
//!     eager, next to two floors measured in the same run (`kite --version` spawned to
//!     its exit; the KVM VM, irqchip, PIT, two memory slots and a vCPU created in this
//!     process); for Linux (512 MiB, then with 1 GiB plugged; each snapshot taken once
//!     the guest kernel is idle): restore → `vm.resize` (128 MiB more) answered, → the
//!     restored kernel's virtio_mem driver printing the new request, → the memory
//!     plugged, and in the first run of each mode → onlined (the zonelists rebuilt, for
//!     the first memory of ZONE_MOVABLE).
//! (b) restore to ready vs a cold boot to the same point (test guest: process start →
//!     `snapshot steady`; Linux: process start → `Run /init` vs restore → resize
//!     answered).
//! (c) host RSS of the kite process right after a restore (at the first console output)
//!     and once the guest touched everything it uses (its whole boot-RAM pattern and
//!     every plugged block checked again: 640 passes later), split from
//!     `/proc/PID/smaps` into guest memory (mappings advised `MADV_DONTDUMP`, `dd`: only
//!     guest memory is) and Kite's own; and Kite's own RSS in cold-booted VMs, the
//!     smallest (64 MiB) included.
//! (d) snapshot time (`vm.snapshot` of a running VM, pause and resume included) and the
//!     memory file's apparent and allocated size for 256 MiB, 512 MiB, 1 GiB and 4 GiB
//!     of boot RAM, the guest using the same 32 MiB pattern + 4 MiB plugged; and Linux's.
//! (e) density: clones of one snapshot restored at once (each with its own disk copy),
//!     lazy and private: the time until every vCPU 0 entered `KVM_RUN` and until each
//!     guest printed a line (all of them spin: 50 busy guests share the host's CPUs),
//!     RSS and PSS per clone.
//!
//! `cargo build --release -p vmm && cargo bench -p kite-tests --bench snapshot`
//! (`KITE_BENCH_RUNS`: cold boots and restores per mode of the test guest, default 5;
//! `KITE_BENCH_CLONES`, default 50; `KITE_BENCH_LINUX_RUNS`: restores per mode of each
//! Linux snapshot, default 2; `KITE_BENCH_NO_LINUX=1` skips Linux, which boots once, about
//! a minute, then plugs 1 GiB).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kite_tests::stats::{ms, Samples};
use kite_tests::{
    api_ok, env_or, kite_binary, kvm_available, plugged, resize, spin_guest, wait_plugged, Kite,
};
use serde_json::json;
use vmm::cli::exit;

const GUEST: &str = env!("KITE_TEST_GUEST");
const MIB: u64 = 1 << 20;
const MIBF: f64 = MIB as f64;
/// The test guest's boot RAM for (a), (b), (c), (e).
const BOOT: u64 = 512 * MIB;
/// Its hotplug area, and what is plugged from the start.
const AREA: u64 = 128 * MIB;
const PLUGGED: u64 = 4 * MIB;
/// What the test guest uses: its boot-RAM pattern and the plugged blocks (its own image,
/// queues and page tables, a few hundred KiB, come on top).
const PATTERN: u64 = 32 * MIB;
const USED: u64 = PATTERN + PLUGGED;
const DISK_BYTES: u64 = 8 * MIB;
/// Passes after which the guest has checked its whole boot-RAM pattern (512 slices of
/// 64 KiB, one a pass) and every plugged block (one of 64 a pass) again: 640 is the next
/// multiple of 64 (a progress line every 64 passes).
const TOUCH_ALL_PASSES: u64 = 640;
const DEADLINE: Duration = Duration::from_secs(120);
const LINUX_BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);
const LINUX_RESIZE_DEADLINE: Duration = Duration::from_secs(10 * 60);
const RUN_INIT: &str = "Run /init as init process";
const STEADY: &str = "kite-test: snapshot steady ";
const MODES: [&str; 3] = ["lazy", "private", "eager"];

/// `CLOCK_MONOTONIC` in nanoseconds, the clock Kite's restore log line gives.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, ours.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The host's load averages (this benchmark measures waits on a shared machine).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

// ---- memory of a process ----

/// Resident memory of a kite process, in MiB.
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    /// VmRSS.
    rss: f64,
    /// Resident guest memory: mappings advised `MADV_DONTDUMP` (Kite advises all guest
    /// memory so, and nothing else).
    guest: f64,
    /// Everything else: Kite's own.
    kite: f64,
    /// Proportional set size (shared pages divided among their users).
    pss: f64,
}

fn status_kib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

fn kib_field(line: &str, key: &str) -> Option<f64> {
    line.strip_prefix(key)
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mem_of(pid: u32) -> Mem {
    let rss = status_kib(pid, "VmRSS:") / 1024.0;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut guest, mut kite, mut pss) = (0.0, 0.0, 0.0);
    let mut vma_rss = 0.0;
    for line in smaps.lines() {
        if let Some(kib) = kib_field(line, "Rss:") {
            vma_rss = kib;
        } else if let Some(kib) = kib_field(line, "Pss:") {
            pss += kib;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "dd") {
                guest += vma_rss;
            } else {
                kite += vma_rss;
            }
            vma_rss = 0.0;
        }
    }
    Mem {
        rss,
        guest: guest / 1024.0,
        kite: kite / 1024.0,
        pss: pss / 1024.0,
    }
}

/// `Pss:` of `/proc/PID/smaps_rollup`, in MiB.
fn pss_rollup(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| kib_field(l, "Pss:"))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

// ---- files ----

/// Apparent and allocated (st_blocks * 512) size of a file, in MiB.
fn file_sizes(path: &Path) -> (f64, f64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        meta.len() as f64 / MIBF,
        (meta.blocks() * 512) as f64 / MIBF,
    )
}

/// `memory.data_bytes` of a snapshot's state, in MiB.
fn data_mib(snapshot: &Path) -> f64 {
    let text = std::fs::read_to_string(snapshot.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["state"]["memory"]["data_bytes"]
        .as_u64()
        .map_or(f64::NAN, |b| b as f64 / MIBF)
}

/// Takes a snapshot of the VM behind `socket` into `dir`; how long `vm.snapshot` took.
fn take_snapshot(socket: &Path, dir: &Path) -> Duration {
    let url = format!("file://{}", dir.display());
    let start = Instant::now();
    api_ok(
        socket,
        "PUT",
        "vm.snapshot",
        Some(json!({ "destination_url": url })),
    );
    start.elapsed()
}

// ---- the restore log line ----

/// What Kite logged of vCPU 0's first `KVM_RUN` after the restore: ms from `spawn_ns` to
/// its entry and to its return, and from Kite's own `main` to its entry.
struct FirstRun {
    enter: f64,
    back: f64,
    enter_since_main: f64,
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn first_run(log: &Path, spawn_ns: u64) -> FirstRun {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = |what: &str| text.lines().find(|l| l.contains(what)).map(str::to_owned);
        if let (Some(enter), Some(back)) = (
            line("vCPU 0 enters KVM_RUN"),
            line("vCPU 0 is back from its first KVM_RUN"),
        ) {
            let at = |l: &str| {
                let ns = number_after(l, "(monotonic ").expect("the monotonic time");
                (ns.saturating_sub(spawn_ns)) as f64 / 1e6
            };
            return FirstRun {
                enter: at(&enter),
                back: at(&back),
                enter_since_main: number_after(&enter, "KVM_RUN ").expect("the time") as f64 / 1e3,
            };
        }
        assert!(
            Instant::now() < deadline,
            "{} shows no first KVM_RUN after the restore:\n{text}",
            log.display()
        );
        // Polling a log file, which has no event to wait on.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the API socket accepts connections, polling every millisecond (the
/// helper's 10 ms would blur what is measured here).
fn wait_socket(kite: &Kite, socket: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline && Path::new(&format!("/proc/{}", kite.pid())).exists(),
            "{} not served",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---- the test guest ----

/// Complete `snapshot steady` lines after `mark`: their `passes=`.
fn steady_passes(console: &str) -> Vec<u64> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.starts_with(STEADY))
        .filter_map(|l| l.split_once(" passes=")?.1.trim().parse().ok())
        .collect()
}

fn kite_args<'a>(log: Option<&'a str>, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = Vec::new();
    if let Some(log) = log {
        all.extend(["-v", "--log-file", log]);
    }
    all.extend_from_slice(args);
    all
}

/// Boots the test guest's `snapshot` scenario with `memory` (`--memory`), a fresh disk and
/// an API socket in `dir`.
fn boot_test_guest(dir: &Path, name: &str, memory: &str) -> (Kite, PathBuf, PathBuf) {
    let disk = dir.join(format!("{name}.img"));
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .unwrap();
    let socket = dir.join(format!("{name}.sock"));
    let disk_arg = format!("path={}", disk.display());
    let kite = Kite::start(&[
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        "kite.test=snapshot",
        "--memory",
        memory,
        "--disk",
        &disk_arg,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    (kite, socket, disk)
}

struct ColdSample {
    first_output: f64,
    steady: f64,
    mem: Mem,
}

/// A cold boot of the scenario: process start → first output, → first complete `steady`
/// line; memory then. The VM is left running.
fn cold_boot(dir: &Path, name: &str) -> (ColdSample, Kite, PathBuf, PathBuf) {
    let memory = format!(
        "size={}M,hotplug_size={}M,hotplugged_size={}M",
        BOOT >> 20,
        AREA >> 20,
        PLUGGED >> 20
    );
    let start = Instant::now();
    let (kite, socket, disk) = boot_test_guest(dir, name, &memory);
    kite.wait_until("output", DEADLINE, |t| !t.is_empty());
    let first_output = ms(start.elapsed());
    kite.wait_until("a steady line", DEADLINE, |t| !steady_passes(t).is_empty());
    let steady = ms(start.elapsed());
    let mem = mem_of(kite.pid());
    let sample = ColdSample {
        first_output,
        steady,
        mem,
    };
    (sample, kite, socket, disk)
}

#[derive(Default)]
struct RestoreSample {
    first_run: f64,
    first_run_since_main: f64,
    first_exit: f64,
    first_output: f64,
    next_line: f64,
    at_output: Mem,
    touched: Mem,
}

/// Restores `snapshot` with memory `mode` and a copy of `disk`; measures; then either
/// drives the guest to its final check (`to_pass`: the whole area plugged, everything
/// checked, PASS) or kills it.
fn restore_test_guest(
    snapshot: &Path,
    disk: &Path,
    dir: &Path,
    mode: &str,
    run: usize,
    to_pass: bool,
) -> RestoreSample {
    let name = format!("restore-{mode}-{run}");
    let own_disk = dir.join(format!("{name}.img"));
    std::fs::copy(disk, &own_disk).unwrap();
    let log = dir.join(format!("{name}.log"));
    let socket = dir.join(format!("{name}.sock"));
    let restore = kite_tests::snapshot::restore_args(snapshot, mode, &own_disk, &socket);
    let restore: Vec<&str> = restore.iter().map(String::as_str).collect();
    let args = kite_args(Some(log.to_str().unwrap()), &restore);
    let spawn_ns = monotonic_ns();
    let start = Instant::now();
    let kite = Kite::start(&args);
    kite.wait_until("output", DEADLINE, |t| !t.is_empty());
    let first_output = ms(start.elapsed());
    let at_output = mem_of(kite.pid());
    kite.wait_until("a complete steady line", DEADLINE, |t| {
        !steady_passes(t).is_empty()
    });
    let next_line = ms(start.elapsed());
    let p0 = steady_passes(&kite.console())[0];
    kite.wait_until("the guest's whole memory checked again", DEADLINE, |t| {
        steady_passes(t)
            .last()
            .is_some_and(|&p| p >= p0 + TOUCH_ALL_PASSES)
    });
    let touched = mem_of(kite.pid());
    let run = first_run(&log, spawn_ns);
    if to_pass {
        resize(&socket, BOOT + AREA);
        let end = kite.wait_exit(DEADLINE);
        assert!(
            end.console.contains("kite-test: snapshot verified")
                && end.console.contains("kite-test: PASS")
                && end.code == Some(exit::GUEST_SHUTDOWN),
            "the restored guest ({mode}) fails its final check:\n{}\n{}",
            end.console,
            end.stderr
        );
    } else {
        kite.signal(libc::SIGKILL);
        kite.wait_exit(DEADLINE);
    }
    let _ = std::fs::remove_file(&own_disk);
    RestoreSample {
        first_run: run.enter,
        first_run_since_main: run.enter_since_main,
        first_exit: run.back,
        first_output,
        next_line,
        at_output,
        touched,
    }
}

/// The floor under "restore → first `KVM_RUN`", measured in this process (no exec): what
/// the host kernel takes to create a VM as Kite's restore needs it (in-kernel irqchip and
/// PIT, a slot for boot RAM and one for the hotplug area, one vCPU). ms.
fn kvm_floor() -> f64 {
    use memory::MemorySlots;
    let map = |len: usize| {
        // SAFETY: a fresh anonymous mapping, unmapped below, nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        addr
    };
    let (ram, area) = ((BOOT) as usize, AREA as usize);
    let (ram_at, area_at) = (map(ram), map(area));
    let start = Instant::now();
    let vm = vmm::vstate::vm::Vm::new().expect("a KVM VM");
    let slots = vm.memory_slots();
    for (slot, guest_addr, size, host) in [(0, 0, ram, ram_at), (1, 1 << 32, area, area_at)] {
        slots
            .map(&memory::SlotMapping {
                slot,
                guest_addr,
                size: size as u64,
                host_addr: host as u64,
            })
            .expect("a memory slot");
    }
    let vcpu = vm.create_vcpu(0).expect("a vCPU");
    let elapsed = ms(start.elapsed());
    drop(vcpu);
    drop(slots);
    drop(vm);
    // SAFETY: the mappings made above; the VM that used them is gone.
    unsafe {
        libc::munmap(ram_at, ram);
        libc::munmap(area_at, area);
    }
    elapsed
}

/// The other floor: starting the kite binary at all (`kite --version`: exec, the dynamic
/// loader, argument parsing) until it exits. ms.
fn exec_floor() -> f64 {
    let start = Instant::now();
    let out = std::process::Command::new(kite_binary())
        .arg("--version")
        .output()
        .expect("kite --version runs");
    assert!(out.status.success());
    ms(start.elapsed())
}

/// The memory size of the smallest VM (`--memory` minimum), booted for Kite's overhead:
/// the test guest's `hotplug` scenario (it needs no more), same devices.
fn smallest_vm(dir: &Path) -> Mem {
    let disk = dir.join("smallest.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .unwrap();
    let disk_arg = format!("path={}", disk.display());
    let socket = dir.join("smallest.sock");
    let kite = Kite::start(&[
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        "kite.test=hotplug",
        "--memory",
        "size=64M,hotplug_size=128M,hotplugged_size=4M",
        "--disk",
        &disk_arg,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for("kite-test: hotplug steady plugged_mib=4 ", DEADLINE);
    let mark = kite.mark();
    kite.wait_for_since(mark, "kite-test: hotplug steady plugged_mib=4 ", DEADLINE);
    let mem = mem_of(kite.pid());
    kite.signal(libc::SIGKILL);
    kite.wait_exit(DEADLINE);
    mem
}

struct SizeSample {
    boot_mib: u64,
    times: Samples,
    apparent: f64,
    allocated: f64,
    data: f64,
}

/// Boots the scenario with `boot_mib` of RAM (the same pattern and plugged memory), waits
/// until it settled, takes `runs` snapshots of the running VM.
fn snapshot_size(dir: &Path, boot_mib: u64, runs: usize) -> SizeSample {
    let memory = format!(
        "size={boot_mib}M,hotplug_size={}M,hotplugged_size={}M",
        AREA >> 20,
        PLUGGED >> 20
    );
    let name = format!("size{boot_mib}");
    let (kite, socket, disk) = boot_test_guest(dir, &name, &memory);
    kite.wait_until("two steady lines", DEADLINE, |t| {
        steady_passes(t).len() >= 2
    });
    let mut times = Samples::default();
    let mut sizes = None;
    for run in 0..runs {
        let snapshot = dir.join(format!("{name}-snapshot{run}"));
        times.push(ms(take_snapshot(&socket, &snapshot)));
        if sizes.is_none() {
            let (apparent, allocated) = file_sizes(&snapshot.join("memory"));
            sizes = Some((apparent, allocated, data_mib(&snapshot)));
        }
        std::fs::remove_dir_all(&snapshot).unwrap();
    }
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    kite.wait_exit(DEADLINE);
    let _ = std::fs::remove_file(&disk);
    let (apparent, allocated, data) = sizes.unwrap();
    SizeSample {
        boot_mib,
        times,
        apparent,
        allocated,
        data,
    }
}

struct Density {
    mode: &'static str,
    clones: usize,
    /// The last clone's vCPU 0 entering KVM_RUN.
    all_entered: f64,
    all_running: f64,
    first: f64,
    rss_per_clone: f64,
    pss_per_clone: f64,
}

/// `clones` restores of `snapshot` started at once, each with its own copy of `disk`;
/// the time until each printed a line; memory then.
fn density(snapshot: &Path, disk: &Path, dir: &Path, mode: &'static str, clones: usize) -> Density {
    let disks: Vec<PathBuf> = (0..clones)
        .map(|i| {
            let copy = dir.join(format!("clone-{mode}-{i}.img"));
            std::fs::copy(disk, &copy).unwrap();
            copy
        })
        .collect();
    let logs: Vec<PathBuf> = (0..clones)
        .map(|i| dir.join(format!("clone-{mode}-{i}.log")))
        .collect();
    let restore_arg = format!("path={},memory={mode}", snapshot.display());
    let spawn_ns = monotonic_ns();
    let start = Instant::now();
    let vms: Vec<Kite> = disks
        .iter()
        .zip(&logs)
        .map(|(d, log)| {
            let disk_arg = format!("path={}", d.display());
            let log = log.to_str().unwrap();
            Kite::start(&kite_args(
                Some(log),
                &["run", "--restore", &restore_arg, "--disk", &disk_arg],
            ))
        })
        .collect();
    let mut lines = Samples::default();
    for vm in &vms {
        vm.wait_until("a line", DEADLINE, |t| t.contains('\n'));
        lines.push(ms(start.elapsed()));
    }
    let all_running = lines.sorted().last().copied().unwrap_or(f64::NAN);
    let first = lines.sorted().first().copied().unwrap_or(f64::NAN);
    let entered = Samples(
        logs.iter()
            .map(|log| first_run(log, spawn_ns).enter)
            .collect(),
    );
    let all_entered = entered.sorted().last().copied().unwrap_or(f64::NAN);
    let (mut rss, mut pss) = (0.0, 0.0);
    for vm in &vms {
        rss += status_kib(vm.pid(), "VmRSS:") / 1024.0;
        pss += pss_rollup(vm.pid());
    }
    for vm in &vms {
        vm.signal(libc::SIGKILL);
    }
    for vm in vms {
        vm.wait_exit(DEADLINE);
    }
    for path in disks.iter().chain(&logs) {
        let _ = std::fs::remove_file(path);
    }
    Density {
        mode,
        clones,
        all_entered,
        all_running,
        first,
        rss_per_clone: rss / clones as f64,
        pss_per_clone: pss / clones as f64,
    }
}

// ---- Linux ----

struct LinuxSnapshot {
    name: &'static str,
    dir: PathBuf,
    /// Plugged when it was taken.
    plugged: u64,
    taken: f64,
    apparent: f64,
    allocated: f64,
    data: f64,
}

#[derive(Default)]
struct LinuxSample {
    first_run: f64,
    socket: f64,
    answered: f64,
    reacted: f64,
    first_block: f64,
    /// Only in the first run of each snapshot and mode (the guest kernel's plugging and
    /// onlining runs emulated here: seconds).
    all_plugged: Option<f64>,
    onlined: Option<f64>,
    rss: f64,
}

struct Linux {
    boot_run_init: f64,
    plug_1g: f64,
    snapshots: Vec<LinuxSnapshot>,
    /// By snapshot, then mode.
    samples: Vec<Vec<(&'static str, Vec<LinuxSample>)>>,
}

/// Linux's virtio_mem driver line for a request of `bytes`.
fn requested_line(bytes: u64) -> String {
    format!("virtio_mem virtio0: requested size: {bytes:#x}")
}

const LINUX_BOOT_RAM: u64 = 512 * MIB;
const LINUX_PLUG: u64 = 1024 * MIB;
/// Plugged after each restore.
const LINUX_STEP: u64 = 128 * MIB;

/// Waits until the guest kernel behind kite process `pid` is idle: it runs emulated here,
/// in the host kernel on the vCPU thread's behalf (system time), while the spinning /init
/// runs natively (guest time). Idle: vCPU 0's system time grew by less than 40% of the
/// time in two half-second windows running. A snapshot taken while the kernel still
/// works (onlining plugged memory takes seconds) would have the restored kernel finish
/// that work before it reacts to anything. How long it took.
fn wait_kernel_idle(pid: u32) -> Duration {
    let start = Instant::now();
    let tasks = format!("/proc/{pid}/task");
    let vcpu = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "kite_vcpu0")
        })
        .expect("a kite_vcpu0 thread")
        .path()
        .join("stat");
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let system_ticks = || -> f64 {
        let stat = std::fs::read_to_string(&vcpu).unwrap_or_default();
        // After the command name in parentheses: state is field 3, stime field 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        rest.split_whitespace()
            .nth(12)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let window = Duration::from_millis(500);
    let mut quiet = 0;
    let mut last = system_ticks();
    while quiet < 2 {
        assert!(
            start.elapsed() < LINUX_RESIZE_DEADLINE,
            "the guest kernel never went idle"
        );
        std::thread::sleep(window);
        let now = system_ticks();
        let busy = (now - last) / ticks_per_s / window.as_secs_f64();
        quiet = if busy < 0.4 { quiet + 1 } else { 0 };
        last = now;
    }
    start.elapsed()
}

fn linux_snapshot(socket: &Path, dir: &Path, name: &'static str, plugged: u64) -> LinuxSnapshot {
    let path = dir.join(format!("linux-{name}"));
    let taken = ms(take_snapshot(socket, &path));
    let (apparent, allocated) = file_sizes(&path.join("memory"));
    LinuxSnapshot {
        name,
        data: data_mib(&path),
        dir: path,
        plugged,
        taken,
        apparent,
        allocated,
    }
}

fn restore_linux(
    snapshot: &LinuxSnapshot,
    dir: &Path,
    mode: &str,
    run: usize,
    full: bool,
) -> LinuxSample {
    let name = format!("linux-{}-{mode}-{run}", snapshot.name);
    let log = dir.join(format!("{name}.log"));
    let socket = dir.join(format!("{name}.sock"));
    let restore_arg = format!("path={},memory={mode}", snapshot.dir.display());
    let args = kite_args(
        Some(log.to_str().unwrap()),
        &[
            "run",
            "--restore",
            &restore_arg,
            "--api-socket",
            socket.to_str().unwrap(),
        ],
    );
    let spawn_ns = monotonic_ns();
    let start = Instant::now();
    let kite = Kite::start(&args);
    wait_socket(&kite, &socket);
    let socket_ms = ms(start.elapsed());
    let want = snapshot.plugged + LINUX_STEP;
    resize(&socket, LINUX_BOOT_RAM + want);
    let answered = ms(start.elapsed());
    kite.wait_for(&requested_line(want), LINUX_RESIZE_DEADLINE);
    let reacted = ms(start.elapsed());
    let deadline = Instant::now() + LINUX_RESIZE_DEADLINE;
    while plugged(&socket) <= snapshot.plugged {
        assert!(Instant::now() < deadline, "no block plugged");
        // Polling the API, as a client would.
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_block = ms(start.elapsed());
    let (mut all_plugged, mut onlined) = (None, None);
    if full {
        wait_plugged(&socket, want, LINUX_RESIZE_DEADLINE);
        all_plugged = Some(ms(start.elapsed()));
        if snapshot.plugged == 0 {
            // The first memory of ZONE_MOVABLE online: the kernel rebuilds its zonelists.
            kite.wait_for("Total pages: ", LINUX_RESIZE_DEADLINE);
            onlined = Some(ms(start.elapsed()));
        }
    }
    let rss = status_kib(kite.pid(), "VmRSS:") / 1024.0;
    let run = first_run(&log, spawn_ns);
    kite.signal(libc::SIGKILL);
    let end = kite.wait_exit(DEADLINE);
    assert!(
        !end.console.contains("Linux version"),
        "the restored kernel booted again:\n{}",
        end.console
    );
    let _ = std::fs::remove_file(&log);
    LinuxSample {
        first_run: run.enter,
        socket: socket_ms,
        answered,
        reacted,
        first_block,
        all_plugged,
        onlined,
        rss,
    }
}

fn linux(kernel: &Path, spin: &Path, dir: &Path, runs: usize) -> Linux {
    let socket = dir.join("linux-boot.sock");
    let memory = format!("size={}M,hotplug_size=2G", LINUX_BOOT_RAM >> 20);
    let start = Instant::now();
    let mut kite = Kite::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        spin.to_str().unwrap(),
        "--memory",
        &memory,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for_socket(&socket, DEADLINE);
    kite.wait_for(RUN_INIT, LINUX_BOOT_DEADLINE);
    let boot_run_init = start.elapsed().as_secs_f64();
    println!("Linux: {RUN_INIT:?} after {boot_run_init:.1} s (cold boot)");
    kite.wait_for(&requested_line(0), LINUX_BOOT_DEADLINE);
    let settled = wait_kernel_idle(kite.pid());
    println!("Linux: idle {:.1} s later", settled.as_secs_f64());
    let mut snapshots = vec![linux_snapshot(&socket, dir, "512M", 0)];
    let plug = Instant::now();
    resize(&socket, LINUX_BOOT_RAM + LINUX_PLUG);
    wait_plugged(&socket, LINUX_PLUG, LINUX_RESIZE_DEADLINE);
    let plug_1g = plug.elapsed().as_secs_f64();
    let settled = wait_kernel_idle(kite.pid());
    println!(
        "Linux: 1 GiB plugged in {plug_1g:.1} s, the kernel idle {:.1} s later",
        settled.as_secs_f64()
    );
    snapshots.push(linux_snapshot(&socket, dir, "512M+1G", LINUX_PLUG));
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);

    let mut samples: Vec<Vec<(&'static str, Vec<LinuxSample>)>> = snapshots
        .iter()
        .map(|_| MODES.iter().map(|&m| (m, Vec::new())).collect())
        .collect();
    for run in 0..runs {
        for (s, snapshot) in snapshots.iter().enumerate() {
            for (m, mode) in MODES.iter().enumerate() {
                let sample = restore_linux(snapshot, dir, mode, run, run == 0);
                println!(
                    "Linux {} {mode} run {run}: socket {:.0} ms, resize answered {:.0} ms, \
                     driver reacted {:.0} ms, first block plugged {:.0} ms, all {:?} ms, \
                     onlined {:?} ms",
                    snapshot.name,
                    sample.socket,
                    sample.answered,
                    sample.reacted,
                    sample.first_block,
                    sample.all_plugged.map(|v| v.round()),
                    sample.onlined.map(|v| v.round())
                );
                samples[s][m].1.push(sample);
            }
        }
    }
    Linux {
        boot_run_init,
        plug_1g,
        snapshots,
        samples,
    }
}

fn samples_of<T>(items: &[T], f: impl Fn(&T) -> f64) -> Samples {
    Samples(items.iter().map(f).filter(|v| !v.is_nan()).collect())
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !kvm_available() {
        return;
    }
    let runs = env_or("KITE_BENCH_RUNS", 5).max(1);
    let clones = env_or("KITE_BENCH_CLONES", 50).max(1);
    let linux_runs = env_or("KITE_BENCH_LINUX_RUNS", 2).max(1);
    let with_linux = std::env::var_os("KITE_BENCH_NO_LINUX").is_none();
    let linux_files = if with_linux { spin_guest() } else { None };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let started = Instant::now();
    println!("kite: {}", kite_binary().display());
    println!("load average at the start: {}", loadavg());
    println!(
        "test guest: kite.test=snapshot, {} MiB boot RAM, {} MiB hotplug area, {} MiB plugged; \
         {runs} runs each",
        BOOT >> 20,
        AREA >> 20,
        PLUGGED >> 20
    );

    // (b) baseline and the snapshot: cold boots; the first one is snapshotted.
    let mut cold = Vec::new();
    let mut snapshot = PathBuf::new();
    let mut snapshot_disk = PathBuf::new();
    let mut snapshot_ms = 0.0;
    for run in 0..runs {
        let (sample, kite, socket, disk) = cold_boot(dir, &format!("cold{run}"));
        if run == 0 {
            // Settled (the next steady line), paused, snapshotted with its disk as it was.
            let mark = kite.mark();
            kite.wait_until("the next steady line", DEADLINE, |t| {
                t.get(mark..).is_some_and(|t| !steady_passes(t).is_empty())
            });
            api_ok(&socket, "PUT", "vm.pause", None);
            snapshot = dir.join("snapshot");
            snapshot_ms = ms(take_snapshot(&socket, &snapshot));
            snapshot_disk = dir.join("at-snapshot.img");
            std::fs::copy(&disk, &snapshot_disk).unwrap();
            api_ok(&socket, "PUT", "vmm.shutdown", None);
        } else {
            kite.signal(libc::SIGKILL);
        }
        kite.wait_exit(DEADLINE);
        let _ = std::fs::remove_file(&disk);
        cold.push(sample);
    }
    let smallest = smallest_vm(dir);

    // (a), (b), (c): restores, the modes interleaved (the machine's speed drifts).
    let mut restored: Vec<(&str, Vec<RestoreSample>)> =
        MODES.iter().map(|&m| (m, Vec::new())).collect();
    let (mut floor_kvm, mut floor_exec) = (Samples::default(), Samples::default());
    for run in 0..runs {
        floor_kvm.push(kvm_floor());
        floor_exec.push(exec_floor());
        for (mode, samples) in restored.iter_mut() {
            // The last run of each mode goes on to the guest's final check.
            let sample =
                restore_test_guest(&snapshot, &snapshot_disk, dir, mode, run, run + 1 == runs);
            samples.push(sample);
        }
    }

    // (d): snapshot time and size against boot RAM.
    let sizes: Vec<SizeSample> = [256, 512, 1024, 4096]
        .into_iter()
        .map(|mib| snapshot_size(dir, mib, 3))
        .collect();

    // (e): density.
    let dense: Vec<Density> = ["lazy", "private"]
        .into_iter()
        .map(|mode| density(&snapshot, &snapshot_disk, dir, mode, clones))
        .collect();
    let test_guest_secs = started.elapsed().as_secs_f64();
    println!("load average after the test-guest part: {}", loadavg());

    let linux = linux_files.map(|(kernel, spin)| linux(&kernel, &spin, dir, linux_runs));
    if !with_linux {
        println!("Linux skipped (KITE_BENCH_NO_LINUX)");
    }

    // ---- the tables ----
    println!(
        "\n(a) test guest restore ({} MiB), ms from the process start; median (min–max) of {runs}",
        BOOT >> 20
    );
    println!("{:<42}{:>22}{:>22}{:>22}", "", "lazy", "private", "eager");
    let row = |name: &str, f: &dyn Fn(&RestoreSample) -> f64, decimals: usize| {
        print!("{name:<42}");
        for (_, samples) in &restored {
            print!("{:>22}", samples_of(samples, f).show_range(decimals));
        }
        println!();
    };
    println!(
        "{:<42}{:>22}",
        "floor: kite --version, spawn to exit",
        floor_exec.show_range(1)
    );
    println!(
        "{:<42}{:>22}",
        "floor: KVM VM+irqchip+PIT+2 slots+vCPU",
        floor_kvm.show_range(1)
    );
    row("vCPU 0 enters KVM_RUN", &|s| s.first_run, 1);
    row("  (from kite's main)", &|s| s.first_run_since_main, 1);
    row("vCPU 0 back from its first KVM_RUN", &|s| s.first_exit, 1);
    row("first console output", &|s| s.first_output, 1);
    row("next complete steady line", &|s| s.next_line, 1);

    if let Some(l) = &linux {
        println!(
            "\n(a) Linux restore, ms from the process start; median (min–max) of {linux_runs}; \
             then 128 MiB more asked for"
        );
        println!("{:<42}{:>22}{:>22}{:>22}", "", "lazy", "private", "eager");
        for (s, snapshot) in l.snapshots.iter().enumerate() {
            println!("{} MiB plugged:", snapshot.plugged >> 20);
            let row = |name: &str, f: &dyn Fn(&LinuxSample) -> f64| {
                print!("{:<42}", format!("  {name}"));
                for (_, samples) in &l.samples[s] {
                    print!("{:>22}", samples_of(samples, f).show_range(0));
                }
                println!();
            };
            row("vCPU 0 enters KVM_RUN", &|x| x.first_run);
            row("API socket accepts", &|x| x.socket);
            row("vm.resize answered", &|x| x.answered);
            row("virtio_mem prints the request", &|x| x.reacted);
            row("its first block plugged", &|x| x.first_block);
            row("all 128 MiB plugged (run 0)", &|x| {
                x.all_plugged.unwrap_or(f64::NAN)
            });
            if snapshot.plugged == 0 {
                row("onlined: zonelists rebuilt (run 0)", &|x| {
                    x.onlined.unwrap_or(f64::NAN)
                });
            }
            row("RSS then (MiB)", &|x| x.rss);
        }
    }

    println!("\n(b) ready: restore vs cold boot to the same point");
    let cold_steady = samples_of(&cold, |c| c.steady);
    let cold_output = samples_of(&cold, |c| c.first_output);
    println!(
        "{:<42}{:>22}",
        "test guest cold boot → first output (ms)",
        cold_output.show_range(1)
    );
    println!(
        "{:<42}{:>22}",
        "test guest cold boot → steady line (ms)",
        cold_steady.show_range(1)
    );
    for (mode, samples) in &restored {
        let r = samples_of(samples, |s| s.next_line);
        println!(
            "{:<42}{:>22}   restore/boot {:.2}",
            format!("  restore {mode} → next steady line (ms)"),
            r.show_range(1),
            r.median() / cold_steady.median()
        );
    }
    if let Some(l) = &linux {
        println!(
            "{:<42}{:>22.0}",
            "Linux cold boot → Run /init (ms)",
            l.boot_run_init * 1e3
        );
        for (s, snapshot) in l.snapshots.iter().enumerate() {
            for (mode, samples) in &l.samples[s] {
                let r = samples_of(samples, |x| x.answered);
                println!(
                    "{:<42}{:>22}   restore/boot {:.4}",
                    format!("  {} {mode} → resize answered", snapshot.name),
                    r.show_range(0),
                    r.median() / (l.boot_run_init * 1e3)
                );
            }
        }
    }

    println!("\n(c) host RSS of the kite process (MiB): total = guest memory + Kite's own (smaps)");
    let mem_row = |name: &str, m: &[Mem]| {
        let rss = Samples(m.iter().map(|m| m.rss).collect());
        let guest = Samples(m.iter().map(|m| m.guest).collect());
        let kite = Samples(m.iter().map(|m| m.kite).collect());
        let pss = Samples(m.iter().map(|m| m.pss).collect());
        println!(
            "{name:<42}{:>18}{:>18}{:>18}{:>18}",
            rss.show_range(1),
            guest.show_range(1),
            kite.show_range(1),
            pss.show_range(1)
        );
    };
    println!(
        "{:<42}{:>18}{:>18}{:>18}{:>18}",
        "", "VmRSS", "guest", "Kite's own", "PSS"
    );
    let cold_mem: Vec<Mem> = cold.iter().map(|c| c.mem).collect();
    mem_row("cold boot, at the first steady line", &cold_mem);
    mem_row("smallest VM (64 MiB), hotplug scenario", &[smallest]);
    for (mode, samples) in &restored {
        let at: Vec<Mem> = samples.iter().map(|s| s.at_output).collect();
        let touched: Vec<Mem> = samples.iter().map(|s| s.touched).collect();
        mem_row(&format!("{mode}: at the first output"), &at);
        mem_row(&format!("{mode}: all its memory touched"), &touched);
    }
    let overhead = Samples(cold_mem.iter().map(|m| m.kite).collect()).median();

    println!(
        "\n(d) snapshot of a running VM (vm.snapshot, pause and resume included; median (min–max) of 3) \
         and its memory file; the guest uses {} MiB (pattern + plugged)",
        USED >> 20
    );
    println!(
        "{:<22}{:>20}{:>14}{:>16}{:>12}{:>18}",
        "boot RAM", "snapshot (ms)", "file (MiB)", "allocated", "data", "allocated/used"
    );
    for s in &sizes {
        println!(
            "{:<22}{:>20}{:>14.1}{:>16.2}{:>12.2}{:>18.4}",
            format!("{} MiB", s.boot_mib),
            s.times.show_range(1),
            s.apparent,
            s.allocated,
            s.data,
            s.allocated / (USED as f64 / MIBF)
        );
    }
    println!(
        "{:<22}{:>20.1}   (the first cold boot, paused first)",
        "512 MiB (restored)", snapshot_ms
    );
    if let Some(l) = &linux {
        for s in &l.snapshots {
            println!(
                "{:<22}{:>20.1}{:>14.1}{:>16.2}{:>12.2}",
                format!("Linux {}", s.name),
                s.taken,
                s.apparent,
                s.allocated,
                s.data
            );
        }
    }

    println!(
        "\n(e) density: {clones} clones of one snapshot restored at once, each with its own disk"
    );
    println!(
        "{:<12}{:>22}{:>18}{:>18}{:>16}{:>16}",
        "memory",
        "all in KVM_RUN (ms)",
        "first line (ms)",
        "all a line (ms)",
        "RSS/clone MiB",
        "PSS/clone MiB"
    );
    for d in &dense {
        println!(
            "{:<12}{:>22.0}{:>18.0}{:>18.0}{:>16.1}{:>16.1}",
            d.mode, d.all_entered, d.first, d.all_running, d.rss_per_clone, d.pss_per_clone
        );
        assert_eq!(d.clones, clones);
    }

    println!("\ntargets");
    if let Some(l) = &linux {
        for (s, snapshot) in l.snapshots.iter().enumerate() {
            for (mode, samples) in &l.samples[s] {
                let answered = samples_of(samples, |x| x.answered).median();
                println!(
                    "{}  Linux {} {mode}: restored and a resize answered in {:.0} ms <= 1000 ms \
                     (boot: {:.1} s)",
                    verdict(answered <= 1000.0),
                    snapshot.name,
                    answered,
                    l.boot_run_init
                );
            }
        }
        println!(
            "      (Linux plugged 1 GiB in {:.1} s before the second snapshot)",
            l.plug_1g
        );
    } else {
        println!("----  Linux: skipped");
    }
    let lazy = &restored[0].1;
    let first = samples_of(lazy, |s| s.first_run).median();
    println!(
        "{}  restore to first instruction (vCPU 0 enters KVM_RUN), lazy, {} MiB: {first:.1} ms <= 20 ms \
         (floors: exec {:.1} ms + KVM {:.1} ms)",
        verdict(first <= 20.0),
        BOOT >> 20,
        floor_exec.median(),
        floor_kvm.median()
    );
    let rss = samples_of(lazy, |s| s.at_output.rss).median();
    println!(
        "{}  RSS right after a lazy restore (first output): {rss:.1} MiB <= Kite's overhead {overhead:.1} + 16 MiB",
        verdict(rss <= overhead + 16.0)
    );
    for s in &sizes {
        let limit = USED as f64 / MIBF * 1.01;
        println!(
            "{}  snapshot file allocated, {} MiB boot RAM: {:.2} MiB <= used {} MiB + 1% ({limit:.2})",
            verdict(s.allocated <= limit),
            s.boot_mib,
            s.allocated,
            USED >> 20
        );
    }
    println!(
        "\ntest-guest part {test_guest_secs:.0} s, total {:.0} s; load average at the end: {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
