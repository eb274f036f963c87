//! Helpers for the snapshot tests (`tests/snapshot.rs`, `tests/snapshot_errors.rs`) with
//! the test guest's `snapshot` scenario (guest.c): the guest fills 32 MiB of boot RAM with
//! a seeded pattern, follows the virtio-mem requested size with a pattern in every block
//! it plugs, and does a virtio-blk round trip on every pass.
//!
//! The snapshot interface they are written against:
//! - `PUT /api/v1/vm.snapshot` with `{"destination_url": "file:///ABS/DIR"}` writes the VM
//!   (its state and its memory) into DIR, which must not exist yet;
//! - `kite run --restore path=DIR,memory=lazy|private|eager [--disk path=...]
//!   [--api-socket SOCK]` runs the VM from DIR: the guest goes on where it was, and the
//!   console shows only what it prints after the restore. The snapshot's files are not
//!   changed by a restore (several restores share them).

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use vmm::cli::exit;

use crate::{api_ok, scratch_disk, Kite};

/// The test guest.
pub const GUEST: &str = env!("KITE_TEST_GUEST");
/// A mebibyte.
pub const MIB: u64 = 1 << 20;
/// Boot RAM: the guest's pattern takes 32 MiB from 64 MiB.
pub const BOOT: u64 = 256 * MIB;
/// The hotplug area (a multiple of 128 MiB): the guest finishes once all of it is plugged.
pub const AREA: u64 = 128 * MIB;
/// Plugged at boot, and when the snapshot is taken.
pub const BEFORE: u64 = 4 * MIB;
/// Asked for after the restore, before the whole area.
pub const AFTER: u64 = 8 * MIB;
/// `--memory` of the scenario: [`BOOT`], [`AREA`], [`BEFORE`] plugged at boot.
pub const MEMORY: &str = "size=256M,hotplug_size=128M,hotplugged_size=4M";
/// The scenario's disk.
pub const DISK_BYTES: u64 = 8 << 20;
/// For each step: a boot, a resize, a snapshot, a restore, the final check.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A `kite run` of the scenario with its API socket.
pub struct Vm {
    /// The VMM.
    pub kite: Kite,
    /// Its API socket.
    pub socket: PathBuf,
}

/// `snapshot steady` with `mib` plugged; the space keeps 4 from matching 48.
pub fn steady(mib: u64) -> String {
    format!("kite-test: snapshot steady plugged_mib={mib} ")
}

/// Boots the scenario with `disk` and an API socket in `dir`, `extra` appended to its
/// command line; waits until it is set up and has settled at [`BEFORE`] plugged.
pub fn boot(dir: &Path, disk: &Path, extra: &str) -> Vm {
    boot_with(dir, disk, extra, MEMORY, BEFORE)
}

/// Like [`boot`], with `--memory memory`, settling at `plugged` bytes.
pub fn boot_with(dir: &Path, disk: &Path, extra: &str, memory: &str, plugged: u64) -> Vm {
    let socket = dir.join("api.sock");
    let cmdline = format!("kite.test=snapshot {extra}");
    let disk_arg = format!("path={}", disk.display());
    let mut kite = Kite::start(&[
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        cmdline.trim_end(),
        "--memory",
        memory,
        "--disk",
        &disk_arg,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for_socket(&socket, DEADLINE);
    kite.wait_for("kite-test: snapshot ready", DEADLINE);
    kite.wait_for(&steady(plugged >> 20), DEADLINE);
    // And the next: the first is complete (a pause may cut a line short).
    let mark = kite.mark();
    kite.wait_for_since(mark, &steady(plugged >> 20), DEADLINE);
    Vm { kite, socket }
}

/// The `passes=` of the last complete `snapshot` progress line in `console` (a snapshot
/// may pause the guest in the middle of one).
pub fn last_passes(console: &str) -> u64 {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .rev()
        .filter(|l| l.starts_with("kite-test: snapshot "))
        .find_map(|l| l.split_once(" passes=")?.1.trim().parse().ok())
        .unwrap_or_else(|| panic!("no snapshot progress line with passes= in:\n{console}"))
}

/// The `vm.snapshot` body writing into `dir`.
pub fn snapshot_body(dir: &Path) -> serde_json::Value {
    json!({ "destination_url": format!("file://{}", dir.display()) })
}

/// Takes a snapshot of the VM behind `socket` into `dir` (which must not exist yet).
pub fn take_snapshot(socket: &Path, dir: &Path) {
    assert!(dir.is_absolute() && !dir.exists(), "{}", dir.display());
    api_ok(socket, "PUT", "vm.snapshot", Some(snapshot_body(dir)));
    assert!(dir.is_dir(), "the snapshot is in {}", dir.display());
    // Guest memory is the guest's: only Kite's user may read it.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o700);
    for file in ["state.json", "memory"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
}

/// `run --restore path=SNAPSHOT,memory=MODE --disk path=DISK --api-socket SOCKET`.
pub fn restore_args(snapshot: &Path, mode: &str, disk: &Path, socket: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--restore".into(),
        format!("path={},memory={mode}", snapshot.display()),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--api-socket".into(),
        socket.to_str().unwrap().into(),
    ]
}

/// Starts `kite` with [`restore_args`] and returns at once (see [`running`]).
pub fn start_restore(snapshot: &Path, mode: &str, disk: &Path, socket: &Path) -> Vm {
    let args = restore_args(snapshot, mode, disk, socket);
    let kite = Kite::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    Vm {
        kite,
        socket: socket.to_path_buf(),
    }
}

/// Waits until a restored VM's socket answers (`kite run --restore` runs the VM at once).
pub fn running(mut vm: Vm) -> Vm {
    vm.kite.wait_for_socket(&vm.socket, DEADLINE);
    vm
}

/// Each file under `dir` (relative path) with its length and a hash of its bytes.
pub fn hash_tree(dir: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, u64)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
                continue;
            }
            let mut file = std::fs::File::open(&path).unwrap();
            let (mut hasher, mut len) = (std::hash::DefaultHasher::new(), 0u64);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                hasher.write(&buf[..n]);
                len += n as u64;
            }
            let name = path.strip_prefix(root).unwrap().to_path_buf();
            out.insert(name, (len, hasher.finish()));
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// What [`snapshot_of`] leaves: the snapshot, a copy of the disk as it was then, the
/// snapshot's file hashes, and the guest's pass count at the snapshot.
pub struct Snapshot {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The disk as it was at the snapshot.
    pub disk: PathBuf,
    /// [`hash_tree`] of `dir` just after the snapshot.
    pub hashes: BTreeMap<PathBuf, (u64, u64)>,
    /// The guest's pass count at the snapshot.
    pub passes: u64,
}

/// Boots the scenario in `dir`, lets it settle at [`BEFORE`] plugged under load, takes a
/// snapshot into `dir/snapshot` with a copy of the disk beside it, and shuts the VM down.
///
/// The VM is paused for the snapshot and the disk copy: the guest reads back on each pass
/// what its last pass wrote, so the disk a restore gets must be the disk as it was at the
/// snapshot, not as the first VM left it (running on after the snapshot, it overwrites
/// that data within about 128 passes: some 40 ms at the 3000 passes a second it makes
/// here).
pub fn snapshot_of(dir: &Path) -> Snapshot {
    let disk = scratch_disk(dir, DISK_BYTES);
    let vm = boot(dir, &disk, "");
    api_ok(&vm.socket, "PUT", "vm.pause", None);
    let snapshot = dir.join("snapshot");
    take_snapshot(&vm.socket, &snapshot);
    let copy = dir.join("at-snapshot.img");
    std::fs::copy(&disk, &copy).unwrap();
    api_ok(&vm.socket, "PUT", "vmm.shutdown", None);
    let end = vm.kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
    let hashes = hash_tree(&snapshot);
    assert!(!hashes.is_empty(), "files in {}", snapshot.display());
    Snapshot {
        dir: snapshot,
        disk: copy,
        hashes,
        passes: last_passes(&end.console),
    }
}
