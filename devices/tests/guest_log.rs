//! A driver that repeats a mistake on every register write does not flood the host's log.
//! (A binary of its own: it installs the process's logger.)

use std::sync::atomic::{AtomicUsize, Ordering};

use devices::virtio::device_thread::ThreadContext;
use devices::virtio::rng::Rng;
use log::{Level, LevelFilter, Log, Metadata, Record};

mod common;

/// Counts warnings.
struct Counter(AtomicUsize);

impl Log for Counter {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn
    }
    fn log(&self, record: &Record<'_>) {
        if record.level() == Level::Warn {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn flush(&self) {}
}

static WARNINGS: Counter = Counter(AtomicUsize::new(0));

#[test]
fn refused_features_written_ten_thousand_times_log_a_few_lines() {
    log::set_logger(&WARNINGS).unwrap();
    log::set_max_level(LevelFilter::Warn);
    let mut r = common::rig(
        Box::new(Rng::new(&ThreadContext::default()).unwrap()),
        1 << 20,
    );
    r.write(0x70, 0);
    r.write(0x70, 3);
    // No VERSION_1: every FEATURES_OK is refused.
    for sel in 0..2 {
        r.write(0x24, sel);
        r.write(0x20, 0);
    }
    for _ in 0..10_000 {
        r.write(0x70, 3 | 8);
        assert_eq!(r.read(0x70) & 8, 0);
    }
    let warnings = WARNINGS.0.load(Ordering::SeqCst);
    assert!(
        (1..=5).contains(&warnings),
        "{warnings} warnings for 10000 refusals"
    );
}
