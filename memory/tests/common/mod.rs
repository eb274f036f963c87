//! Test support: a deadlock watchdog.
//!
//! Each worker thread ticks a progress counter. A monitor thread checks the counters;
//! if a worker that has not finished makes no progress for the stall deadline, the
//! watchdog records a report naming the stalled workers and every thread's held
//! region-table locks, prints it, and calls the test's `on_stall` hook (which may break
//! the stall so the test can end cleanly).

#![allow(dead_code)]

pub mod host;
pub mod lazy;
pub mod slots;
pub mod tables;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One worker's progress counter.
#[derive(Clone)]
pub struct Progress {
    count: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
}

impl Progress {
    /// The worker made progress.
    pub fn tick(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    /// The worker is done; it is no longer watched.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }
    /// Progress so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// What the watchdog saw when a stall was detected.
#[derive(Clone, Debug)]
pub struct StallReport {
    pub stalled: Vec<String>,
    pub held_locks: Vec<(String, Vec<memory::lockdep::HeldLock>)>,
}

impl std::fmt::Display for StallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "watchdog: no progress from {:?}", self.stalled)?;
        if self.held_locks.is_empty() {
            writeln!(f, "  no thread holds a region-table lock")?;
        }
        for (thread, held) in &self.held_locks {
            let names: Vec<String> = held.iter().map(ToString::to_string).collect();
            writeln!(f, "  {thread} holds [{}]", names.join(", "))?;
        }
        Ok(())
    }
}

struct Worker {
    name: String,
    progress: Progress,
}

/// Watches workers for stalls.
pub struct Watchdog {
    workers: Arc<Mutex<Vec<Worker>>>,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Option<StallReport>>>,
    monitor: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching with `stall` as the no-progress deadline. `on_stall` runs once,
    /// on the monitor thread, when a stall is detected.
    pub fn start(stall: Duration, on_stall: impl FnOnce(&StallReport) + Send + 'static) -> Self {
        let workers: Arc<Mutex<Vec<Worker>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let report: Arc<Mutex<Option<StallReport>>> = Arc::default();
        let (w, s, r) = (workers.clone(), stop.clone(), report.clone());
        let monitor = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut last: Vec<(u64, Instant)> = Vec::new();
                let mut on_stall = Some(on_stall);
                while !s.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_millis(20));
                    let now = Instant::now();
                    let workers = w.lock().unwrap();
                    last.resize(workers.len(), (u64::MAX, now));
                    let mut stalled = Vec::new();
                    for (i, worker) in workers.iter().enumerate() {
                        let count = worker.progress.count();
                        if worker.progress.finished.load(Ordering::Relaxed) || count != last[i].0 {
                            last[i] = (count, now);
                        } else if now - last[i].1 > stall {
                            stalled.push(worker.name.clone());
                        }
                    }
                    drop(workers);
                    if !stalled.is_empty() {
                        let rep = StallReport {
                            stalled,
                            held_locks: memory::lockdep::held_by_all_threads(),
                        };
                        eprintln!("{rep}");
                        *r.lock().unwrap() = Some(rep.clone());
                        if let Some(f) = on_stall.take() {
                            f(&rep);
                        }
                        return;
                    }
                }
            })
            .unwrap();
        Watchdog {
            workers,
            stop,
            report,
            monitor: Some(monitor),
        }
    }

    /// Registers a worker to watch.
    pub fn worker(&self, name: &str) -> Progress {
        let progress = Progress {
            count: Arc::default(),
            finished: Arc::default(),
        };
        self.workers.lock().unwrap().push(Worker {
            name: name.to_owned(),
            progress: progress.clone(),
        });
        progress
    }

    /// Whether a stall has been reported.
    pub fn fired(&self) -> bool {
        self.report.lock().unwrap().is_some()
    }

    /// Stops watching and returns the stall report, if any.
    pub fn finish(mut self) -> Option<StallReport> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(m) = self.monitor.take() {
            m.thread().unpark();
            m.join().unwrap();
        }
        self.report.lock().unwrap().take()
    }
}

/// Waits until `cond` holds, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}
