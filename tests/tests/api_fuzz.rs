//! The API fuzzed from its OpenAPI document (`vmm/src/api/openapi.json`) by schemathesis:
//! bodies and parameters generated from the schemas and mutated, for every documented
//! operation (but `vmm.shutdown`, which would end the run), against `kite serve`, first
//! without a VM, then with a running one (which the fuzzer may pause, resume, reboot and
//! resize, but not shut down or delete). Pass: no
//! status or body the document does not allow, no 5xx, no hang (each request has a
//! deadline), and Kite still answers at the end and shuts down cleanly.
//!
//! schemathesis comes from PyPI (`scripts/test-all` installs it in
//! `~/.cache/kite/schemathesis`; `KITE_SCHEMATHESIS` names another binary).
//! `KITE_API_FUZZ_EXAMPLES` sets the examples per operation (default 40).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kite_tests::{api_ok, kite_binary, kvm_available, no_skips_wanted, tiny_kernel, Kite};

const DEADLINE: Duration = Duration::from_secs(60);

fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var_os("KITE_SCHEMATHESIS")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("KITE_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kite")))?;
            Some(cache.join("schemathesis/bin/schemathesis"))
        })?;
    path.is_file().then_some(path)
}

/// Copies bytes one way until either side closes.
fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Forwards TCP connections on a local port to the Unix socket `socket` (schemathesis
/// speaks HTTP over TCP only); the port.
fn forward(socket: &Path) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = UnixStream::connect(&socket) else {
                continue;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                pump(&client, &server);
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                pump(&s2, &c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

#[test]
fn the_api_holds_against_schemathesis() {
    if !kvm_available() {
        return;
    }
    let Some(schemathesis) = schemathesis() else {
        eprintln!("SKIPPED: schemathesis is not installed (scripts/test-all installs it)");
        no_skips_wanted("schemathesis is missing");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The kernel of the VM fuzzed while it runs: it halts for ever.
    let guest = dir.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    let halt = tiny_kernel(&guest, &[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    std::fs::rename(&halt, guest.join("vmlinux")).unwrap();
    let socket = dir.path().join("api.sock");
    let mut command = Command::new(kite_binary());
    command.args(["serve", "--api-socket", socket.to_str().unwrap()]);
    let mut kite = Kite::spawn(command);
    kite.wait_for_socket(&socket, DEADLINE);
    let port = forward(&socket);
    let examples = std::env::var("KITE_API_FUZZ_EXAMPLES").unwrap_or_else(|_| "40".into());
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/src/api/openapi.json");
    let fuzz = |exclude: &[&str]| {
        let mut command = Command::new(&schemathesis);
        command.args([
            "run",
            document.to_str().unwrap(),
            "--url",
            &format!("http://127.0.0.1:{port}/api/v1"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance",
            "--max-examples",
            &examples,
            "--request-timeout",
            "70",
            "--seed",
            "1",
            "--workers",
            "1",
        ]);
        for path in exclude {
            command.args(["--exclude-path", path]);
        }
        // Its cache (of failures found) goes with the test's directory.
        command.current_dir(dir.path());
        let out = command.output().unwrap();
        let report = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{report}");
        assert!(
            out.status.success(),
            "schemathesis found failures:\n{report}"
        );
    };
    // Without a VM: every operation but the one that ends Kite.
    fuzz(&["/vmm.shutdown"]);
    // With a running VM (a halting kernel, a hotplug area), which the fuzzer may pause,
    // resume, reboot and resize but not take away, nor snapshot (into whatever path it
    // makes up: tests/tests/snapshot.rs covers snapshots).
    let (_, _) = kite_tests::api(&socket, "PUT", "vm.delete", None);
    let config = serde_json::json!({
        "payload": {"kernel": guest.join("vmlinux")},
        "memory": {"size": 64 << 20, "hotplug_method": "VirtioMem", "hotplug_size": 128 << 20},
    });
    api_ok(&socket, "PUT", "vm.create", Some(config));
    api_ok(&socket, "PUT", "vm.boot", None);
    fuzz(&[
        "/vmm.shutdown",
        "/vm.shutdown",
        "/vm.delete",
        "/vm.snapshot",
    ]);
    assert_ne!(
        kite_tests::api(&socket, "GET", "vm.info", None).1["state"],
        "Shutdown"
    );
    // Kite answers still, and shuts down cleanly.
    api_ok(&socket, "GET", "vmm.ping", None);
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(0), "{}", end.stderr);
}
