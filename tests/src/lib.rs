//! Helpers for integration tests and benchmarks that boot real guests with the `kite` binary
//! (or another VMM, as a baseline): start it, watch its console, wait for lines and for its
//! exit, each with a deadline that fails the test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod snapshot;
pub mod stats;

/// The `kite` binary: `$KITE_BIN`, else the one built next to the running test.
pub fn kite_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KITE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/kite
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary under target/<profile>/deps")
        .join("kite");
    assert!(
        path.is_file(),
        "{} is missing: build it (cargo build -p vmm) or run cargo test --workspace",
        path.display()
    );
    path
}

/// Whether guests can run here; says loudly why not.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm is missing, so no guest can boot on this host");
    no_skips_wanted("/dev/kvm is missing");
    false
}

/// Fails the test when skips are not allowed (`KITE_NO_SKIPS`, set by `scripts/test-all`:
/// CI machines have everything a test needs, so a skip there hides a broken setup).
pub fn no_skips_wanted(why: &str) {
    assert!(
        std::env::var_os("KITE_NO_SKIPS").is_none(),
        "KITE_NO_SKIPS is set, but this test would skip: {why}"
    );
}

/// A file of the default guest (`resources/build-guest` makes them), or a loud skip.
pub fn default_guest_file(name: &str) -> Option<PathBuf> {
    let path = vmm::cli::default_guest_dir().join(name);
    if path.is_file() {
        return Some(path);
    }
    eprintln!(
        "SKIPPED: {} is missing: run resources/build-guest",
        path.display()
    );
    no_skips_wanted("the default guest is not built");
    None
}

/// The default guest's kernel and its spin initramfs (an init that never makes a system
/// call, so the kernel stays up serving devices), or loud skips for those missing.
pub fn spin_guest() -> Option<(PathBuf, PathBuf)> {
    let kernel = default_guest_file("vmlinux");
    let spin = default_guest_file("initramfs-spin.cpio");
    Some((kernel?, spin?))
}

/// Console output collected so far, and a condition variable signalled on each new chunk.
#[derive(Default)]
struct Console {
    text: Mutex<(String, bool)>,
    grew: Condvar,
}

/// A running VMM whose stdout is the guest console.
pub struct Kite {
    child: Child,
    console: Arc<Console>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Kite {
    /// A test that fails (panics) while its VMM runs must not leave it running: an
    /// orphaned guest spinning on this small machine would slow every later test and
    /// benchmark.
    fn drop(&mut self) {
        let status = self.child.try_wait();
        if let Ok(None) = status {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            // The test failed: show what the VMM said, and how it ended.
            let console = self
                .console
                .text
                .lock()
                .map(|t| t.0.clone())
                .unwrap_or_default();
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!(
                "kite (exit status before the test ended it: {status:?})\nstderr:\n{}\nlast console lines:\n{tail}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
    }
}

/// How a `kite` run ended.
#[derive(Debug)]
pub struct Ended {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Everything the guest printed.
    pub console: String,
    /// The VMM's own messages.
    pub stderr: String,
}

impl Kite {
    /// Starts `kite` with `args`; the guest console is collected from its stdout.
    pub fn start(args: &[&str]) -> Kite {
        let mut command = Command::new(kite_binary());
        command.args(args);
        Kite::spawn(command)
    }

    /// Starts `command` (a VMM whose stdout is the guest console).
    pub fn spawn(mut command: Command) -> Kite {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("kite starts");
        let console = Arc::new(Console::default());
        let mut stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&console);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = stdout.read(&mut buf).unwrap_or(0);
                let mut text = sink.text.lock().unwrap();
                if n == 0 {
                    text.1 = true;
                } else {
                    text.0.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                sink.grew.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        Kite {
            child,
            console,
            stderr,
            _dir: dir,
        }
    }

    /// Waits until the console shows `needle`; fails the test at the deadline or if the
    /// console closes first.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        self.wait_for_since(0, needle, timeout)
    }

    /// Where the console output is now, for [`Kite::wait_for_since`].
    pub fn mark(&self) -> usize {
        self.console.text.lock().unwrap().0.len()
    }

    /// Like [`Kite::wait_for`], for output after `mark`.
    pub fn wait_for_since(&self, mark: usize, needle: &str, timeout: Duration) {
        self.wait_until(&format!("{needle:?}"), timeout, |console| {
            console.get(mark..).is_some_and(|t| t.contains(needle))
        })
    }

    /// Waits until the console output so far passes `check`; fails the test at the
    /// deadline or if the console closes first, saying it did not show `what`.
    pub fn wait_until(&self, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut text = self.console.text.lock().unwrap();
        loop {
            if check(&text.0) {
                return;
            }
            let now = Instant::now();
            if text.1 || now >= deadline {
                // Not under the lock: a panic there would poison it for the console's
                // reader thread and for `Drop`, which shows the console's tail.
                let shown = text.0.clone();
                drop(text);
                panic!(
                    "console did not show {what} within {timeout:?}; it showed:\n{shown}\n\
                     stderr:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            text = self
                .console
                .grew
                .wait_timeout(text, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        self.console.text.lock().unwrap().0.clone()
    }

    /// Waits until the API socket at `socket` accepts connections; fails the test at the
    /// deadline or if `kite` exits first.
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "kite exited ({status}) before serving {}; stderr:\n{}",
                    socket.display(),
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not served within {timeout:?}",
                socket.display()
            );
            // Polling for the socket, which has no event to wait on.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to `kite`.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits for `kite` to exit; kills it and fails the test at the deadline.
    pub fn wait_exit(mut self, timeout: Duration) -> Ended {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "kite still running after {timeout:?}; console:\n{}",
                    self.console.text.lock().unwrap().0
                );
            }
            // Poll the exit status; the console thread keeps collecting meanwhile.
            std::thread::sleep(Duration::from_millis(50));
        };
        // The console closes when kite exits; give the reader a moment to see all of it.
        let closed_by = Instant::now() + Duration::from_secs(10);
        let mut text = self.console.text.lock().unwrap();
        while !text.1 && Instant::now() < closed_by {
            let left = closed_by.saturating_duration_since(Instant::now());
            text = self.console.grew.wait_timeout(text, left).unwrap().0;
        }
        Ended {
            code: status.code(),
            console: text.0.clone(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

/// Where a [`tiny_kernel`] or a [`tiny_pvh_kernel`] is loaded and entered.
pub const TINY_KERNEL_ENTRY: u64 = 0x10_0000;

/// Writes a minimal x86_64 ELF "kernel" to `dir`: one segment holding `code` at
/// [`TINY_KERNEL_ENTRY`], its entry point. It has no PVH note, so Kite enters it in 64-bit
/// mode on its boot page tables: a guest of a few instructions, for fast checks of the run
/// loop.
pub fn tiny_kernel(dir: &Path, code: &[u8]) -> PathBuf {
    let path = dir.join("tiny-kernel.elf");
    std::fs::write(&path, tiny_elf(code, false)).unwrap();
    path
}

/// Writes a minimal x86_64 ELF "kernel" with a PVH note to `dir/name`: one segment holding
/// `code` at [`TINY_KERNEL_ENTRY`], and a `XEN_ELFNOTE_PHYS32_ENTRY` note naming that
/// address. Any VMM that boots Linux through PVH (Kite, QEMU `-M microvm`, Firecracker,
/// Cloud Hypervisor) enters `code` in 32-bit protected mode, paging off, flat segments,
/// interrupts off, `%ebx` pointing at the PVH start info: the same few instructions under
/// every VMM, for comparing their own costs.
pub fn tiny_pvh_kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, tiny_elf(code, true)).unwrap();
    path
}

/// The ELF image of [`tiny_kernel`] and [`tiny_pvh_kernel`]: the header, the program
/// headers (PT_LOAD, then PT_NOTE if `pvh`), the note, the code.
fn tiny_elf(code: &[u8], pvh: bool) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let entry = TINY_KERNEL_ENTRY;
    // The note: name "Xen\0"; the descriptor is the entry as 8 bytes (loaders read 4, as
    // Linux writes it, or, like QEMU reading an ELF64, 8: the upper half is zero).
    let mut note = Vec::new();
    if pvh {
        for word in [4u32, 8, XEN_ELFNOTE_PHYS32_ENTRY] {
            note.extend_from_slice(&word.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&entry.to_le_bytes());
    }
    let phnum = if pvh { 2 } else { 1 };
    let note_offset = EHDR + PHDR * phnum;
    let code_offset = note_offset + note.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&EHDR.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [EHDR as u16, PHDR as u16, phnum as u16, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&PT_LOAD.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    let len = code.len() as u64;
    for word in [code_offset, entry, entry, len, len, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    if pvh {
        let len = note.len() as u64;
        elf.extend_from_slice(&PT_NOTE.to_le_bytes());
        elf.extend_from_slice(&4u32.to_le_bytes()); // R
        for word in [note_offset, 0, 0, len, len, 4] {
            elf.extend_from_slice(&word.to_le_bytes());
        }
    }
    elf.extend_from_slice(&note);
    elf.extend_from_slice(code);
    elf
}

/// A sparse disk image of `bytes` zeros at `dir/disk.img`, for a guest that needs a disk.
pub fn scratch_disk(dir: &Path, bytes: u64) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(bytes))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// The number in environment variable `name` (a benchmark's knob), else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether QEMU (the benchmarks' baseline, `scripts/install-deps bench`) is installed.
pub fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok()
}

/// Longest the API socket may take to answer, whatever the guest is doing.
pub const API_DEADLINE: Duration = Duration::from_secs(10);

/// Sends `method` `endpoint` (e.g. `vm.info`) with `body` to the API socket at `socket`;
/// the status and the JSON body (`null` if none). Fails the test if there is no answer
/// within [`API_DEADLINE`].
pub fn api(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let start = Instant::now();
    let body = body.map(|b| b.to_string());
    let path = format!("{}{endpoint}", vmm::api::API_PREFIX);
    let (status, reply) = vmm::api::request(
        socket,
        method,
        &path,
        body.as_deref().map(str::as_bytes),
        API_DEADLINE,
    )
    .unwrap_or_else(|e| panic!("the API socket did not answer {method} {endpoint}: {e}"));
    assert!(
        start.elapsed() < API_DEADLINE,
        "slow answer to {method} {endpoint}"
    );
    let value = if reply.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&reply).unwrap_or_else(|e| {
            panic!(
                "{method} {endpoint}: not JSON ({e}): {}",
                String::from_utf8_lossy(&reply)
            )
        })
    };
    (status, value)
}

/// Like [`api`], failing the test unless the VMM accepted the request (2xx).
pub fn api_ok(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let (status, value) = api(socket, method, endpoint, body);
    assert!(
        (200..300).contains(&status),
        "{method} {endpoint}: {status} {value}"
    );
    value
}

/// Asks the guest to resize its memory to `total` bytes in all (`vm.resize`).
pub fn resize(socket: &Path, total: u64) {
    api_ok(
        socket,
        "PUT",
        "vm.resize",
        Some(serde_json::json!({ "desired_ram": total })),
    );
}

/// The VM's counters (`vm.counters`).
pub fn counters(socket: &Path) -> serde_json::Value {
    api_ok(socket, "GET", "vm.counters", None)
}

/// Hotplugged bytes, as the API reports them.
pub fn plugged(socket: &Path) -> u64 {
    let counters = counters(socket);
    counters["mem"]["plugged_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("vm.counters reports the plugged size: {counters}"))
}

/// Waits until `want` bytes are plugged; returns how long that took. Fails the test past
/// `timeout`.
pub fn wait_plugged(socket: &Path, want: u64, timeout: Duration) -> Duration {
    let start = Instant::now();
    while plugged(socket) != want {
        assert!(
            start.elapsed() < timeout,
            "not {want} bytes plugged within {timeout:?}"
        );
        // Polling interval of the control socket, not synchronisation.
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}
