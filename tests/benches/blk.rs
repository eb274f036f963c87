//! virtio-blk throughput: the test guest reads and writes a 256 MiB image through Kite's
//! virtio-blk (64 KiB requests, then 4 KiB reads; 42 in flight), timed by the host between
//! the guest's console markers; the baseline is the same I/O done by the host directly on
//! the file (pwrite/pread, through the same page cache), in the same run. Each phase goes
//! over the image `KITE_BENCH_PASSES` times (default 4), so the markers' own cost is small.
//! Prints MiB/s, requests/s and ratios.
//!
//! `cargo build --release -p vmm && cargo bench -p kite-tests --bench blk`
//! (`KITE_BENCH_ROUNDS`, default 3).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kite_tests::stats::Samples;
use kite_tests::{kvm_available, Kite};

const GUEST: &str = env!("KITE_TEST_GUEST");
const IMAGE: u64 = 256 << 20;
const DEADLINE: Duration = Duration::from_secs(600);
/// Requests the test guest keeps in flight (`BATCH` in `tests/guest/guest.c`).
const IN_FLIGHT: usize = 42;

#[derive(Default, Clone, Copy)]
struct Round {
    write64k: f64,
    read64k: f64,
    read4k: f64,
}

fn kite_round(image: &Path, passes: u64) -> Round {
    let disk = format!("path={}", image.display());
    let cmdline = format!("kite.test=bench kite.passes={passes}");
    let kite = Kite::start(&[
        "run",
        "--kernel",
        GUEST,
        "--cmdline",
        &cmdline,
        "--disk",
        &disk,
    ]);
    let mut marks = Vec::new();
    for marker in [
        "write64k start",
        "write64k end",
        "read64k start",
        "read64k end",
        "read4k start",
        "read4k end",
    ] {
        kite.wait_for(&format!("kite-bench: {marker}"), DEADLINE);
        marks.push(Instant::now());
    }
    let end = kite.wait_exit(DEADLINE);
    assert_eq!(end.code, Some(0), "{}\n{}", end.console, end.stderr);
    let secs = |i: usize| (marks[i + 1] - marks[i]).as_secs_f64();
    Round {
        write64k: secs(0),
        read64k: secs(2),
        read4k: secs(4),
    }
}

/// The host doing the same I/O with `buffers` buffers in turn: 1 is the physical limit (a
/// buffer that stays in the cache), and the guest's writes also all come from one buffer;
/// `IN_FLIGHT` is the guest's read footprint (a buffer per request in flight).
fn direct_round(image: &Path, passes: u64, buffers: usize) -> Round {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut bufs = vec![vec![0x5au8; 64 << 10]; buffers];
    let mut turn = 0;
    let mut next = move || {
        turn = (turn + 1) % buffers;
        turn
    };
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    let write64k = time(&mut || {
        for off in (0..IMAGE * passes).step_by(64 << 10) {
            file.write_all_at(&bufs[next()], off % IMAGE).unwrap();
        }
    });
    let read64k = time(&mut || {
        for off in (0..IMAGE * passes).step_by(64 << 10) {
            file.read_exact_at(&mut bufs[next()], off % IMAGE).unwrap();
        }
    });
    let read4k = time(&mut || {
        for off in (0..IMAGE * passes).step_by(4 << 10) {
            file.read_exact_at(&mut bufs[next()][..4 << 10], off % IMAGE)
                .unwrap();
        }
    });
    Round {
        write64k,
        read64k,
        read4k,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !kvm_available() {
        return;
    }
    let rounds: usize = std::env::var("KITE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let passes: u64 = std::env::var("KITE_BENCH_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        .max(1);
    let dir =
        tempfile::tempdir_in(std::env::var_os("CARGO_TARGET_TMPDIR").unwrap_or_else(|| ".".into()))
            .unwrap();
    let image = dir.path().join("bench.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE)
        .unwrap();
    let (mut kite, mut direct, mut spread) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so the machine's drift hits both.
        let (k, d, s) = if round % 2 == 0 {
            let k = kite_round(&image, passes);
            let d = direct_round(&image, passes, 1);
            (k, d, direct_round(&image, passes, IN_FLIGHT))
        } else {
            let d = direct_round(&image, passes, 1);
            let s = direct_round(&image, passes, IN_FLIGHT);
            (kite_round(&image, passes), d, s)
        };
        println!(
            "round {round}: kite write64k {:.3} s read64k {:.3} s read4k {:.3} s | direct {:.3} {:.3} {:.3} | direct, {IN_FLIGHT} buffers {:.3} {:.3} {:.3}",
            k.write64k, k.read64k, k.read4k, d.write64k, d.read64k, d.read4k, s.write64k, s.read64k, s.read4k
        );
        kite.push(k);
        direct.push(d);
        spread.push(s);
    }
    let mib = ((passes * IMAGE) >> 20) as f64;
    let requests4k = (passes * IMAGE / 4096) as f64;
    let med = |v: &[Round], f: fn(&Round) -> f64| Samples(v.iter().map(f).collect()).median();
    println!(
        "\n{:<26}{:>10}{:>10}{:>13}{:>16}{:>13}",
        "median of rounds", "kite", "direct", "kite/direct", "direct,42 bufs", "kite/that"
    );
    for (name, f, per) in [
        (
            "write 64 KiB (MiB/s)",
            (|r: &Round| r.write64k) as fn(&Round) -> f64,
            mib,
        ),
        ("read 64 KiB (MiB/s)", |r: &Round| r.read64k, mib),
        ("read 4 KiB (requests/s)", |r: &Round| r.read4k, requests4k),
    ] {
        let (k, d, s) = (
            per / med(&kite, f),
            per / med(&direct, f),
            per / med(&spread, f),
        );
        println!(
            "{name:<26}{k:>10.0}{d:>10.0}{:>13.2}{s:>16.0}{:>13.2}",
            k / d,
            k / s
        );
    }
    println!(
        "target: kite/direct >= 0.8 for 64 KiB and 4 KiB requests (direct: one buffer, the \
         physical limit); run it on an idle machine (with the vCPU and device threads on one \
         CPU the ratios fall to ~0.3)"
    );
}
