//! Start, stop and idle cost of the VMM itself (issue 16): Kite against QEMU `-M microvm`
//! (and any VMM named in `KITE_BENCH_VMM`) in one run, with the same tiny PVH guest of a
//! few instructions (no guest work to speak of: what is measured is the VMM).
//!
//! 1. Start/exit: `KITE_BENCH_RUNS` (default 20) rounds, each running every VMM once
//!    (Kite without and with `-v`, QEMU, the others), in reverse order every other round.
//!    Each run: spawn → the first byte on the guest console (the VMM's stdout, a pipe) and
//!    spawn → the process reaped, for a guest that prints `K\n` and resets (the i8042 reset
//!    line, which Kite and Firecracker honour, then a triple fault for QEMU microvm, which
//!    has no i8042 and exits on it with `-no-reboot`). Every VMM's stderr goes to a file,
//!    as in a CI job; so does Kite's `-v` log. Medians, p10–p90, ratios to QEMU.
//! 2. RSS of an idle guest (touches two pages, prints `K\n`, halts for ever) from
//!    `/proc/PID/smaps` once the marker is out: total, guest RAM (see [`Smaps`]), overhead
//!    (total minus guest RAM), PSS.
//! 3. Density: `KITE_BENCH_GUESTS` (default 50) idle guests started at once, Kite then
//!    QEMU: the time until all printed the marker, the sums of their RSS and PSS then.
//!
//! `cargo build --release -p vmm && cargo bench -p kite-tests --bench start`
//! (the release `kite` next to the bench binary, or `KITE_BIN`; QEMU:
//! `scripts/install-deps bench`).
//!
//! `KITE_BENCH_VMM`: more baselines for parts 1 and 2, `;`-separated `name=PROGRAM ARG...`
//! (split on whitespace; `{kernel}` becomes the guest's path, `{mib}` its RAM in MiB). The
//! process must be the VMM itself (a wrapper `exec`s it: its smaps are read), with the
//! guest's serial console on its stdout, exiting 0 after the guest's reset. E.g.
//! `ch=cloud-hypervisor --kernel {kernel} --memory size={mib}M --serial tty --console off`
//! or `fc=./fc-run {kernel} {mib}` (a script that writes a Firecracker config file and
//! `exec`s `firecracker --no-api --config-file` on it).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kite_tests::stats::{ms, Samples};
use kite_tests::{
    env_or, kite_binary, kvm_available, qemu_available, tiny_pvh_kernel, TINY_KERNEL_ENTRY,
};

/// Guest RAM of every VM here.
const GUEST_MIB: u64 = 64;
/// Longest a run may take to print its marker or to exit (it fails the benchmark).
const DEADLINE: Duration = Duration::from_secs(20);
/// Longest the density part may take to see every marker.
const DENSITY_DEADLINE: Duration = Duration::from_secs(120);
/// Idle guests measured per VMM in part 2.
const RSS_RUNS: usize = 5;
/// QEMU's machine: microvm without anything this guest does not use: no option ROMs
/// (qboot, its firmware, loads the PVH kernel itself), no RTC, PIT, PIC, no ACPI tables
/// (each of these costs start time: ACPI alone ~9 ms here); the ISA serial port stays.
const QEMU_MACHINE: &str = "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,acpi=off";

// ---- the guests ----

/// `mov dx, 0x3f8; mov al, 'K'; out dx, al; mov al, '\n'; out dx, al`: the marker line.
const MARKER: [u8; 10] = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee];

/// Prints the marker, pulls the i8042 reset line (`mov al, 0xfe; out 0x64, al`), then, on
/// a machine without an i8042, triple-faults: `lidt` of an empty IDT (limit 0, the 8 zero
/// bytes at the end of the code: PVH does not say what IDT is loaded), then `ud2`.
fn reset_guest() -> Vec<u8> {
    let mut code = MARKER.to_vec();
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]);
    let empty_idt = TINY_KERNEL_ENTRY as u32 + code.len() as u32 + 7 + 2;
    code.extend_from_slice(&[0x0f, 0x01, 0x1d]); // lidt [disp32]
    code.extend_from_slice(&empty_idt.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x0b]); // ud2
    code.extend_from_slice(&[0; 8]);
    code
}

/// Writes to two pages (`mov dword [addr], 1` at 2 MiB and 2 MiB + 4 KiB), then prints the
/// marker (so the marker means the pages are touched), then `hlt; jmp hlt` with
/// interrupts off: an idle guest, for ever.
fn idle_guest() -> Vec<u8> {
    let mut code = Vec::new();
    for addr in [0x20_0000u32, 0x20_1000] {
        code.extend_from_slice(&[0xc7, 0x05]);
        code.extend_from_slice(&addr.to_le_bytes());
        code.extend_from_slice(&1u32.to_le_bytes());
    }
    code.extend_from_slice(&MARKER);
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    code
}

// ---- the VMMs ----

/// A VMM under test: its name and its command line, where `{kernel}` and `{mib}` are
/// replaced by the guest's kernel and RAM size.
#[derive(Clone)]
struct Vmm {
    name: String,
    argv: Vec<String>,
}

impl Vmm {
    /// `program` with `args`, split on whitespace.
    fn new(name: &str, program: &str, args: &str) -> Vmm {
        let argv = std::iter::once(program).chain(args.split_whitespace());
        let argv = argv.map(String::from).collect();
        Vmm {
            name: name.into(),
            argv,
        }
    }

    fn kite(verbose: bool) -> Vmm {
        let (name, v) = if verbose {
            ("kite -v", "-v")
        } else {
            ("kite", "")
        };
        let args = format!("run {v} --kernel {{kernel}} --memory size={{mib}}M");
        Vmm::new(name, kite_binary().to_str().unwrap(), &args)
    }

    fn qemu(cpu: &str) -> Vmm {
        let args = format!(
            "-M {QEMU_MACHINE} -enable-kvm -cpu {cpu} -smp 1 -m {{mib}}M -nodefaults \
             -no-user-config -display none -serial stdio -no-reboot -kernel {{kernel}}"
        );
        Vmm::new("qemu", "qemu-system-x86_64", &args)
    }

    /// The baselines of `KITE_BENCH_VMM` (see the top of this file).
    fn from_env() -> Vec<Vmm> {
        let spec = std::env::var("KITE_BENCH_VMM").unwrap_or_default();
        let entries = spec.split(';').filter(|e| !e.trim().is_empty());
        entries
            .map(|entry| {
                let (name, argv) = entry.split_once('=').unwrap_or(("", ""));
                let mut words = argv.split_whitespace();
                let program = words.next().unwrap_or_else(|| {
                    panic!("KITE_BENCH_VMM: {entry:?} is not name=PROGRAM ARG...")
                });
                Vmm::new(name.trim(), program, &words.collect::<Vec<_>>().join(" "))
            })
            .collect()
    }

    fn command(&self, kernel: &Path) -> Command {
        let fill = |a: &String| {
            a.replace("{kernel}", kernel.to_str().unwrap())
                .replace("{mib}", &GUEST_MIB.to_string())
        };
        let mut command = Command::new(fill(&self.argv[0]));
        command.args(self.argv[1..].iter().map(fill));
        command
    }
}

/// QEMU's `-cpu`: `host`, unless this host's KVM refuses it (on some nested hosts QEMU
/// fails setting `IA32_ARCH_CAPABILITIES`): then `host` without that MSR. Probed with the
/// reset guest, which also checks that QEMU boots it.
fn qemu_cpu(dir: &Path, reset: &Path) -> String {
    for cpu in ["host", "host,-arch-capabilities"] {
        let mut run = Run::spawn(&Vmm::qemu(cpu), reset, &dir.join("probe.stderr"));
        let deadline = Instant::now() + DEADLINE;
        let ok = run.wait_output(deadline).is_some() && run.wait_exit(deadline).0.success();
        // It exited: the rest of its console is there, up to EOF.
        let _ = run.stdout.read_to_end(&mut run.console);
        if ok && run.console.starts_with(b"K\n") {
            return cpu.into();
        }
    }
    panic!(
        "QEMU does not boot the tiny guest; its stderr:\n{}",
        read(&dir.join("probe.stderr"))
    );
}

// ---- one VMM process ----

/// A started VMM: its stdout (the guest console, a pipe) and its exit are waited for with
/// poll(2) and a deadline; never with sleeps.
struct Run {
    child: Child,
    stdout: ChildStdout,
    /// A pidfd of the child: readable once it has exited.
    pidfd: OwnedFd,
    start: Instant,
    console: Vec<u8>,
    stderr: PathBuf,
    reaped: bool,
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until one of `fds` is readable, or `deadline`; which are.
fn poll(fds: &[RawFd], deadline: Instant) -> Vec<bool> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll(2) on an array of pollfds we own, its length given.
    let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, ms) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    pollfds.iter().map(|p| p.revents != 0).collect()
}

impl Run {
    fn spawn(vmm: &Vmm, kernel: &Path, stderr: &Path) -> Run {
        let mut command = vmm.command(kernel);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).unwrap());
        let start = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", vmm.argv[0]));
        let pid = child.id() as libc::pid_t;
        // SAFETY: pidfd_open(2) of our own child, not reaped yet; it returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        Run {
            stdout: child.stdout.take().unwrap(),
            child,
            // SAFETY: `fd` was just opened and is owned by nothing else.
            pidfd: unsafe { OwnedFd::from_raw_fd(fd) },
            start,
            console: Vec::new(),
            stderr: stderr.to_owned(),
            reaped: false,
        }
    }

    /// Reads what the console has (called when poll says it is readable); false at EOF.
    fn read_console(&mut self) -> bool {
        let mut buf = [0u8; 256];
        let n = self.stdout.read(&mut buf).unwrap_or(0);
        self.console.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// Time from spawn to the first console output, or `None` if the console closed (the
    /// VMM exited) first; fails the run at `deadline`.
    fn wait_output(&mut self, deadline: Instant) -> Option<Duration> {
        if !self.console.is_empty() {
            return Some(self.start.elapsed());
        }
        if !poll(&[self.stdout.as_raw_fd()], deadline)[0] {
            self.fail("no console output");
        }
        let at = self.start.elapsed();
        self.read_console().then_some(at)
    }

    /// Waits for the marker line; time from spawn to its first byte.
    fn wait_marker(&mut self, deadline: Instant) -> Duration {
        let at = self
            .wait_output(deadline)
            .unwrap_or_else(|| self.fail("the console closed without output"));
        while !self.console.starts_with(b"K\n") {
            if self.console.len() >= 2 || !poll(&[self.stdout.as_raw_fd()], deadline)[0] {
                self.fail("no marker");
            }
            if !self.read_console() {
                self.fail("the console closed before the marker");
            }
        }
        at
    }

    /// Waits for the process to exit and reaps it: its status and the time from spawn.
    fn wait_exit(&mut self, deadline: Instant) -> (ExitStatus, Duration) {
        if !poll(&[self.pidfd.as_raw_fd()], deadline)[0] {
            self.fail("still running");
        }
        let at = self.start.elapsed();
        let status = self.child.wait().unwrap();
        self.reaped = true;
        (status, at)
    }

    /// Ends an idle guest: SIGKILL, then reaps it.
    fn kill(mut self) {
        let _ = self.child.kill();
        self.wait_exit(Instant::now() + DEADLINE);
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what} within the deadline; console {:?}; stderr:\n{}",
            String::from_utf8_lossy(&self.console),
            read(&self.stderr)
        )
    }
}

impl Drop for Run {
    /// A failed run must not leave a VMM behind on this small machine.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- memory ----

/// What `/proc/PID/smaps` says of a VMM running a guest of [`GUEST_MIB`], in KiB.
#[derive(Clone, Copy)]
struct Smaps {
    /// Sum of every mapping's `Rss:` (what VmRSS says, counted the same way for all).
    rss: f64,
    /// `Rss:` of the guest-RAM mapping: the one private or shared read-write mapping of
    /// exactly the guest's RAM size with no file behind it (anonymous, or a memfd). Kite
    /// maps guest RAM so (flags `dd`, MADV_DONTDUMP, and `hg` with huge pages); so does
    /// QEMU (its other RAM blocks, qboot's 64 KiB ROM image among them, are smaller, and
    /// its reservation around guest RAM is `---p` and a different size); so do
    /// Firecracker and Cloud Hypervisor. NaN unless exactly one mapping fits (a VMM that
    /// splits guest RAM), not guessed.
    guest: f64,
    /// Sum of `Pss:`.
    pss: f64,
}

impl Smaps {
    fn of(pid: u32) -> Smaps {
        let text = read(Path::new(&format!("/proc/{pid}/smaps")));
        let (mut rss, mut pss) = (0.0, 0.0);
        let mut guest = Vec::new();
        let mut is_guest_ram = false;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            let kib: f64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            match first {
                "Rss:" => {
                    rss += kib;
                    if is_guest_ram {
                        guest.push(kib);
                    }
                }
                "Pss:" => pss += kib,
                _ if first.ends_with(':') => {}
                // A mapping's first line: `start-end perms offset dev inode [path]`.
                _ => {
                    let (lo, hi) = first.split_once('-').unwrap();
                    let size =
                        u64::from_str_radix(hi, 16).unwrap() - u64::from_str_radix(lo, 16).unwrap();
                    let perms = line.split_whitespace().nth(1).unwrap_or("");
                    let path = line.split_whitespace().nth(5).unwrap_or("");
                    is_guest_ram = size == GUEST_MIB << 20
                        && perms.starts_with("rw")
                        && (path.is_empty() || path.starts_with("/memfd:"));
                }
            }
        }
        let guest = if guest.len() == 1 { guest[0] } else { f64::NAN };
        Smaps { rss, guest, pss }
    }

    fn overhead(&self) -> f64 {
        self.rss - self.guest
    }
}

fn loadavg() -> String {
    let text = read(Path::new("/proc/loadavg"));
    text.split(' ').take(3).collect::<Vec<_>>().join(" ")
}

// ---- the three parts ----

/// Calls `f(round, i)` for every VMM `i` of `vmms` in every round, in reverse order every
/// other round (the machine's speed drifts: it hits all alike).
fn alternating(vmms: usize, rounds: usize, mut f: impl FnMut(usize, usize)) {
    for round in 0..rounds {
        for k in 0..vmms {
            f(round, if round % 2 == 0 { k } else { vmms - 1 - k });
        }
    }
}

/// Part 1: for each VMM, spawn → first output and spawn → exit, in ms.
fn start_exit(vmms: &[Vmm], reset: &Path, dir: &Path, rounds: usize) -> Vec<(Samples, Samples)> {
    let mut samples = vec![(Samples::default(), Samples::default()); vmms.len()];
    alternating(vmms.len(), rounds, |round, i| {
        let stderr = dir.join(format!("start-{round}-{i}.stderr"));
        let mut run = Run::spawn(&vmms[i], reset, &stderr);
        let deadline = Instant::now() + DEADLINE;
        let first = run.wait_marker(deadline);
        let (status, exit) = run.wait_exit(deadline);
        if !status.success() {
            run.fail(&format!("{}: {status}", vmms[i].name));
        }
        samples[i].0 .0.push(ms(first));
        samples[i].1 .0.push(ms(exit));
    });
    samples
}

/// Part 2: smaps of each VMM with the idle guest once the marker is out, `runs` each.
fn idle_rss(vmms: &[Vmm], idle: &Path, dir: &Path, runs: usize) -> Vec<Vec<Smaps>> {
    let mut samples = vec![Vec::new(); vmms.len()];
    alternating(vmms.len(), runs, |round, i| {
        let mut run = Run::spawn(&vmms[i], idle, &dir.join(format!("rss-{round}-{i}.stderr")));
        run.wait_marker(Instant::now() + DEADLINE);
        samples[i].push(Smaps::of(run.child.id()));
        run.kill();
    });
    samples
}

struct Density {
    /// Spawn of the first → the last marker, ms.
    all_marked: f64,
    /// Sums over all guests then, MiB.
    rss: f64,
    pss: f64,
}

/// Part 3: `guests` idle guests of `vmm` started at once.
fn density(vmm: &Vmm, idle: &Path, dir: &Path, guests: usize) -> Density {
    let start = Instant::now();
    let mut runs: Vec<Run> = (0..guests)
        .map(|g| {
            Run::spawn(
                vmm,
                idle,
                &dir.join(format!("dense-{}-{g}.stderr", vmm.name)),
            )
        })
        .collect();
    let deadline = start + DENSITY_DEADLINE;
    let mut waiting: Vec<usize> = (0..guests).collect();
    while !waiting.is_empty() {
        let fds: Vec<RawFd> = waiting
            .iter()
            .map(|&g| runs[g].stdout.as_raw_fd())
            .collect();
        let ready = poll(&fds, deadline);
        if !ready.iter().any(|&r| r) {
            runs[waiting[0]].fail(&format!(
                "{} of {guests} guests without a marker",
                waiting.len()
            ));
        }
        for (&g, _) in waiting.iter().zip(&ready).filter(|(_, &r)| r) {
            if !runs[g].read_console() {
                runs[g].fail("the console closed before the marker");
            }
        }
        waiting.retain(|&g| !runs[g].console.starts_with(b"K\n"));
    }
    let all_marked = ms(start.elapsed());
    let (mut rss, mut pss) = (0.0, 0.0);
    for run in &runs {
        let smaps = Smaps::of(run.child.id());
        rss += smaps.rss / 1024.0;
        pss += smaps.pss / 1024.0;
    }
    runs.into_iter().for_each(Run::kill);
    Density {
        all_marked,
        rss,
        pss,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !kvm_available() {
        return;
    }
    if !qemu_available() {
        eprintln!("SKIPPED: qemu-system-x86_64 is missing (scripts/install-deps bench)");
        return;
    }
    let rounds = env_or("KITE_BENCH_RUNS", 20).max(1);
    let guests = env_or("KITE_BENCH_GUESTS", 50).max(1);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let reset = tiny_pvh_kernel(dir, "reset.elf", &reset_guest());
    let idle = tiny_pvh_kernel(dir, "idle.elf", &idle_guest());
    let qemu = Vmm::qemu(&qemu_cpu(dir, &reset));
    let others = Vmm::from_env();
    println!("kite: {}", kite_binary().display());
    println!("qemu: {}", qemu.argv.join(" "));
    for o in &others {
        println!("{}: {}", o.name, o.argv.join(" "));
    }
    println!(
        "guest: {GUEST_MIB} MiB, 1 vCPU; load average at the start: {}",
        loadavg()
    );

    // Part 1.
    let mut timed = vec![Vmm::kite(false), Vmm::kite(true), qemu.clone()];
    timed.extend(others.iter().cloned());
    let times = start_exit(&timed, &reset, dir, rounds);
    let q = 2; // QEMU's index in `timed`
    println!(
        "\n1. start/exit, ms from spawn, median (p10–p90) of {rounds}; stderr (and -v log) to a file"
    );
    println!(
        "{:<12}{:>24}{:>24}{:>14}{:>14}",
        "", "→ first output", "→ exit", "output/qemu", "exit/qemu"
    );
    for (vmm, (first, exit)) in timed.iter().zip(&times) {
        println!(
            "{:<12}{:>24}{:>24}{:>14.2}{:>14.2}",
            vmm.name,
            first.show_spread(1),
            exit.show_spread(1),
            first.median() / times[q].0.median(),
            exit.median() / times[q].1.median()
        );
    }

    // Part 2.
    let mut measured = vec![Vmm::kite(false), qemu.clone()];
    measured.extend(others.iter().cloned());
    let rss = idle_rss(&measured, &idle, dir, RSS_RUNS);
    println!("\n2. idle guest (two pages touched), smaps at the marker, MiB, median of {RSS_RUNS}");
    println!(
        "{:<12}{:>12}{:>12}{:>12}{:>12}{:>14}{:>16}",
        "", "total RSS", "guest RAM", "overhead", "PSS", "total/qemu", "overhead/qemu"
    );
    let median =
        |s: &[Smaps], f: fn(&Smaps) -> f64| Samples(s.iter().map(f).collect()).median() / 1024.0;
    let (qemu_total, qemu_overhead) =
        (median(&rss[1], |m| m.rss), median(&rss[1], Smaps::overhead));
    for (vmm, s) in measured.iter().zip(&rss) {
        let (total, overhead) = (median(s, |m| m.rss), median(s, Smaps::overhead));
        println!(
            "{:<12}{total:>12.2}{:>12.2}{overhead:>12.2}{:>12.2}{:>14.2}{:>16.2}",
            vmm.name,
            median(s, |m| m.guest),
            median(s, |m| m.pss),
            total / qemu_total,
            overhead / qemu_overhead
        );
    }

    // Part 3.
    let kite_dense = density(&Vmm::kite(false), &idle, dir, guests);
    let qemu_dense = density(&qemu, &idle, dir, guests);
    println!("\n3. density: {guests} idle guests started at once");
    println!(
        "{:<12}{:>22}{:>16}{:>16}{:>16}",
        "", "all marked (ms)", "RSS sum (MiB)", "PSS sum (MiB)", "PSS/guest"
    );
    for (name, d) in [("kite", &kite_dense), ("qemu", &qemu_dense)] {
        println!(
            "{name:<12}{:>22.0}{:>16.1}{:>16.1}{:>16.2}",
            d.all_marked,
            d.rss,
            d.pss,
            d.pss / guests as f64
        );
    }
    println!(
        "{:<12}{:>22.2}{:>16.2}{:>16.2}",
        "kite/qemu",
        kite_dense.all_marked / qemu_dense.all_marked,
        kite_dense.rss / qemu_dense.rss,
        kite_dense.pss / qemu_dense.pss
    );
    let (first, exit) = (times[0].0.median(), times[0].1.median());
    let overhead = median(&rss[0], Smaps::overhead);
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    println!("\ntargets of issue 16 (kite, medians; absolute times are noisy here)");
    println!(
        "{}  → first output {first:.1} ms <= 5 ms",
        verdict(first <= 5.0)
    );
    println!("{}  → exit {exit:.1} ms <= 20 ms", verdict(exit <= 20.0));
    println!(
        "{}  overhead {overhead:.2} MiB <= 2 MiB",
        verdict(overhead <= 2.0)
    );
    println!("\nload average at the end: {}", loadavg());
}
