//! Memory hotplug with the default Linux kernel: its virtio_mem driver plugs 1 GiB when
//! asked through the control socket and unplugs it again; bad requests get error replies
//! and the guest carries on. One boot, with an /init that spins without system calls so
//! the kernel stays up on hosts where guest user space cannot make them.

use std::time::Duration;

use kite_tests::{
    api_call as call, default_guest_file, kite_binary, kvm_available, plugged, wait_plugged, Kite,
    API_DEADLINE as ANSWER_DEADLINE,
};
use serde_json::Value;
use vmm::cli::exit;

const BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Plugging or unplugging 1 GiB runs guest kernel code: minutes where it is emulated.
const RESIZE_DEADLINE: Duration = Duration::from_secs(15 * 60);
const GIB: u64 = 1 << 30;

/// The "Total pages" of the first zonelist rebuild the guest kernel printed in `console`.
fn total_pages(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.split("Total pages: ").nth(1))
        .find_map(|n| n.trim().parse().ok())
        .expect("a zonelist line")
}

#[test]
fn linux_plugs_and_unplugs_a_gibibyte() {
    if !kvm_available() {
        return;
    }
    let (Some(_), Some(spin)) = (
        default_guest_file("vmlinux"),
        default_guest_file("initramfs-spin.cpio"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let kite = Kite::start(&[
        "run",
        "--initramfs",
        spin.to_str().unwrap(),
        "--memory",
        "size=512M,hotplug_size=2G",
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for("Run /init as init process", BOOT_DEADLINE);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the control socket is private");
    kite.wait_for("virtio_mem virtio0: requested size: 0x0", BOOT_DEADLINE);

    // Plug 1 GiB: kite remote, as a user would.
    let status = std::process::Command::new(kite_binary())
        .args([
            "remote",
            "--api-socket",
            socket.to_str().unwrap(),
            "resize",
            "--memory",
            "1536M",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let plug_time = wait_plugged(&socket, GIB, RESIZE_DEADLINE);
    kite.wait_for(
        "virtio_mem virtio0: requested size: 0x40000000",
        ANSWER_DEADLINE,
    );

    // Bad requests: error replies, nothing changes.
    for (request, message) in [
        (
            serde_json::json!({"command": "resize", "memory": "100G"}),
            "the area holds",
        ),
        (
            serde_json::json!({"command": "resize", "memory": "1537M"}),
            "not a multiple",
        ),
        (
            serde_json::json!({"command": "resize", "memory": "256M"}),
            "below the boot memory",
        ),
        (serde_json::json!({"command": "resize"}), "needs \"memory\""),
        (serde_json::json!({"command": "explode"}), "unknown command"),
    ] {
        let reply = call(&socket, request.clone());
        assert_eq!(reply["ok"], Value::Bool(false), "{request}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{request}: {error}");
    }
    let garbage = {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(ANSWER_DEADLINE)).unwrap();
        s.write_all(b"{not http\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    assert!(
        garbage.starts_with("HTTP/1.1 400 ") && garbage.contains("malformed request"),
        "{garbage}"
    );
    assert_eq!(plugged(&socket), GIB, "bad requests changed nothing");

    // Unplug it all again.
    let reply = call(
        &socket,
        serde_json::json!({"command": "resize", "memory": "512M"}),
    );
    assert_eq!(reply["ok"], Value::Bool(true), "{reply}");
    let unplug_time = wait_plugged(&socket, 0, RESIZE_DEADLINE);
    let info = call(&socket, serde_json::json!({"command": "info"}));
    let blocks = GIB / devices::virtio::mem::BLOCK_SIZE;
    assert_eq!(info["memory"]["blocks_plugged"], blocks, "{info}");
    assert_eq!(info["memory"]["blocks_unplugged"], blocks, "{info}");
    eprintln!("plugged 1 GiB in {plug_time:?}, unplugged it in {unplug_time:?}");

    kite.signal(libc::SIGTERM);
    let end = kite.wait_exit(ANSWER_DEADLINE * 6);
    assert_eq!(
        end.code,
        Some(exit::SIGNAL_BASE + libc::SIGTERM),
        "{}",
        end.stderr
    );
    // The guest onlined the memory: its zonelists were rebuilt, with more pages, when the
    // first plugged block came online (in ZONE_MOVABLE; later blocks rebuild nothing).
    let boot_pages = total_pages(&end.console);
    let plugged_pages = end
        .console
        .split("requested size: 0x40000000")
        .nth(1)
        .map(total_pages)
        .expect("a zonelist line after the plug request");
    assert!(
        plugged_pages > boot_pages,
        "{boot_pages} -> {plugged_pages}"
    );
    assert!(!socket.exists(), "the socket is removed when Kite exits");
}
