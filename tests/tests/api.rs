//! Cloud Hypervisor's HTTP API with the test guest: every endpoint, each lifecycle step
//! (create, boot, pause, resume, reboot, shutdown, boot again, delete, VMM shutdown), and
//! bad requests, which get an error status while the VM runs on. The test guest's
//! `hotplug` scenario prints progress and does disk round trips until stopped: a pause
//! must stop both, a resume must start them again.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kite_tests::{api, api_ok, counters, kvm_available, resize, scratch_disk, wait_plugged, Kite};
use serde_json::{json, Value};
use vmm::cli::exit;

const GUEST: &str = env!("KITE_TEST_GUEST");
const MIB: u64 = 1 << 20;
const BOOT: u64 = 256 * MIB;
const DEADLINE: Duration = Duration::from_secs(60);

/// A `kite serve` with its socket, and a disk for the test guest.
struct Served {
    kite: Kite,
    socket: PathBuf,
    disk: PathBuf,
    _dir: tempfile::TempDir,
}

fn serve() -> Option<Served> {
    if !kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (socket, disk) = (
        dir.path().join("api.sock"),
        scratch_disk(dir.path(), 8 << 20),
    );
    let mut kite = Kite::start(&["serve", "--api-socket", socket.to_str().unwrap()]);
    kite.wait_for_socket(&socket, DEADLINE);
    Some(Served {
        kite,
        socket,
        disk,
        _dir: dir,
    })
}

/// The test guest's `hotplug` scenario as a Cloud Hypervisor `VmConfig`.
fn hotplug_guest(disk: &Path, hotplug: u64) -> Value {
    json!({
        "payload": {"kernel": GUEST, "cmdline": "kite.test=hotplug"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": BOOT, "hotplug_method": "VirtioMem", "hotplug_size": hotplug},
        "disks": [{"path": disk}],
        "rng": {"src": "/dev/urandom"},
    })
}

fn state(socket: &Path) -> Value {
    api_ok(socket, "GET", "vm.info", None)["state"].clone()
}

/// Waits until the console is quiet (output the guest wrote before a pause may still be
/// on its way to the reader: the guest prints about every 10 ms when it runs); where it
/// is then. A window in which nothing may happen follows (there is no event to wait for).
fn quiet(kite: &Kite) -> usize {
    let quiet_by = Instant::now() + DEADLINE;
    let mut mark = kite.mark();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = kite.mark();
        if now == mark {
            return mark;
        }
        assert!(
            Instant::now() < quiet_by,
            "the console never went quiet while paused"
        );
        mark = now;
    }
}

/// The region table's fast-path hits: the device threads' guest-memory accesses.
fn accesses(socket: &Path) -> u64 {
    counters(socket)["region_table"]["fast_path_hits"]
        .as_u64()
        .unwrap()
}

/// The first disk's writes served: the test guest writes it once a pass.
fn disk_writes(socket: &Path) -> u64 {
    let c = counters(socket);
    c["vda"]["write_ops"]
        .as_u64()
        .unwrap_or_else(|| panic!("vm.counters has vda's write_ops: {c}"))
}

#[test]
fn every_endpoint_and_the_whole_lifecycle() {
    let Some(Served {
        kite,
        socket,
        disk,
        _dir,
    }) = serve()
    else {
        return;
    };
    let ping = api_ok(&socket, "GET", "vmm.ping", None);
    assert_eq!(ping["pid"], kite.pid(), "{ping}");
    assert!(
        ping["features"].as_array().is_some_and(|f| !f.is_empty()),
        "{ping}"
    );
    for (method, endpoint) in [
        ("GET", "vm.info"),
        ("GET", "vm.counters"),
        ("PUT", "vm.boot"),
        ("PUT", "vm.pause"),
        ("PUT", "vm.shutdown"),
    ] {
        let (status, reply) = api(&socket, method, endpoint, None);
        assert_eq!(status, 404, "{endpoint} without a VM: {reply}");
        assert!(reply["error"].is_string(), "{reply}");
    }

    // Create: the configuration comes back as Kite runs it.
    api_ok(
        &socket,
        "PUT",
        "vm.create",
        Some(hotplug_guest(&disk, 512 * MIB)),
    );
    let info = api_ok(&socket, "GET", "vm.info", None);
    assert_eq!(info["state"], "Created", "{info}");
    assert_eq!(info["config"]["payload"]["kernel"], GUEST, "{info}");
    assert_eq!(
        info["config"]["memory"]["hotplug_size"],
        512 * MIB,
        "{info}"
    );
    assert_eq!(info["config"]["disks"][0]["path"], json!(disk), "{info}");
    assert_eq!(info["memory_actual_size"], BOOT, "{info}");

    // Boot, resize, counters.
    api_ok(&socket, "PUT", "vm.boot", None);
    kite.wait_for("kite-test: hotplug ready", DEADLINE);
    assert_eq!(state(&socket), "Running");
    resize(&socket, BOOT + 4 * MIB);
    wait_plugged(&socket, 4 * MIB, DEADLINE);
    let mark = kite.mark();
    kite.wait_for_since(mark, "hotplug steady plugged_mib=4 ", DEADLINE);
    let info = api_ok(&socket, "GET", "vm.info", None);
    assert_eq!(info["memory_actual_size"], BOOT + 4 * MIB, "{info}");
    let c = counters(&socket);
    assert_eq!(c["mem"]["blocks_plugged"], 2, "{c}");
    assert!(c["region_table"]["regions"].as_u64().unwrap() >= 3, "{c}");
    assert!(c["vda"]["write_ops"].as_u64().unwrap() > 0, "{c}");
    assert!(c["vda"]["read_ops"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(c["vda"]["errors"], 0, "{c}");
    assert!(c["rng"]["read_bytes"].is_u64(), "{c}");

    // Pause: the guest's output and its disk round trips stop.
    api_ok(&socket, "PUT", "vm.pause", None);
    assert_eq!(state(&socket), "Paused");
    let mark = quiet(&kite);
    let (before, writes) = (accesses(&socket), disk_writes(&socket));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(kite.mark(), mark, "the console went on while paused");
    assert_eq!(accesses(&socket), before, "devices served while paused");
    assert_eq!(
        disk_writes(&socket),
        writes,
        "disk writes counted while paused"
    );
    api_ok(&socket, "PUT", "vm.resume", None);
    assert_eq!(state(&socket), "Running");
    kite.wait_for_since(mark, "hotplug steady plugged_mib=4 ", DEADLINE);
    assert!(accesses(&socket) > before, "devices serve again");
    assert!(
        disk_writes(&socket) > writes,
        "disk writes are counted again"
    );

    // Reboot: a new VM from the same configuration (nothing plugged).
    let mark = kite.mark();
    api_ok(&socket, "PUT", "vm.reboot", None);
    kite.wait_for_since(mark, "kite-test: hotplug ready", DEADLINE);
    assert_eq!(state(&socket), "Running");
    assert_eq!(
        api_ok(&socket, "GET", "vm.info", None)["memory_actual_size"],
        BOOT
    );

    // Shutdown, boot again, delete.
    api_ok(&socket, "PUT", "vm.shutdown", None);
    assert_eq!(state(&socket), "Shutdown");
    let mark = kite.mark();
    api_ok(&socket, "PUT", "vm.boot", None);
    kite.wait_for_since(mark, "kite-test: hotplug ready", DEADLINE);
    api_ok(&socket, "PUT", "vm.delete", None);
    let (status, _) = api(&socket, "GET", "vm.info", None);
    assert_eq!(status, 404, "deleted");
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
    assert!(!socket.exists(), "the socket is removed");
}

/// Sends raw bytes to the socket; the status line's code.
fn raw(socket: &Path, bytes: &[u8]) -> u16 {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    // The server may answer (and close) before it has read everything.
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[test]
fn bad_requests_get_an_error_and_the_vm_runs_on() {
    let Some(Served {
        kite,
        socket,
        disk,
        _dir,
    }) = serve()
    else {
        return;
    };
    // Configurations Kite cannot run: refused, naming the field; nothing created.
    for (body, field) in [
        (
            json!({"payload": {"kernel": GUEST}, "net": [{"tap": "tap0"}]}),
            "net",
        ),
        (
            json!({"payload": {"kernel": GUEST}, "vsock": {"cid": 3, "socket": "/x"}}),
            "vsock",
        ),
        (
            json!({"payload": {"kernel": GUEST}, "memory": {"size": "1G"}}),
            "size",
        ),
        (
            json!({"payload": {"kernel": GUEST}, "memory": {"size": 4096}}),
            "size",
        ),
        (
            json!({"payload": {"kernel": "/nonexistent"}}),
            "/nonexistent",
        ),
        (
            json!({"payload": {"kernel": GUEST}, "frobnicate": 1}),
            "frobnicate",
        ),
    ] {
        let (status, reply) = api(&socket, "PUT", "vm.create", Some(body.clone()));
        assert_eq!(status, 400, "{body}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(field), "{body}: {error}");
    }
    assert_eq!(
        api(&socket, "GET", "vm.info", None).0,
        404,
        "nothing created"
    );

    api_ok(
        &socket,
        "PUT",
        "vm.create",
        Some(hotplug_guest(&disk, 1024 * MIB)),
    );
    api_ok(&socket, "PUT", "vm.boot", None);
    kite.wait_for("kite-test: hotplug ready", DEADLINE);

    // Malformed HTTP, wrong method, unknown path, oversized, not JSON, wrong types.
    assert_eq!(raw(&socket, b"NONSENSE\r\n\r\n"), 400);
    assert_eq!(
        raw(&socket, b"GET /api/v1/vm.info HTTP/1.1\r\nHost\r\n\r\n"),
        400
    );
    for (method, endpoint, body, status) in [
        ("PUT", "vm.info", None, 405),
        ("GET", "vm.pause", None, 405),
        ("GET", "vm.frobnicate", None, 404),
        ("PUT", "vm.add-net", Some(json!({"tap": "t"})), 501),
        // Not a file:///DIR URL (a good one would write a snapshot: see snapshot.rs and
        // snapshot_errors.rs).
        (
            "PUT",
            "vm.snapshot",
            Some(json!({"destination_url": "http://localhost/snap"})),
            400,
        ),
        ("PUT", "vm.resize", Some(json!("desired_ram")), 400),
        ("PUT", "vm.resize", Some(json!({"desired_ram": -5})), 400),
        (
            "PUT",
            "vm.resize",
            Some(json!({"desired_ram": u64::MAX})),
            400,
        ),
        ("PUT", "vm.resize", Some(json!({"desired_balloon": 1})), 400),
        ("PUT", "vm.power-button", None, 400),
        ("PUT", "vm.boot", None, 409),
        ("PUT", "vm.create", Some(hotplug_guest(&disk, 0)), 409),
        ("PUT", "vm.resume", None, 405),
    ] {
        let (got, reply) = api(&socket, method, endpoint, body.clone());
        assert_eq!(got, status, "{method} {endpoint} {body:?}: {reply}");
        assert!(reply["error"].is_string(), "{reply}");
    }
    let huge = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        vmm::api::MAX_REQUEST + 1
    );
    assert_eq!(raw(&socket, huge.as_bytes()), 413);
    let not_json = b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope";
    assert_eq!(raw(&socket, not_json), 400);

    // A resize during a resize (half the area takes the guest a while to plug): it may
    // be cut short, not redirected beyond its target.
    resize(&socket, BOOT + 512 * MIB);
    let (status, reply) = api(
        &socket,
        "PUT",
        "vm.resize",
        Some(json!({"desired_ram": BOOT + 1024 * MIB})),
    );
    assert_eq!(status, 409, "{reply}");
    wait_plugged(&socket, 512 * MIB, DEADLINE);

    // Pause when paused (405, as Cloud Hypervisor), resize when paused; after a shutdown,
    // nothing but boot/delete.
    api_ok(&socket, "PUT", "vm.pause", None);
    assert_eq!(api(&socket, "PUT", "vm.pause", None).0, 405);
    assert_eq!(
        api(
            &socket,
            "PUT",
            "vm.resize",
            Some(json!({"desired_ram": BOOT}))
        )
        .0,
        409
    );
    api_ok(&socket, "PUT", "vm.resume", None);
    let mark = kite.mark();
    kite.wait_for_since(mark, "hotplug steady plugged_mib=512 ", DEADLINE);
    api_ok(&socket, "PUT", "vm.shutdown", None);
    for (method, endpoint) in [
        ("PUT", "vm.pause"),
        ("PUT", "vm.resume"),
        ("PUT", "vm.shutdown"),
        ("PUT", "vm.reboot"),
    ] {
        assert_eq!(api(&socket, method, endpoint, None).0, 405, "{endpoint}");
    }
    assert_eq!(
        api(
            &socket,
            "PUT",
            "vm.resize",
            Some(json!({"desired_ram": BOOT}))
        )
        .0,
        409
    );
    let start = Instant::now();
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert!(start.elapsed() < DEADLINE);
    assert!(!end.console.contains("FAIL"), "{}", end.console);
}

#[test]
fn a_vm_whose_serial_port_is_off_prints_nothing() {
    let Some(Served {
        kite, socket, _dir, ..
    }) = serve()
    else {
        return;
    };
    // What orchestrators send when nobody reads the console: the guest runs as usual
    // (the rng scenario, which ends the VM with success on the exit port), its output is
    // dropped.
    let config = json!({
        "payload": {"kernel": GUEST, "cmdline": "kite.test=rng"},
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Null"},
    });
    api_ok(&socket, "PUT", "vm.create", Some(config));
    assert_eq!(
        api_ok(&socket, "GET", "vm.info", None)["config"]["serial"]["mode"],
        "Off"
    );
    api_ok(&socket, "PUT", "vm.boot", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
    assert_eq!(end.console, "", "the serial port is off");
}

#[test]
fn time_spent_paused_does_not_count_towards_the_timeout() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (socket, disk) = (
        dir.path().join("api.sock"),
        scratch_disk(dir.path(), 8 << 20),
    );
    let mut kite = Kite::start(&[
        "serve",
        "--timeout",
        "2",
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for_socket(&socket, DEADLINE);
    api_ok(
        &socket,
        "PUT",
        "vm.create",
        Some(hotplug_guest(&disk, 128 * MIB)),
    );
    api_ok(&socket, "PUT", "vm.boot", None);
    let booted = Instant::now();
    api_ok(&socket, "PUT", "vm.pause", None);
    // Paused past the 2 s: the VM must not end meanwhile (a window, no event to wait on).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&socket), "Paused", "ended while paused");
    api_ok(&socket, "PUT", "vm.resume", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::TIMEOUT), "{}", end.stderr);
    assert!(
        booted.elapsed() >= Duration::from_secs(4),
        "{:?}",
        booted.elapsed()
    );
}

#[test]
fn a_pause_stops_the_vcpus() {
    let Some(Served {
        kite, socket, _dir, ..
    }) = serve()
    else {
        return;
    };
    // A guest that only writes 'x' to the serial port, for ever: each byte a vCPU exit,
    // no device thread involved.
    let dir = tempfile::tempdir().unwrap();
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'x', // mov al, 'x'
        0xee, // out dx, al
        0xeb, 0xfd, // jmp (back to the out)
    ];
    let kernel = kite_tests::tiny_kernel(dir.path(), &code);
    let config = json!({"payload": {"kernel": kernel}, "memory": {"size": 64 * MIB}});
    api_ok(&socket, "PUT", "vm.create", Some(config));
    api_ok(&socket, "PUT", "vm.boot", None);
    kite.wait_for("xxxxxxxx", DEADLINE);
    api_ok(&socket, "PUT", "vm.pause", None);
    let mark = quiet(&kite);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(kite.mark(), mark, "the vCPU ran on while paused");
    api_ok(&socket, "PUT", "vm.resume", None);
    kite.wait_for_since(mark, "xxxxxxxx", DEADLINE);
    api_ok(&socket, "PUT", "vmm.shutdown", None);
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
}

/// Runs `kite remote --api-socket SOCKET ARGS`; its exit code and standard output.
fn remote(socket: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(kite_tests::kite_binary())
        .args(["remote", "--api-socket", socket.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn kite_remote_speaks_the_api() {
    let Some(Served {
        kite,
        socket,
        disk,
        _dir,
    }) = serve()
    else {
        return;
    };
    let (code, out) = remote(&socket, &["ping"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("\"pid\": {}", kite.pid())), "{out}");
    assert_eq!(remote(&socket, &["info"]).0, Some(1), "no VM yet: refused");
    let config = _dir.path().join("vm.json");
    std::fs::write(&config, hotplug_guest(&disk, 128 * MIB).to_string()).unwrap();
    assert_eq!(
        remote(&socket, &["create", config.to_str().unwrap()]).0,
        Some(0)
    );
    assert_eq!(remote(&socket, &["boot"]).0, Some(0));
    kite.wait_for("kite-test: hotplug ready", DEADLINE);
    assert_eq!(remote(&socket, &["resize", "--memory", "260M"]).0, Some(0));
    wait_plugged(&socket, 4 * MIB, DEADLINE);
    let (code, out) = remote(&socket, &["counters"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"plugged_bytes\": 4194304"), "{out}");
    assert_eq!(remote(&socket, &["pause"]).0, Some(0));
    assert!(remote(&socket, &["info"]).1.contains("\"Paused\""));
    assert_eq!(remote(&socket, &["pause"]).0, Some(1), "paused already");
    assert_eq!(remote(&socket, &["resume"]).0, Some(0));
    assert_eq!(remote(&socket, &["reboot"]).0, Some(0));
    assert_eq!(remote(&socket, &["shutdown"]).0, Some(0));
    assert_eq!(remote(&socket, &["delete"]).0, Some(0));
    assert_eq!(
        remote(&socket, &["resize", "--memory", "lots"]).0,
        Some(exit::BAD_ARGUMENTS)
    );
    assert_eq!(remote(&socket, &["shutdown-vmm"]).0, Some(0));
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(exit::GUEST_SHUTDOWN), "{}", end.stderr);
}
