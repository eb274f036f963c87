//! Bad input to snapshots and restores (issue 15's "Bad input" list), with the test guest's
//! `snapshot` scenario: a missing, truncated, corrupt or foreign snapshot, a memory file
//! shorter than its map, a snapshot directory that exists already, a snapshot asked for
//! while a resize is under way, disks that do not match. Each is a clear error (exit 3 for
//! a bad snapshot at `kite run --restore`, 2 for bad arguments; a 4xx through the API),
//! nothing is left half made, a running VM runs on, and the snapshot's files are not
//! changed. Every wait has a deadline: Kite must neither panic nor hang on any of it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kite_tests::snapshot::{
    boot_with, hash_tree, snapshot_body, snapshot_of, take_snapshot, Snapshot, BOOT, DEADLINE,
    DISK_BYTES, MIB,
};
use kite_tests::{api, api_ok, counters, kvm_available, resize, Kite};
use serde_json::json;
use vmm::cli::exit;
use vmm::snapshot::format::{from_text, to_text, VmSnapshot};
use vmm::snapshot::{MemoryRestore, Restore};

/// Longest a refused restore may take to end Kite: it reads two files and exits.
const REFUSED_WITHIN: Duration = Duration::from_secs(20);
/// How long a running VM may take to print its next progress line.
const PROGRESS_WITHIN: Duration = Duration::from_secs(20);

// ---- kite run --restore ----

/// A `kite run --restore` that must be refused: the arguments after `run` (the snapshot,
/// disks...), and what must be said.
struct Refused {
    /// For messages.
    name: &'static str,
    args: Vec<String>,
    code: i32,
    /// Each must be in Kite's stderr.
    says: Vec<String>,
}

/// `--restore path=DIR` (lazy memory: nothing read before the checks) with `more` args.
fn restore_args(dir: &Path, more: &[&str]) -> Vec<String> {
    restore_args_in(dir, "lazy", more)
}

/// `--restore path=DIR,memory=MODE` with `more` args.
fn restore_args_in(dir: &Path, mode: &str, more: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--restore".to_string(),
        format!("path={},memory={mode}", dir.display()),
    ];
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

/// Runs `case` with an API socket in `work`: Kite must exit with the case's code within
/// [`REFUSED_WITHIN`], saying what it must, without panicking or running the guest, and
/// leave no socket. What went wrong, if anything.
fn refusal_problems(case: &Refused, work: &Path) -> Vec<String> {
    let socket = work.join("api.sock");
    let mut args = vec!["run".to_string()];
    args.extend(case.args.iter().cloned());
    args.extend(["--api-socket".to_string(), socket.display().to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let end = Kite::start(&argv).wait_exit(REFUSED_WITHIN);
    let mut problems = Vec::new();
    if end.code != Some(case.code) {
        problems.push(format!("exit code {:?}, not {}", end.code, case.code));
    }
    for needle in &case.says {
        if !end.stderr.contains(needle.as_str()) {
            problems.push(format!("stderr does not say {needle:?}"));
        }
    }
    if end.stderr.contains("panicked") {
        problems.push("Kite panicked".into());
    }
    if !end.console.is_empty() {
        problems.push(format!("the guest ran: {}", end.console));
    }
    if socket.exists() {
        problems.push(format!(
            "the API socket {} was left behind",
            socket.display()
        ));
        let _ = std::fs::remove_file(&socket);
    }
    if !problems.is_empty() {
        problems.push(format!("stderr: {}", end.stderr.trim_end()));
    }
    problems
}

/// What can change in a file cheaply seen: its length and modification time. (The
/// snapshot's own files are hashed whole once at the end.)
fn stamps(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut stamps: Vec<_> = entries
        .map(|e| {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            (path, meta.len(), meta.modified().unwrap())
        })
        .collect();
    stamps.sort();
    stamps
}

/// The snapshot's state file's text.
fn state_text(snapshot: &Path) -> String {
    std::fs::read_to_string(snapshot.join("state.json")).unwrap()
}

/// A snapshot directory `work/name` with `state` as its state file and the good
/// snapshot's memory file (a hard link: a write to it through the case would show in the
/// good snapshot's hashes).
fn with_state(good: &Path, work: &Path, name: &str, state: &str) -> PathBuf {
    let dir = work.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("state.json"), state).unwrap();
    std::fs::hard_link(good.join("memory"), dir.join("memory")).unwrap();
    dir
}

/// Like [`with_state`], the state being the good one changed by `change` and written
/// with a correct checksum: Kite's own format, describing something else.
fn with_changed_state(
    good: &Path,
    work: &Path,
    name: &str,
    change: impl FnOnce(&mut VmSnapshot),
) -> PathBuf {
    let mut snapshot = from_text(&state_text(good)).unwrap();
    change(&mut snapshot);
    with_state(good, work, name, &to_text(&snapshot).unwrap())
}

/// The good state's text with `from` (which must be there) replaced by `to`.
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} in the state file");
    text.replacen(from, to, 1)
}

/// The state's text with one digit of the state (not of the envelope) changed: still
/// JSON, still the format's, but not what was written.
fn one_digit_changed(text: &str) -> String {
    let state = text.find("\"state\":").expect("a state") + 8;
    let at = state
        + text[state..]
            .find("\"api_version\":")
            .expect("the host's KVM API version")
        + 14;
    let digit = text.as_bytes()[at];
    assert!(digit.is_ascii_digit(), "{}", &text[at..at + 8]);
    let other = if digit == b'9' { b'8' } else { digit + 1 };
    let mut bytes = text.as_bytes().to_vec();
    bytes[at] = other;
    String::from_utf8(bytes).unwrap()
}

/// A CPUID feature bit this host does not offer, added to the snapshot's host: leaf 7
/// subleaf 0, EBX (structured extended features, which no mask of Kite's touches).
fn add_cpuid_feature(snapshot: &mut VmSnapshot) {
    let leaf = snapshot
        .host
        .cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .expect("CPUID leaf 7 in the snapshot's host");
    let bit = (0..32)
        .find(|b| leaf.ebx & (1 << b) == 0)
        .expect("a feature of leaf 7 EBX this host lacks");
    leaf.ebx |= 1 << bit;
}

/// A FIFO at `path`: opening it to read waits for a writer, which never comes.
fn fifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "{}", path.display());
}

/// A sparse file of `bytes` at `path`.
fn sparse(path: &Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .unwrap();
}

/// Every snapshot `kite run --restore` must refuse with exit 3, and the arguments it must
/// refuse with exit 2: each said in words, nothing left behind, the snapshot unchanged.
#[test]
fn kite_run_refuses_bad_snapshots_and_arguments_that_do_not_fit() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Snapshot {
        dir: good,
        disk,
        hashes,
        ..
    } = snapshot_of(dir.path());
    let work = dir.path().join("cases");
    std::fs::create_dir(&work).unwrap();
    let text = state_text(&good);
    let good_disk = format!("path={}", disk.display());
    let refused = |name, args, says: &[&str]| Refused {
        name,
        args,
        code: exit::BAD_INPUT,
        says: says.iter().map(|s| s.to_string()).collect(),
    };

    let missing = work.join("no-such-snapshot");
    let no_state = work.join("no-state");
    std::fs::create_dir(&no_state).unwrap();
    std::fs::hard_link(good.join("memory"), no_state.join("memory")).unwrap();
    let no_memory = work.join("no-memory");
    std::fs::create_dir(&no_memory).unwrap();
    std::fs::write(no_memory.join("state.json"), &text).unwrap();
    let short_memory = work.join("short-memory");
    std::fs::create_dir(&short_memory).unwrap();
    std::fs::write(short_memory.join("state.json"), &text).unwrap();
    let memory_len = std::fs::metadata(good.join("memory")).unwrap().len();
    sparse(&short_memory.join("memory"), memory_len - 4096);
    let state_fifo = work.join("state-fifo");
    std::fs::create_dir(&state_fifo).unwrap();
    fifo(&state_fifo.join("state.json"));
    std::fs::hard_link(good.join("memory"), state_fifo.join("memory")).unwrap();
    let memory_fifo = work.join("memory-fifo");
    std::fs::create_dir(&memory_fifo).unwrap();
    std::fs::write(memory_fifo.join("state.json"), &text).unwrap();
    fifo(&memory_fifo.join("memory"));
    let a_file = work.join("a-file");
    std::fs::write(&a_file, "not a snapshot").unwrap();
    let wrong_size_disk = work.join("wrong-size.img");
    sparse(&wrong_size_disk, DISK_BYTES + 4096);
    let second_disk = work.join("second.img");
    sparse(&second_disk, DISK_BYTES);

    let cases = vec![
        refused(
            "missing directory",
            restore_args(&missing, &[]),
            &[&format!(
                "snapshot {}: No such file or directory",
                missing.display()
            )],
        ),
        refused(
            "a file, not a directory",
            restore_args(&a_file, &[]),
            &[&format!("snapshot {}: Not a directory", a_file.display())],
        ),
        refused(
            "no state file",
            restore_args(&no_state, &[]),
            &["state.json", "No such file or directory"],
        ),
        refused(
            "state file a FIFO",
            restore_args(&state_fifo, &[]),
            &["state.json", "not a regular file"],
        ),
        refused(
            "truncated state",
            restore_args(
                &with_state(&good, &work, "half-state", &text[..text.len() / 2]),
                &[],
            ),
            &["state.json", "truncated"],
        ),
        refused(
            "empty state",
            restore_args(&with_state(&good, &work, "empty", ""), &[]),
            &["state.json", "truncated"],
        ),
        refused(
            "not JSON",
            restore_args(
                &with_state(&good, &work, "not-json", "\u{7f}ELF and so on"),
                &[],
            ),
            &["not a Kite snapshot"],
        ),
        refused(
            "one byte changed",
            restore_args(
                &with_state(&good, &work, "one-digit", &one_digit_changed(&text)),
                &[],
            ),
            &["corrupt", "CRC-32"],
        ),
        refused(
            "another format",
            restore_args(
                &with_state(
                    &good,
                    &work,
                    "other-format",
                    &replaced(
                        &text,
                        r#""format":"kite-snapshot""#,
                        r#""format":"other-vmm""#,
                    ),
                ),
                &[],
            ),
            &["not a Kite snapshot", "other-vmm"],
        ),
        refused(
            "a foreign state file",
            restore_args(
                &with_state(
                    &good,
                    &work,
                    "other-json",
                    r#"{"id": "vm0", "snapshots": []}"#,
                ),
                &[],
            ),
            &["not a Kite snapshot"],
        ),
        refused(
            "format version 3",
            restore_args(
                &with_state(
                    &good,
                    &work,
                    "version-3",
                    &replaced(&text, r#""version":2,"#, r#""version":3,"#),
                ),
                &[],
            ),
            &["version 3", "versions 1 to 2"],
        ),
        refused(
            "format version 3 with another envelope",
            restore_args(
                &with_state(
                    &good,
                    &work,
                    "version-3-envelope",
                    r#"{"format":"kite-snapshot","version":3,"sha256":"00","parts":[]}"#,
                ),
                &[],
            ),
            &["version 3", "versions 1 to 2"],
        ),
        refused(
            "another host's CPU",
            restore_args(
                &with_changed_state(&good, &work, "other-host", add_cpuid_feature),
                &[],
            ),
            &[
                "this host cannot restore the snapshot",
                "CPUID leaf 0x7 subleaf 0",
                "missing here",
            ],
        ),
        refused(
            "memory file shorter than its map",
            restore_args(&short_memory, &[]),
            &["memory file", &format!("holds {}", memory_len - 4096)],
        ),
        // Mapped past its end, the file would kill Kite with SIGBUS on the guest's touch.
        refused(
            "memory file shorter than its map, memory=private",
            restore_args_in(&short_memory, "private", &[]),
            &["memory file", &format!("holds {}", memory_len - 4096)],
        ),
        refused(
            "memory file shorter than its map, memory=eager",
            restore_args_in(&short_memory, "eager", &[]),
            &["memory file", &format!("holds {}", memory_len - 4096)],
        ),
        refused(
            "memory file a FIFO",
            restore_args(&memory_fifo, &[]),
            &["memory", "not a regular file"],
        ),
        refused(
            "memory file missing",
            restore_args(&no_memory, &[]),
            &["memory", "No such file or directory"],
        ),
        refused(
            "vCPU states removed",
            restore_args(
                &with_changed_state(&good, &work, "vcpus-removed", |s| s.vcpus.clear()),
                &[],
            ),
            &["inconsistent", "0 vCPU states for 1 vCPUs"],
        ),
        refused(
            "a configuration Kite refuses",
            restore_args(
                &with_changed_state(&good, &work, "bad-config", |s| s.config.memory.size.0 += 1),
                &[],
            ),
            &["inconsistent", "configuration", "memory"],
        ),
        refused(
            "memory map not the configuration's",
            restore_args(
                &with_changed_state(&good, &work, "other-memory", |s| {
                    s.config.memory.size.0 *= 2
                }),
                &[],
            ),
            &["inconsistent", "no memory saved"],
        ),
        refused(
            "another number of disks",
            restore_args(
                &good,
                &[
                    "--disk",
                    &good_disk,
                    "--disk",
                    &format!("path={}", second_disk.display()),
                ],
            ),
            &["the snapshot's VM has 1 disk, 2 given"],
        ),
        refused(
            "a disk of another size",
            restore_args(
                &good,
                &["--disk", &format!("path={}", wrong_size_disk.display())],
            ),
            &[
                &wrong_size_disk.display().to_string(),
                &format!("{} bytes", DISK_BYTES + 4096),
                &format!("had {DISK_BYTES}"),
            ],
        ),
        refused(
            "a disk missing",
            restore_args(
                &good,
                &[
                    "--disk",
                    &format!("path={}", work.join("gone.img").display()),
                ],
            ),
            &["gone.img", "No such file or directory"],
        ),
        Refused {
            code: exit::BAD_ARGUMENTS,
            ..refused(
                "--restore with --kernel",
                restore_args(&good, &["--kernel", kite_tests::snapshot::GUEST]),
                &["--restore", "--kernel", "cannot be used with"],
            )
        },
        Refused {
            code: exit::BAD_ARGUMENTS,
            ..refused(
                "an unknown memory mode",
                vec![
                    "--restore".into(),
                    format!("path={},memory=sometimes", good.display()),
                ],
                &["'sometimes' is not a memory restore mode"],
            )
        },
    ];
    let mut failed = Vec::new();
    for case in &cases {
        // Shown if the case hangs (the wait for Kite's exit fails the test).
        eprintln!("case: {}", case.name);
        let before = (stamps(&good), stamps(&work));
        let mut problems = refusal_problems(case, &work);
        if (stamps(&good), stamps(&work)) != before {
            problems.push("files of the snapshots changed".into());
        }
        if !problems.is_empty() {
            failed.push(format!("{}:\n  {}", case.name, problems.join("\n  ")));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert_eq!(hash_tree(&good), hashes, "the snapshot changed");
    // The good snapshot with the good disk is restored: the cases failed for what they
    // changed.
    let socket = work.join("good.sock");
    let mut good_run = Kite::start(&[
        "run",
        "--restore",
        &format!("path={}", good.display()),
        "--disk",
        &good_disk,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    good_run.wait_for_socket(&socket, DEADLINE);
    good_run.wait_for("kite-test: snapshot steady", PROGRESS_WITHIN);
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = good_run.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
}

// ---- vm.snapshot of a running VM ----

/// The snapshot scenario with a guest that never plugs (`kite.plug=never`), nothing
/// plugged at boot.
const NEVER_PLUGS: &str = "size=256M,hotplug_size=128M";

/// The VM behind `socket`, whose console `kite` shows, runs on: `vm.info` says so and the
/// guest prints another progress line (`steady`, or `holding` during a resize).
fn runs_on(kite: &Kite, socket: &Path, what: &str) {
    let mark = kite.mark();
    let info = api_ok(socket, "GET", "vm.info", None);
    assert_eq!(info["state"], "Running", "after {what}: {info}");
    kite.wait_for_since(mark, "kite-test: snapshot ", PROGRESS_WITHIN);
    let mark = kite.mark();
    kite.wait_for_since(mark, " passes=", PROGRESS_WITHIN);
}

/// Entries of `dir` whose name starts with `prefix` (a partial snapshot left behind).
fn entries_starting(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// What happens to the names in a directory (inotify): a snapshot directory must appear
/// whole, renamed into place, never be created there and filled.
struct DirWatch {
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    fn new(dir: &Path) -> DirWatch {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 takes no pointers.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor inotify_init1 just returned, owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;
        // SAFETY: our inotify descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd_of(&fd), path.as_ptr(), mask) };
        assert!(wd >= 0, "inotify: {}", std::io::Error::last_os_error());
        DirWatch { fd }
    }

    /// What happened since the last call (the kernel queues each event as the file
    /// system operation is done): `created`, `deleted`, `moved out`, `moved in`, by name.
    fn events(&self) -> Vec<(&'static str, String)> {
        let mut events = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into `buf`, which is as long as said.
            let n = unsafe { libc::read(fd_of(&self.fd), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break; // EAGAIN: nothing more
            }
            let mut at = 0;
            while at + 16 <= n as usize {
                let word =
                    |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap());
                let (mask, len) = (word(4), word(12) as usize);
                let name = String::from_utf8_lossy(&buf[at + 16..at + 16 + len])
                    .trim_end_matches('\0')
                    .to_string();
                let what = match mask & !libc::IN_ISDIR {
                    libc::IN_CREATE => "created",
                    libc::IN_DELETE => "deleted",
                    libc::IN_MOVED_FROM => "moved out",
                    libc::IN_MOVED_TO => "moved in",
                    _ => "other",
                };
                events.push((what, name));
                at += 16 + len;
            }
        }
        events
    }
}

fn fd_of(fd: &std::os::fd::OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// What `events` did to `name`.
fn happened_to<'a>(events: &'a [(&'static str, String)], name: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|(_, n)| n == name)
        .map(|(what, _)| *what)
        .collect()
}

/// `vm.snapshot` with `body`: refused with `status`, saying `says`.
fn snapshot_refused(socket: &Path, body: serde_json::Value, status: u16, says: &str) {
    let (got, reply) = api(socket, "PUT", "vm.snapshot", Some(body.clone()));
    assert_eq!(got, status, "vm.snapshot {body}: {reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(says),
        "vm.snapshot {body}: the error does not say {says:?}: {reply}"
    );
}

/// `vm.snapshot` into a directory that exists, into a missing directory, to a URL that is
/// not a file's, and during a resize: each refused (400, 400, 400, 409) with nothing
/// written or left behind; the VM runs on after each, and a snapshot asked for once the
/// resize is called off is written.
#[test]
fn a_refused_snapshot_leaves_the_vm_running_and_nothing_behind() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = kite_tests::scratch_disk(dir.path(), DISK_BYTES);
    let vm = boot_with(dir.path(), &disk, "kite.plug=never", NEVER_PLUGS, 0);
    let (kite, socket) = (&vm.kite, vm.socket.as_path());
    let snaps = dir.path().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    let watch = DirWatch::new(&snaps);

    // A directory that exists, with a file of the user's in it; an empty one; a file.
    let existing = snaps.join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("notes.txt"), "the user's own").unwrap();
    let empty = snaps.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let file = snaps.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    watch.events();
    for target in [&existing, &empty, &file] {
        let before = hash_tree(&snaps);
        snapshot_refused(socket, snapshot_body(target), 400, "exists already");
        assert_eq!(hash_tree(&snaps), before, "{}", target.display());
        assert_eq!(watch.events(), [], "{}", target.display());
        let name = target.file_name().unwrap().to_string_lossy();
        assert_eq!(
            entries_starting(&snaps, &format!(".{name}.partial-")),
            Vec::<String>::new(),
            "a partial snapshot left beside {}",
            target.display()
        );
        runs_on(kite, socket, "a snapshot into a path that exists");
    }

    // A directory whose parent does not exist.
    let orphan = snaps.join("no-such-parent").join("snap");
    snapshot_refused(
        socket,
        snapshot_body(&orphan),
        400,
        &format!(
            "{}: No such file or directory",
            snaps.join("no-such-parent").display()
        ),
    );
    assert!(!snaps.join("no-such-parent").exists());
    assert_eq!(entries_starting(&snaps, "."), Vec::<String>::new());
    runs_on(kite, socket, "a snapshot into a missing directory");

    // Not a file:///DIR URL.
    for url in [
        format!("http://localhost{}", snaps.join("http").display()),
        "file://relative/dir".to_string(),
        snaps.join("no-scheme").display().to_string(),
        "file:///".to_string(),
    ] {
        snapshot_refused(socket, json!({ "destination_url": url }), 400, "URL");
        runs_on(kite, socket, "a snapshot to a URL that is not a file's");
    }
    assert_eq!(
        entries_starting(&snaps, ""),
        ["a-file", "empty", "existing"].map(String::from).to_vec(),
        "nothing new in {}",
        snaps.display()
    );
    assert_eq!(
        watch.events(),
        [],
        "nothing happened in {}",
        snaps.display()
    );

    // During a resize: the guest never plugs, so the resize stays under way.
    resize(socket, BOOT + 2 * MIB);
    let mem = &counters(socket)["mem"];
    assert_eq!(
        (
            mem["requested_bytes"].as_u64(),
            mem["plugged_bytes"].as_u64()
        ),
        (Some(2 * MIB), Some(0)),
        "{mem}"
    );
    let mark = kite.mark();
    kite.wait_for_since(
        mark,
        "kite-test: snapshot holding plugged_mib=0 ",
        PROGRESS_WITHIN,
    );
    let info = api_ok(socket, "GET", "vm.info", None);
    assert_eq!(
        info["memory_actual_size"].as_u64(),
        Some(BOOT),
        "vm.info shows the resize is not done: {info}"
    );
    let during = snaps.join("during-resize");
    watch.events();
    snapshot_refused(socket, snapshot_body(&during), 409, "resize");
    assert!(!during.exists());
    assert_eq!(entries_starting(&snaps, ".during"), Vec::<String>::new());
    let events = watch.events();
    assert_eq!(
        happened_to(&events, "during-resize"),
        Vec::<&str>::new(),
        "the refused snapshot's directory never appears: {events:?}"
    );
    runs_on(kite, socket, "a snapshot during a resize");
    let mark = kite.mark();
    kite.wait_for_since(mark, "kite-test: snapshot holding", PROGRESS_WITHIN);

    // The resize called off (back to what is plugged), a snapshot is written.
    resize(socket, BOOT);
    let mark = kite.mark();
    kite.wait_for_since(
        mark,
        "kite-test: snapshot steady plugged_mib=0 ",
        PROGRESS_WITHIN,
    );
    let good = snaps.join("good");
    watch.events();
    take_snapshot(socket, &good);
    let events = watch.events();
    assert_eq!(
        happened_to(&events, "good"),
        ["moved in"],
        "the snapshot directory appears whole, renamed into place: {events:?}"
    );
    runs_on(kite, socket, "a good snapshot");
    let restore = Restore::open(&good, MemoryRestore::Lazy)
        .unwrap_or_else(|e| panic!("the snapshot after the errors reads back: {e}"));
    assert_eq!(restore.snapshot.memory.ranges.len(), 1, "boot RAM only");

    api_ok(socket, "PUT", "vmm.shutdown", None);
    let end = vm.kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
    assert!(!end.stderr.contains("panicked"), "{}", end.stderr);
}

// ---- kite serve: no VM, vm.restore ----

/// `vm.snapshot` without a VM (404); `vm.restore` of bad snapshots (400), after each of
/// which the VMM has no VM (`vm.info` 404); then of a good one, which runs; then
/// `vm.restore` with that VM there (409).
#[test]
fn vm_restore_of_a_bad_snapshot_leaves_no_vm_and_a_good_one_restores_after() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Snapshot {
        dir: good, hashes, ..
    } = snapshot_of(dir.path());
    let work = dir.path().join("cases");
    std::fs::create_dir(&work).unwrap();
    let text = state_text(&good);

    let socket = dir.path().join("serve.sock");
    let mut kite = Kite::start(&["serve", "--api-socket", socket.to_str().unwrap()]);
    kite.wait_for_socket(&socket, DEADLINE);

    let (status, reply) = api(
        &socket,
        "PUT",
        "vm.snapshot",
        Some(snapshot_body(&work.join("of-nothing"))),
    );
    assert_eq!(status, 404, "vm.snapshot without a VM: {reply}");
    assert!(!work.join("of-nothing").exists());

    let short_memory = work.join("short-memory");
    std::fs::create_dir(&short_memory).unwrap();
    std::fs::write(short_memory.join("state.json"), &text).unwrap();
    sparse(&short_memory.join("memory"), 4096);
    let state_fifo = work.join("state-fifo");
    std::fs::create_dir(&state_fifo).unwrap();
    fifo(&state_fifo.join("state.json"));
    let bad = [
        ("missing", work.join("no-such-snapshot"), "No such file"),
        ("state file a FIFO", state_fifo, "not a regular file"),
        (
            "corrupt",
            with_state(&good, &work, "one-digit", &one_digit_changed(&text)),
            "corrupt",
        ),
        ("short memory", short_memory, "memory file holds 4096 bytes"),
        (
            "another host",
            with_changed_state(&good, &work, "other-host", add_cpuid_feature),
            "this host cannot restore",
        ),
        (
            "vCPU states removed",
            with_changed_state(&good, &work, "vcpus-removed", |s| s.vcpus.clear()),
            "inconsistent",
        ),
        // Found once the machine is half built (its fault handler started, its memory
        // partly in place): all of that goes again.
        (
            "memory map not the configuration's",
            with_changed_state(&good, &work, "other-memory", |s| {
                s.config.memory.size.0 *= 2
            }),
            "no memory saved",
        ),
    ];
    for prefault in [false, true] {
        for (name, snapshot, says) in &bad {
            let body = json!({
                "source_url": format!("file://{}", snapshot.display()),
                "prefault": prefault,
            });
            let (status, reply) = api(&socket, "PUT", "vm.restore", Some(body));
            assert_eq!(status, 400, "{name} (prefault {prefault}): {reply}");
            let error = reply["error"].as_str().unwrap_or_default();
            assert!(
                error.contains(says),
                "{name}: the error does not say {says:?}: {reply}"
            );
            let (status, info) = api(&socket, "GET", "vm.info", None);
            assert_eq!(status, 404, "{name}: no VM after it: {info}");
        }
    }

    let url = format!("file://{}", good.display());
    api_ok(
        &socket,
        "PUT",
        "vm.restore",
        Some(json!({ "source_url": url })),
    );
    let info = api_ok(&socket, "GET", "vm.info", None);
    assert_eq!(info["state"], "Paused", "{info}");
    let (status, reply) = api(
        &socket,
        "PUT",
        "vm.restore",
        Some(json!({ "source_url": url })),
    );
    assert_eq!(status, 409, "vm.restore with a VM there: {reply}");
    api_ok(&socket, "PUT", "vm.resume", None);
    kite.wait_for("kite-test: snapshot steady", PROGRESS_WITHIN);
    let (status, reply) = api(
        &socket,
        "PUT",
        "vm.restore",
        Some(json!({ "source_url": url })),
    );
    assert_eq!(status, 409, "vm.restore with a VM running: {reply}");
    let mark = kite.mark();
    kite.wait_for_since(mark, "kite-test: snapshot steady", PROGRESS_WITHIN);

    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(0), "{}", end.stderr);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
    assert!(
        !end.console.contains("kite-test: guest up"),
        "the restored guest went on, not booted again:\n{}",
        end.console
    );
    assert!(!end.stderr.contains("panicked"), "{}", end.stderr);
    assert_eq!(hash_tree(&good), hashes, "the snapshot changed");
}
