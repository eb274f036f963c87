//! `kite run` with bad input: each gets its exit code and a one-line message, never a panic.
//! Most of these need no guest; those that load a kernel need `/dev/kvm` and skip, loudly,
//! without it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm::cli::exit;

const KITE: &str = env!("CARGO_BIN_EXE_kite");
/// Bad input is refused before any guest code runs: seconds at most.
const DEADLINE: Duration = Duration::from_secs(60);

struct Outcome {
    code: i32,
    stderr: String,
}

/// Runs `kite` with `args` (and `env`), failing the test if it has not exited by the deadline.
fn kite(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(KITE)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("kite {args:?} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code: status
            .code()
            .expect("kite exited normally, not by a signal"),
        stderr: std::fs::read_to_string(err).unwrap(),
    }
}

/// Asserts exit code `code` and a single stderr line containing `message`.
fn refused(args: &[&str], code: i32, message: &str) {
    refused_with_env(args, &[], code, message)
}

fn refused_with_env(args: &[&str], env: &[(&str, &str)], code: i32, message: &str) {
    let out = kite(args, env);
    assert!(
        !out.stderr.contains("panicked"),
        "kite {args:?} panicked: {}",
        out.stderr
    );
    assert_eq!(out.code, code, "kite {args:?}: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {:?}", out.stderr);
    assert!(
        lines[0].starts_with("kite: ") && lines[0].contains(message),
        "kite {args:?}: expected '{message}' in {:?}",
        lines[0]
    );
}

fn has_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm is missing; this test loads a kernel into a VM");
    assert!(
        std::env::var_os("KITE_NO_SKIPS").is_none(),
        "KITE_NO_SKIPS: /dev/kvm is missing"
    );
    false
}

fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

#[test]
fn bad_flags_are_bad_arguments() {
    let bad = exit::BAD_ARGUMENTS;
    refused(&["run", "--bogus"], bad, "unexpected argument '--bogus'");
    refused(&["fly"], bad, "unrecognized subcommand 'fly'");
    refused(
        &["run", "--memory", "size=lots"],
        bad,
        "'lots' is not a size",
    );
    refused(&["run", "--memory", "size=1M"], bad, "too small");
    refused(&["run", "--memory", "size=4T"], bad, "too large");
    refused(
        &["run", "--memory", "size=65537K"],
        bad,
        "multiple of 4 KiB",
    );
    refused(&["run", "--memory", "sz=1G"], bad, "unknown key 'sz'");
    refused(&["run", "--memory", "1G"], bad, "is not key=value");
    refused(&["run", "--cpus", "boot=0"], bad, "out of range");
    refused(&["run", "--cpus", "boot=100000"], bad, "out of range");
    refused(&["run", "--cpus", "boot=many"], bad, "is not a number");
    refused(&["run", "--cpus", "boot=1,boot=2"], bad, "given twice");
    refused(
        &["run", "--disk", "readonly=on"],
        bad,
        "'path=' is required",
    );
    refused(
        &["run", "--disk", "path=/x,readonly=maybe"],
        bad,
        "is not on or off",
    );
    let long = "x".repeat(4096);
    refused(&["run", "--cmdline", &long], bad, "too long");
    // The line the guest gets has the devices' announcements too: that must fit.
    let dir = tempfile::tempdir().unwrap();
    let kernel = file_with(
        dir.path(),
        "kernel",
        b"not run: the command line is refused first",
    );
    let disk = file_with(dir.path(), "disk.img", &[0; 512]);
    let disk = format!("path={}", disk.display());
    let nearly = "x".repeat(2040);
    refused(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &nearly,
            "--disk",
            &disk,
            "--rng",
        ],
        bad,
        "announcements of 2 virtio devices",
    );
    refused(
        &["-v", "--log-file", "/nonexistent/dir/log", "run"],
        bad,
        "--log-file",
    );
    // A symbolic link at the log's path is not followed into another file.
    let precious = file_with(dir.path(), "precious", b"keep");
    let link = dir.path().join("kite.log");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let remote = ["remote", "--api-socket", "/nonexistent", "info"];
    let mut args = vec!["--log-file", link.to_str().unwrap()];
    args.extend(remote);
    refused(&args, bad, "is a symbolic link");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep");
}

#[test]
fn bad_files_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = exit::BAD_INPUT;
    refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        input,
        "kernel /nonexistent/vmlinux: No such file",
    );
    let kernel = file_with(dir.path(), "k", b"\x7fELF");
    let kernel = kernel.to_str().unwrap();
    refused(
        &[
            "run",
            "--kernel",
            kernel,
            "--initramfs",
            "/nonexistent/initrd",
        ],
        input,
        "initramfs /nonexistent/initrd: No such file",
    );
    refused(
        &[
            "run",
            "--kernel",
            kernel,
            "--disk",
            "path=/nonexistent/disk.img",
        ],
        input,
        "disk /nonexistent/disk.img: No such file",
    );
    refused_with_env(
        &["run"],
        &[("KITE_GUEST_DIR", "/nonexistent/guest")],
        input,
        "the default guest is not built",
    );
}

#[test]
fn bad_config_files_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = exit::BAD_INPUT;
    let cases: [(&str, &[u8], &str); 5] = [
        ("garbage.json", b"{ not json", "key must be a string"),
        (
            "unknown.json",
            br#"{"memroy": {"size": "1G"}}"#,
            "unknown field `memroy`",
        ),
        ("size.json", br#"{"memory": {"size": "1Q"}}"#, "not a size"),
        ("small.json", br#"{"memory": {"size": "1M"}}"#, "too small"),
        ("cpus.json", br#"{"cpus": {"boot": 0}}"#, "out of range"),
    ];
    for (name, text, message) in cases {
        let path = file_with(dir.path(), name, text);
        refused(&["run", "--config", path.to_str().unwrap()], input, message);
    }
    refused(
        &["run", "--config", "/nonexistent/vm.json"],
        input,
        "No such file",
    );
    let huge = file_with(dir.path(), "huge.json", &vec![b' '; 2 << 20]);
    refused(
        &["run", "--config", huge.to_str().unwrap()],
        input,
        "larger than",
    );
}

#[test]
fn files_that_are_not_kernels_are_bad_input() {
    if !has_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = exit::BAD_INPUT;
    let empty = file_with(dir.path(), "empty", b"");
    refused(
        &["run", "--kernel", empty.to_str().unwrap()],
        input,
        "not a kernel image",
    );
    let text = file_with(dir.path(), "text", &b"just some text\n".repeat(100));
    refused(
        &["run", "--kernel", text.to_str().unwrap()],
        input,
        "not a kernel image",
    );
    // An ELF program is not a kernel: it would load below 1 MiB or nowhere.
    refused(
        &["run", "--kernel", "/bin/true"],
        input,
        "kernel /bin/true: ",
    );
    // A truncated ELF: headers promise more than the file holds.
    let mut elf = std::fs::read("/bin/true").unwrap();
    elf.truncate(200);
    let cut = file_with(dir.path(), "cut", &elf);
    refused(
        &["run", "--kernel", cut.to_str().unwrap()],
        input,
        "kernel ",
    );
}

/// The default guest's kernel, if built.
fn default_kernel() -> Option<PathBuf> {
    let path = vmm::cli::default_guest_dir().join("vmlinux");
    if path.is_file() {
        return Some(path);
    }
    eprintln!(
        "SKIPPED: {} is missing (run resources/build-guest)",
        path.display()
    );
    assert!(
        std::env::var_os("KITE_NO_SKIPS").is_none(),
        "KITE_NO_SKIPS: no default guest"
    );
    None
}

#[test]
fn truncated_kernels_and_oversized_initramfs_are_bad_input() {
    if !has_kvm() {
        return;
    }
    let Some(vmlinux) = default_kernel() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = exit::BAD_INPUT;
    let mut image = std::fs::read(&vmlinux).unwrap();
    image.truncate(image.len() / 2);
    let cut = file_with(dir.path(), "vmlinux-cut", &image);
    refused(
        &["run", "--kernel", cut.to_str().unwrap()],
        input,
        "vmlinux-cut: ",
    );
    // 100 MiB of initramfs cannot fit in 64 MiB of guest memory.
    let big = dir.path().join("big.cpio");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    refused(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initramfs",
            big.to_str().unwrap(),
            "--memory",
            "size=64M",
        ],
        input,
        "do not fit in guest memory",
    );
    let empty = file_with(dir.path(), "empty.cpio", b"");
    refused(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initramfs",
            empty.to_str().unwrap(),
        ],
        input,
        "the file is empty",
    );
}
