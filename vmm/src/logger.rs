//! The VMM's log: to stderr, or to `--log-file`; `-v` raises the level.

use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
    sink: Mutex<Box<dyn Write + Send>>,
}

/// Crates whose messages are all about guest-controlled data (rings and descriptors a
/// driver wrote): logged at debug level whatever level they were sent at, so a guest
/// cannot fill the log through them. (Kite's own guest-caused warnings are rate-limited
/// where they are made: `devices::guest_log`.)
const GUEST_DATA_TARGETS: &[&str] = &["virtio_queue"];

/// The level a record is logged at.
fn effective_level(metadata: &Metadata<'_>) -> log::Level {
    let target = metadata.target();
    let guest_data = GUEST_DATA_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    if guest_data {
        metadata.level().max(log::Level::Debug)
    } else {
        metadata.level()
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        effective_level(metadata) <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        // A log that cannot be written has nowhere to report that.
        let _ = writeln!(
            sink,
            "kite {:>5} [{}] {}",
            record.level(),
            std::thread::current().name().unwrap_or("?"),
            record.args()
        );
    }

    fn flush(&self) {
        let _ = self.sink.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
}

/// Opens the log file for appending, refusing a symbolic link.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::other(format!(
                    "{} is a symbolic link; give the file itself",
                    path.display()
                ))
            } else {
                e
            }
        })
}

static PROCESS_START: OnceLock<(Instant, u64)> = OnceLock::new();

/// `CLOCK_MONOTONIC` in nanoseconds: a clock another process (a benchmark that started
/// Kite) can compare with its own.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, ours.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Notes when the process started (`kite`'s `main` calls it first thing), for
/// [`since_start`].
pub fn mark_process_start() {
    PROCESS_START.get_or_init(|| (Instant::now(), monotonic_ns()));
}

/// How long ago [`mark_process_start`] was called (zero if never), and the monotonic
/// clock then.
pub fn since_start() -> (Duration, u64) {
    PROCESS_START
        .get()
        .map_or((Duration::ZERO, 0), |(at, ns)| (at.elapsed(), *ns))
}

/// The level for `-v` given `verbosity` times: warnings, then info, debug, trace.
pub fn level(verbosity: u8) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs the logger. `file` is appended to, created if missing; a symbolic link there
/// is refused, so that Kite (often root) is never led into writing some other file.
pub fn init(verbosity: u8, file: Option<&Path>) -> std::io::Result<()> {
    let sink: Box<dyn Write + Send> = match file {
        Some(path) => Box::new(open_log(path)?),
        None => Box::new(std::io::stderr()),
    };
    let level = level(verbosity);
    log::set_boxed_logger(Box::new(Logger {
        level,
        sink: Mutex::new(sink),
    }))
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::tests::Sink;

    fn logged(level: LevelFilter, target: &str, at: log::Level) -> bool {
        let sink = Sink::default();
        let logger = Logger {
            level,
            sink: Mutex::new(Box::new(sink.clone())),
        };
        logger.log(
            &Record::builder()
                .target(target)
                .level(at)
                .args(format_args!("message"))
                .build(),
        );
        let written = !sink.0.lock().unwrap().is_empty();
        written
    }

    #[test]
    fn guest_data_errors_of_virtio_queue_are_debug_messages() {
        assert!(!logged(
            LevelFilter::Warn,
            "virtio_queue::queue",
            log::Level::Error
        ));
        assert!(!logged(LevelFilter::Info, "virtio_queue", log::Level::Warn));
        assert!(logged(
            LevelFilter::Debug,
            "virtio_queue::queue",
            log::Level::Error
        ));
        assert!(logged(
            LevelFilter::Warn,
            "devices::virtio",
            log::Level::Warn
        ));
        assert!(logged(
            LevelFilter::Warn,
            "virtio_queued",
            log::Level::Error
        ));
    }
}
