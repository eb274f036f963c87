//! Confinement: every Kite thread runs under its seccomp filter with no_new_privs, a
//! forbidden system call from any kind of thread ends Kite at once (exit 6) naming the
//! thread, a panicking thread ends it with exit 1, and `--timeout` stops a guest that
//! runs for ever. The forbidden calls and panics come from `KITE_TEST_TRIGGER`, which
//! only test (debug) builds of `kite` have.

use std::path::Path;
use std::time::{Duration, Instant};

use kite_tests::{kite_binary, kvm_available, resize, wait_plugged, Ended, Kite, API_DEADLINE};
use vmm::cli::exit;

const GUEST: &str = env!("KITE_TEST_GUEST");
const DEADLINE: Duration = Duration::from_secs(120);

/// A VM with a thread of every kind: vCPUs, a disk, an rng, lazy hotplug memory (the
/// fault handler and virtio-mem), the API socket (whose main thread is then of kind
/// `vmm`: it may build VMs; `--api-socket` left out with `no-api` in `extra`, the main
/// thread is of kind `main`). Its guest follows the requested hotplug size for ever.
fn every_kind_of_thread(dir: &Path, extra: &[&str], trigger: Option<&str>) -> Kite {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", disk.display());
    let socket = dir.join("api.sock");
    let mut args = vec![
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        "kite.test=hotplug",
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M,hotplug_size=128M,hotplug_backing=lazy,hotplugged_size=4M",
        "--disk",
        &disk,
        "--rng",
        "--api-socket",
        socket.to_str().unwrap(),
    ];
    if extra.contains(&"no-api") {
        args.truncate(args.len() - 2);
    }
    args.extend(extra.iter().filter(|a| **a != "no-api"));
    let mut command = std::process::Command::new(kite_binary());
    command.args(&args);
    if let Some(trigger) = trigger {
        command.env("KITE_TEST_TRIGGER", trigger);
    }
    Kite::spawn(command)
}

/// Each thread of process `pid`: its name and its `Seccomp` and `NoNewPrivs` lines.
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        out.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out
}

#[test]
fn every_thread_is_confined_with_no_new_privileges() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kite = every_kind_of_thread(dir.path(), &[], None);
    kite.wait_for("kite-test: hotplug ready", DEADLINE);
    // The API socket serves under its filter; virtio-mem plugs under its own (after the
    // 4 MiB asked from the start: a resize meanwhile would be refused as one in progress).
    let socket = dir.path().join("api.sock");
    wait_plugged(&socket, 4 << 20, DEADLINE);
    resize(&socket, 264 << 20);
    wait_plugged(&socket, 8 << 20, DEADLINE);
    http_error_paths(&socket);
    let expected = [
        "kite",
        "kite_vcpu0",
        "kite_vcpu1",
        "kite_vda",
        "kite_rng",
        "kite_mem",
        "kite-uffd",
        "kite_api",
    ];
    // The main thread confines itself once every other thread runs: wait for that.
    let deadline = Instant::now() + Duration::from_secs(30);
    let confined = loop {
        let threads = threads(kite.pid());
        let all_there = expected
            .iter()
            .all(|name| threads.iter().any(|(n, _, _)| n == name));
        if all_there && threads.iter().all(|(_, seccomp, _)| seccomp == "2") {
            break threads;
        }
        assert!(
            Instant::now() < deadline,
            "not every thread confined: {threads:?}"
        );
        std::thread::yield_now();
    };
    for (name, _, no_new_privs) in &confined {
        assert_eq!(no_new_privs, "1", "{name}");
    }
    kite.signal(libc::SIGTERM);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(
        end.code,
        Some(exit::SIGNAL_BASE + libc::SIGTERM),
        "{}",
        end.stderr
    );

    // Without filters, no thread may gain privileges either.
    let dir = tempfile::tempdir().unwrap();
    let kite = every_kind_of_thread(dir.path(), &["--seccomp=off"], None);
    kite.wait_for("kite-test: hotplug ready", DEADLINE);
    for (name, seccomp, no_new_privs) in threads(kite.pid()) {
        assert_eq!(
            (seccomp.as_str(), no_new_privs.as_str()),
            ("0", "1"),
            "{name}"
        );
    }
    kite.signal(libc::SIGTERM);
    kite.wait_exit(DEADLINE);
}

/// The control socket's other paths, under its filter: an oversized body (413, then the
/// rest drained), a request answered on a kept-alive connection, then a malformed one
/// (400, closed).
fn http_error_paths(socket: &Path) {
    use std::io::{Read, Write};
    let big = vec![b'x'; vmm::api::MAX_REQUEST as usize + 1];
    let put = vmm::api::request(socket, "PUT", "/api/v1/vm.resize", Some(&big), API_DEADLINE);
    assert_eq!(put.unwrap().0, 413);
    let mut raw = std::os::unix::net::UnixStream::connect(socket).unwrap();
    raw.set_read_timeout(Some(API_DEADLINE)).unwrap();
    raw.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\nNOT HTTP\r\n\r\n")
        .unwrap();
    let mut replies = String::new();
    raw.read_to_string(&mut replies).unwrap();
    assert!(replies.starts_with("HTTP/1.1 200 OK"), "{replies}");
    assert!(replies.contains("HTTP/1.1 400 Bad Request"), "{replies}");
}

/// Runs the every-kind VM with `KITE_TEST_TRIGGER=trigger` and `extra` arguments.
fn triggered(trigger: &str, extra: &[&str]) -> Option<Ended> {
    if !kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    Some(every_kind_of_thread(dir.path(), extra, Some(trigger)).wait_exit(DEADLINE))
}

#[test]
fn a_forbidden_system_call_from_any_thread_ends_kite_naming_the_thread() {
    for kind in [
        "vcpu",
        "block",
        "rng",
        "mem",
        "fault-handler",
        "api",
        "vmm",
        "main",
    ] {
        let extra: &[&str] = if kind == "main" { &["no-api"] } else { &[] };
        let Some(end) = triggered(&format!("{kind}:syscall"), extra) else {
            return;
        };
        assert_eq!(end.code, Some(exit::BAD_SYSCALL), "{kind}: {}", end.stderr);
        let message = format!(
            "kite: a thread ({kind}) made system call {}, which its seccomp filter does not allow",
            libc::SYS_getppid
        );
        assert!(end.stderr.contains(&message), "{kind}: {}", end.stderr);
    }
}

#[test]
fn with_seccomp_log_or_off_a_forbidden_call_does_not_stop_the_vm() {
    for mode in ["log", "off"] {
        let seccomp = format!("--seccomp={mode}");
        let extra = [seccomp.as_str(), "--timeout", "3"];
        let Some(end) = triggered("block:syscall", &extra) else {
            return;
        };
        assert_eq!(end.code, Some(exit::TIMEOUT), "{mode}: {}", end.stderr);
        assert!(
            end.console.contains("kite-test: hotplug ready"),
            "{mode}: {}",
            end.console
        );
    }
}

#[test]
fn a_panicking_vcpu_or_device_thread_ends_kite_with_exit_1() {
    for (kind, thread) in [("vcpu", "kite_vcpu"), ("block", "kite_vda")] {
        let Some(end) = triggered(&format!("{kind}:panic"), &[]) else {
            return;
        };
        assert_eq!(end.code, Some(exit::VMM_ERROR), "{kind}: {}", end.stderr);
        assert!(
            end.stderr.contains(&format!("kite: thread {thread}"))
                && end.stderr.contains("panicked")
                && end.stderr.contains("KITE_TEST_TRIGGER"),
            "{kind}: {}",
            end.stderr
        );
    }
}

#[test]
fn timeout_stops_a_guest_that_runs_for_ever() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let end = every_kind_of_thread(dir.path(), &["--timeout", "2"], None).wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::TIMEOUT), "{}", end.stderr);
    assert!(
        end.stderr
            .contains("the VM ran longer than --timeout 2; stopped"),
        "{}",
        end.stderr
    );
    assert!(start.elapsed() >= Duration::from_secs(2));
}
