//! API latency under load: `vm.info` and `vm.resize` requests (each on a new connection,
//! as `curl` and `ch-remote` make them) from 4 concurrent clients while the test guest
//! runs its hotplug load (a host thread resizing its memory up and down, the guest
//! plugging, checking patterns and doing disk round trips), against the floor measured in
//! the same run: the same request bytes sent to an echo thread over a Unix socket, which
//! answers with a response of the same size. Rounds interleave the three. Prints p50/p99
//! and ratios; target: p99 <= 1 ms and <= 5x the floor's p99.
//!
//! `cargo build --release -p vmm && cargo bench -p kite-tests --bench api`
//! (`KITE_BENCH_REQUESTS`, default 10000 per kind; `KITE_BENCH_CLIENTS`, default 4).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kite_tests::{api, env_or, kvm_available, scratch_disk, Kite};
use serde_json::json;

const GUEST: &str = env!("KITE_TEST_GUEST");
const MIB: u64 = 1 << 20;
const BOOT: u64 = 256 * MIB;
const DEADLINE: Duration = Duration::from_secs(120);
const ROUNDS: usize = 10;

/// Reads one HTTP message (head, then `Content-Length` bytes) from `stream`.
fn read_message(stream: &mut UnixStream) -> Vec<u8> {
    let mut message = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed mid-message");
        message.extend_from_slice(&buf[..n]);
        let Some(head_end) = message.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&message[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if message.len() >= head_end + 4 + length {
            return message;
        }
    }
}

/// One request on a new connection; its latency and the status code.
fn one(socket: &Path, request: &[u8]) -> (Duration, u16) {
    let start = Instant::now();
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.write_all(request).expect("write");
    let reply = read_message(&mut stream);
    let elapsed = start.elapsed();
    let status = String::from_utf8_lossy(&reply[9..12]).parse().unwrap_or(0);
    (elapsed, status)
}

/// The floor: answers each request with a response of `size` bytes.
fn echo_server(listener: UnixListener, size: usize) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        let request = read_message(&mut stream);
        let mut body = request.repeat(size / request.len().max(1) + 1);
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ";
        body.truncate(size.saturating_sub(head.len() + 8));
        let response = format!("{head}{}\r\n\r\n", body.len());
        let mut response = response.into_bytes();
        response.extend_from_slice(&body);
        let _ = stream.write_all(&response);
    }
}

/// `count` requests from `clients` threads at once; latencies sorted, statuses seen.
fn measure(
    socket: &Path,
    request: &[u8],
    count: usize,
    clients: usize,
) -> (Vec<Duration>, Vec<u16>) {
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, request) = (socket.to_path_buf(), request.to_vec());
            std::thread::spawn(move || {
                (0..count / clients)
                    .map(|_| one(&socket, &request))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<(Duration, u16)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort();
    let statuses = all.iter().map(|(_, s)| *s).collect();
    (all.into_iter().map(|(d, _)| d).collect(), statuses)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn request(method: &str, endpoint: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !kvm_available() {
        return;
    }
    let requests = env_or("KITE_BENCH_REQUESTS", 10_000);
    let clients = env_or("KITE_BENCH_CLIENTS", 4);
    let dir = tempfile::tempdir().unwrap();
    let (socket, disk) = (
        dir.path().join("api.sock"),
        scratch_disk(dir.path(), 8 << 20),
    );
    let memory = format!("size={}M,hotplug_size=512M", BOOT >> 20);
    let disk_arg = format!("path={}", disk.display());
    let kite = Kite::start(&[
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        "kite.test=hotplug",
        "--memory",
        &memory,
        "--disk",
        &disk_arg,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    kite.wait_for("kite-test: hotplug ready", DEADLINE);

    // The hotplug load: up by 2-16 MiB and back down, as fast as the guest follows.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (socket, stop) = (socket.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut resizes = 0u64;
            let mut up = true;
            while !stop.load(Ordering::Relaxed) {
                let extra = if up { (2 + 2 * (resizes % 8)) * MIB } else { 0 };
                let (status, _) = api(
                    &socket,
                    "PUT",
                    "vm.resize",
                    Some(json!({"desired_ram": BOOT + extra})),
                );
                if status == 204 {
                    resizes += 1;
                    up = !up;
                }
            }
            resizes
        })
    };

    let info = request("GET", "vm.info", "");
    let resize = request(
        "PUT",
        "vm.resize",
        &json!({"desired_ram": BOOT}).to_string(),
    );
    let info_size = {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(&info).unwrap();
        read_message(&mut stream).len()
    };
    let floor_socket: PathBuf = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&floor_socket).unwrap();
    std::thread::spawn(move || echo_server(listener, info_size));

    let per_round = (requests / ROUNDS).max(clients);
    let (mut floor, mut infos, mut resizes, mut statuses) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        floor.extend(measure(&floor_socket, &info, per_round, clients).0);
        infos.extend(measure(&socket, &info, per_round, clients).0);
        let (latencies, seen) = measure(&socket, &resize, per_round, clients);
        resizes.extend(latencies);
        statuses.extend(seen);
    }
    stop.store(true, Ordering::Relaxed);
    let load_resizes = load.join().unwrap();
    kite.signal(libc::SIGTERM);
    let end = kite.wait_exit(DEADLINE);
    assert!(!end.console.contains("FAIL"), "{}", end.console);

    for v in [&mut floor, &mut infos, &mut resizes] {
        v.sort();
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let floor_p99 = percentile(&floor, 0.99);
    println!(
        "API latency, {} requests per kind, {clients} clients, new connection each, under hotplug load ({load_resizes} resizes by the load thread):",
        floor.len()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>14}",
        "", "p50 (us)", "p99 (us)", "p99 / floor"
    );
    for (name, v) in [
        ("floor (echo thread)", &floor),
        ("vm.info", &infos),
        ("vm.resize", &resizes),
    ] {
        let p99 = percentile(v, 0.99);
        println!(
            "{name:<28} {:>10.1} {:>10.1} {:>14.2}",
            us(percentile(v, 0.5)),
            us(p99),
            us(p99) / us(floor_p99)
        );
    }
    let accepted = statuses.iter().filter(|s| **s == 204).count();
    let busy = statuses.iter().filter(|s| **s == 409).count();
    println!(
        "vm.resize answers: {accepted} accepted (204), {busy} refused as a resize was in progress (409), {} other",
        statuses.len() - accepted - busy
    );
    for (name, v) in [("vm.info", &infos), ("vm.resize", &resizes)] {
        let p99 = percentile(v, 0.99);
        let ok = p99 <= Duration::from_millis(1) && us(p99) <= 5.0 * us(floor_p99);
        println!(
            "target {name}: p99 <= 1 ms and <= 5x floor: {}",
            if ok { "met" } else { "MISSED" }
        );
    }
}
