//! The README's `curl --unix-socket` examples of the API, run as written against `kite
//! serve` (with the test guest as the kernel in their `vm.json`): each must succeed, and
//! the last ends Kite with exit 0.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kite_tests::{kite_binary, kvm_available, no_skips_wanted, Kite};

const GUEST: &str = env!("KITE_TEST_GUEST");
const DEADLINE: Duration = Duration::from_secs(60);
const SOCKET: &str = "/tmp/kite.sock";

/// The README's example block: the shell lines and the `vm.json` text.
fn examples() -> (Vec<String>, String) {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("<!-- api-examples")
        .expect("the examples' start marker");
    let end = readme
        .find("<!-- /api-examples -->")
        .expect("the examples' end marker");
    let section = &readme[start..end];
    let block = |fence: &str| -> String {
        let from = section
            .find(fence)
            .unwrap_or_else(|| panic!("a {fence} block"))
            + fence.len();
        let to = section[from..].find("```").expect("the block's end") + from;
        section[from..to].to_string()
    };
    let shell = block("```sh\n").lines().map(String::from).collect();
    (shell, block("```json\n"))
}

#[test]
fn the_readme_api_examples_work_as_written() {
    if !kvm_available() {
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is missing (scripts/install-deps)");
        no_skips_wanted("curl is missing");
        return;
    }
    let (shell, vm_json) = examples();
    assert_eq!(shell[0], format!("kite serve --api-socket {SOCKET} &"));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // The example's guest, with the test guest as its kernel (its `hotplug` scenario
    // follows resizes and does disk round trips until stopped).
    let mut config: serde_json::Value = serde_json::from_str(&vm_json).unwrap();
    config["payload"] = serde_json::json!({"kernel": GUEST, "cmdline": "kite.test=hotplug"});
    std::fs::write(dir.path().join("vm.json"), config.to_string()).unwrap();

    // Run where the examples run: relative paths in `vm.json` are the VMM's.
    let mut command = Command::new(kite_binary());
    command
        .args(["serve", "--api-socket", socket.to_str().unwrap()])
        .current_dir(dir.path());
    let mut kite = Kite::spawn(command);
    kite.wait_for_socket(&socket, DEADLINE);
    for line in &shell[1..] {
        assert!(line.starts_with("curl --unix-socket "), "{line}");
        let line = line.replace(SOCKET, socket.to_str().unwrap()).replacen(
            "curl ",
            "curl --fail-with-body -sS --max-time 60 ",
            1,
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if line.contains("vm.boot") {
            kite.wait_for("kite-test: hotplug ready", DEADLINE);
        }
    }
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(0), "{}", end.stderr);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
}
