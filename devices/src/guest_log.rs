//! Warnings about what a guest did, bounded: a guest that repeats a mistake on every MMIO
//! exit (millions of times a minute) must not fill the host's log.
//!
//! Each cause is logged in full the first time, then only as a count when it reaches 10,
//! 100, 1000, ... occurrences, and once more (the final count) when the log is dropped:
//! O(log n) lines for n occurrences.
//!
//! ```
//! use devices::guest_log::GuestLog;
//! let log = GuestLog::new("virtio-blk vda");
//! let logged = (0..1_000_000)
//!     .filter(|_| log.warn("bad features", || "features 0x4 not offered".into()))
//!     .count();
//! assert_eq!(logged, 7); // the first, then at 10, 100, ..., 1000000
//! assert_eq!(log.count("bad features"), 1_000_000);
//! ```

use std::sync::Mutex;

/// One cause's occurrences.
#[derive(Debug)]
struct Cause {
    name: &'static str,
    count: u64,
    /// The count last logged.
    reported: u64,
}

/// Rate-limited warnings of one device (or one guest-facing component).
#[derive(Debug)]
pub struct GuestLog {
    who: String,
    causes: Mutex<Vec<Cause>>,
}

impl GuestLog {
    /// Warnings about `who` (e.g. `"virtio-blk vda"`), which prefixes every line.
    pub fn new(who: impl Into<String>) -> Self {
        GuestLog {
            who: who.into(),
            causes: Mutex::new(Vec::new()),
        }
    }

    /// Who the warnings are about.
    pub fn who(&self) -> &str {
        &self.who
    }

    /// Records one occurrence of `cause`; logs `message()` the first time and the count at
    /// each power of ten after. Returns whether a line was logged.
    pub fn warn(&self, cause: &'static str, message: impl FnOnce() -> String) -> bool {
        let mut causes = self.causes.lock().unwrap_or_else(|e| e.into_inner());
        let at = match causes.iter().position(|c| c.name == cause) {
            Some(at) => at,
            None => {
                causes.push(Cause {
                    name: cause,
                    count: 0,
                    reported: 0,
                });
                causes.len() - 1
            }
        };
        let c = &mut causes[at];
        c.count += 1;
        if c.count == 1 {
            c.reported = 1;
            log::warn!(
                "{}: {} (further occurrences are counted)",
                self.who,
                message()
            );
            return true;
        }
        if is_power_of_ten(c.count) {
            c.reported = c.count;
            log::warn!("{}: {cause}: {} times so far", self.who, c.count);
            return true;
        }
        false
    }

    /// Occurrences of `cause` so far.
    pub fn count(&self, cause: &str) -> u64 {
        let causes = self.causes.lock().unwrap_or_else(|e| e.into_inner());
        causes
            .iter()
            .find(|c| c.name == cause)
            .map_or(0, |c| c.count)
    }
}

impl Drop for GuestLog {
    fn drop(&mut self) {
        let causes = self.causes.get_mut().unwrap_or_else(|e| e.into_inner());
        for c in causes.iter().filter(|c| c.count > c.reported) {
            log::warn!("{}: {}: {} times in all", self.who, c.name, c.count);
        }
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_logged_once_then_at_powers_of_ten() {
        let log = GuestLog::new("test");
        let mut lines = Vec::new();
        for i in 1..=1000u64 {
            if log.warn("a", || "first a".into()) {
                lines.push(i);
            }
        }
        assert_eq!(lines, [1, 10, 100, 1000]);
        assert!(log.warn("b", || "first b".into()), "another cause logs");
        assert!(!log.warn("b", || unreachable!("only the first builds its message")));
        assert_eq!(log.count("a"), 1000);
        assert_eq!(log.count("b"), 2);
        assert_eq!(log.count("c"), 0);
    }
}
