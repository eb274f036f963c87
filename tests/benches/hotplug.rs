//! Hotplug benchmark. With the default Linux kernel (spinning /init, so it stays up),
//! booted by Kite and by QEMU q35 with virtio-mem-pci in the same run: the time from the
//! request to 1 GiB plugged, and back to nothing. Then the region table's writer waits
//! (p50/p99) during the test guest's hotplug load. Prints ratios.
//!
//! `cargo build --release -p vmm && cargo bench -p kite-tests --bench hotplug`
//! (needs qemu-system-x86: `scripts/install-deps bench`; `KITE_BENCH_ROUNDS` sets the
//! Linux rounds, Kite and QEMU alternating which goes first, default 1, medians printed;
//! `KITE_BENCH_CYCLES` sets the test-guest load cycles, default 20).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kite_tests::{
    counters, kite_binary, kvm_available, qemu_available, resize, spin_guest, wait_plugged, Kite,
};
use serde_json::{json, Value};

const GIB: u64 = 1 << 30;
const BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);
const RESIZE_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// A QMP connection to QEMU.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP socket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        qmp.line(); // greeting
        qmp.execute(json!({"execute": "qmp_capabilities"}));
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or(Value::Null)
    }

    fn execute(&mut self, command: Value) -> Value {
        let mut text = serde_json::to_vec(&command).unwrap();
        text.push(b'\n');
        self.writer.write_all(&text).unwrap();
        loop {
            let reply = self.line();
            if reply.get("event").is_none() {
                return reply;
            }
        }
    }

    fn plugged(&mut self) -> u64 {
        let r = self.execute(json!({"execute": "qom-get",
            "arguments": {"path": "vm0", "property": "size"}}));
        r["return"].as_u64().unwrap_or(0)
    }

    fn request(&mut self, size: u64) {
        let r = self.execute(json!({"execute": "qom-set",
            "arguments": {"path": "vm0", "property": "requested-size", "value": size}}));
        assert!(r.get("return").is_some(), "{r}");
    }

    fn wait_plugged(&mut self, want: u64) -> Duration {
        let start = Instant::now();
        while self.plugged() != want {
            assert!(
                start.elapsed() < RESIZE_DEADLINE,
                "QEMU: not {want} plugged"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }
}

fn kite_linux(spin: &str, dir: &Path) -> (Duration, Duration) {
    let socket = dir.join("kite.sock");
    let kite = Kite::start(&[
        "run",
        "--initramfs",
        spin,
        "--memory",
        "size=512M,hotplug_size=2G",
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for("virtio_mem virtio0: requested size: 0x0", BOOT_DEADLINE);
    kite.wait_for("Run /init as init process", BOOT_DEADLINE);
    let up = Instant::now();
    resize(&socket, 1536 << 20);
    wait_plugged(&socket, GIB, RESIZE_DEADLINE);
    let up = up.elapsed();
    let down = Instant::now();
    resize(&socket, 512 << 20);
    wait_plugged(&socket, 0, RESIZE_DEADLINE);
    let down = down.elapsed();
    kite.signal(libc::SIGKILL);
    kite.wait_exit(Duration::from_secs(60));
    (up, down)
}

fn qemu_linux(kernel: &str, spin: &str, dir: &Path) -> (Duration, Duration) {
    let qmp_path = dir.join("qmp.sock");
    // The same kernel and command line, less pci=off: virtio-mem is a PCI device here.
    let cmdline = vmm::cli::default_cmdline().replace(" pci=off", "");
    let mut command = Command::new("qemu-system-x86_64");
    command
        // See boot.rs for the -cpu flags.
        .args([
            "-M",
            "q35,accel=kvm",
            "-cpu",
            "host,-cx16,-arch-capabilities",
            "-smp",
            "1",
        ])
        .args(["-m", "512M,maxmem=4G"])
        .args(["-object", "memory-backend-ram,id=mem0,size=2G"])
        .args([
            "-device",
            "virtio-mem-pci,id=vm0,memdev=mem0,requested-size=0",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .args(["-kernel", kernel, "-initrd", spin, "-append", &cmdline])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    let qemu = Kite::spawn(command);
    qemu.wait_for("Run /init as init process", BOOT_DEADLINE);
    qemu.wait_for("requested size: 0x0", BOOT_DEADLINE);
    let mut qmp = Qmp::connect(&qmp_path);
    let up = Instant::now();
    qmp.request(GIB);
    qmp.wait_plugged(GIB);
    let up = up.elapsed();
    let down = Instant::now();
    qmp.request(0);
    qmp.wait_plugged(0);
    let down = down.elapsed();
    qemu.signal(libc::SIGKILL);
    qemu.wait_exit(Duration::from_secs(60));
    (up, down)
}

/// Writer waits of the region table during the test guest's hotplug load.
fn writer_waits(cycles: u64, dir: &Path) -> Value {
    let socket = dir.join("load.sock");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let disk = format!("path={}", disk.display());
    let kite = Kite::start(&[
        "run",
        "--kernel",
        env!("KITE_TEST_GUEST"),
        "--cmdline",
        "kite.test=hotplug",
        "--memory",
        "size=512M,hotplug_size=512M",
        "--disk",
        &disk,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for("kite-test: hotplug ready", BOOT_DEADLINE);
    for cycle in 0..cycles {
        resize(&socket, (512 + 128 * (1 + cycle % 3)) << 20);
        wait_plugged(&socket, (1 + cycle % 3) * (128 << 20), RESIZE_DEADLINE);
        resize(&socket, 512 << 20);
        wait_plugged(&socket, 0, RESIZE_DEADLINE);
    }
    let counters = counters(&socket);
    kite.signal(libc::SIGKILL);
    kite.wait_exit(Duration::from_secs(60));
    let table = &counters["region_table"];
    serde_json::json!({
        "count": table["writer_waits"],
        "p50_ns": table["writer_wait_p50_ns"],
        "p99_ns": table["writer_wait_p99_ns"],
        "max_ns": table["writer_wait_max_ns"],
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !kvm_available() {
        return;
    }
    let Some((kernel, spin)) = spin_guest() else {
        return;
    };
    let qemu_ok = qemu_available();
    let dir = tempfile::tempdir().unwrap();
    let (kernel, spin) = (kernel.to_str().unwrap(), spin.to_str().unwrap());
    let rounds: usize = std::env::var("KITE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    println!("kite: {}", kite_binary().display());
    if !qemu_ok {
        println!(
            "SKIPPED the QEMU baseline: qemu-system-x86_64 is missing (scripts/install-deps bench)"
        );
    }
    let (mut kite, mut qemu) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first: this machine's speed drifts by tens of percent over
        // minutes, and the pair should see the same drift.
        let kite_first = round % 2 == 0 || !qemu_ok;
        if kite_first {
            kite.push(kite_linux(spin, dir.path()));
        }
        if qemu_ok {
            qemu.push(qemu_linux(kernel, spin, dir.path()));
        }
        if !kite_first {
            kite.push(kite_linux(spin, dir.path()));
        }
        let (k_up, k_down) = kite[round];
        print!(
            "round {round}: kite plugged 1 GiB in {:.1} s, unplugged in {:.1} s",
            k_up.as_secs_f64(),
            k_down.as_secs_f64()
        );
        if let Some((q_up, q_down)) = qemu.get(round) {
            print!(
                " | qemu q35 + virtio-mem-pci {:.1} s, {:.1} s",
                q_up.as_secs_f64(),
                q_down.as_secs_f64()
            );
        }
        println!();
    }
    if qemu_ok {
        println!(
            "\n{:<26}{:>10}{:>10}{:>12}",
            "Linux, 1 GiB (median)", "kite (s)", "qemu (s)", "kite/qemu"
        );
        let median = |v: &[(Duration, Duration)], pick: fn(&(Duration, Duration)) -> Duration| {
            let mut secs: Vec<f64> = v.iter().map(|r| pick(r).as_secs_f64()).collect();
            secs.sort_by(f64::total_cmp);
            secs[secs.len() / 2]
        };
        for (name, pick) in [
            ("plug", (|r: &(Duration, Duration)| r.0) as fn(&_) -> _),
            ("unplug", |r: &(Duration, Duration)| r.1),
        ] {
            let (k, q) = (median(&kite, pick), median(&qemu, pick));
            println!("{name:<26}{k:>10.1}{q:>10.1}{:>12.2}", k / q);
        }
        println!("target: kite/qemu <= 1.0");
    }
    let cycles = std::env::var("KITE_BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let waits = writer_waits(cycles, dir.path());
    println!("\nregion-table writer waits over {cycles} test-guest hotplug cycles: {waits}");
}
