//! What devices report to the VMM (`vm.counters`): per device kind, counters the device
//! thread bumps as requests complete, read by the VMM at any time.
//!
//! A request is counted once, when it is added to the used ring
//! ([`QueueHandler::used`](super::worker::QueueHandler::used)): a run of it that was undone
//! (it met a writer of guest memory, or a device reset came) is never counted, so the
//! counters say what the driver was served. Counters only grow while the device lives (a
//! device reset does not clear them); relaxed atomics: each value is exact, a set of them
//! read together need not be one instant's.

use std::sync::atomic::{AtomicU64, Ordering};

/// Adds `n` to `counter`.
fn add(counter: &AtomicU64, n: u64) {
    // Release/Acquire: whoever sees an operation counted sees its bytes counted too
    // (bytes are added first).
    counter.fetch_add(n, Ordering::Release);
}

/// Reads `counter`.
fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Acquire)
}

/// How a virtio-blk request ended, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOutcome {
    /// A read of this many bytes (disk to guest), answered OK.
    Read(u64),
    /// A write of this many bytes (guest to disk), answered OK.
    Write(u64),
    /// A flush, answered OK.
    Flush,
    /// Any other request answered OK (get-id): in no counter.
    Other,
    /// A request that failed: answered `IOERR` or `UNSUPP`, or with no status the driver
    /// could be given (no status byte, or one that could not be written).
    Error,
}

/// A virtio-blk device's counters (Cloud Hypervisor's names, plus `flush_ops` and
/// `errors`).
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    flush_ops: AtomicU64,
    errors: AtomicU64,
}

impl BlockCounters {
    /// Counts a request used with `outcome`.
    pub fn record(&self, outcome: BlockOutcome) {
        match outcome {
            BlockOutcome::Read(bytes) => {
                add(&self.read_bytes, bytes);
                add(&self.read_ops, 1);
            }
            BlockOutcome::Write(bytes) => {
                add(&self.write_bytes, bytes);
                add(&self.write_ops, 1);
            }
            BlockOutcome::Flush => add(&self.flush_ops, 1),
            BlockOutcome::Other => {}
            BlockOutcome::Error => add(&self.errors, 1),
        }
    }

    /// Bytes read from the disk into guest memory.
    pub fn read_bytes(&self) -> u64 {
        get(&self.read_bytes)
    }

    /// Bytes written to the disk from guest memory.
    pub fn write_bytes(&self) -> u64 {
        get(&self.write_bytes)
    }

    /// Reads served.
    pub fn read_ops(&self) -> u64 {
        get(&self.read_ops)
    }

    /// Writes served.
    pub fn write_ops(&self) -> u64 {
        get(&self.write_ops)
    }

    /// Flushes served.
    pub fn flush_ops(&self) -> u64 {
        get(&self.flush_ops)
    }

    /// Requests that failed (see [`BlockOutcome::Error`]).
    pub fn errors(&self) -> u64 {
        get(&self.errors)
    }

    /// Every counter, by name.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("read_bytes", self.read_bytes()),
            ("write_bytes", self.write_bytes()),
            ("read_ops", self.read_ops()),
            ("write_ops", self.write_ops()),
            ("flush_ops", self.flush_ops()),
            ("errors", self.errors()),
        ]
    }
}

/// A virtio-rng device's counters.
#[derive(Debug, Default)]
pub struct RngCounters {
    read_bytes: AtomicU64,
    requests: AtomicU64,
}

impl RngCounters {
    /// Counts a request used with `bytes` of entropy handed to the guest.
    pub fn record(&self, bytes: u64) {
        add(&self.read_bytes, bytes);
        add(&self.requests, 1);
    }

    /// Bytes of entropy handed to the guest.
    pub fn read_bytes(&self) -> u64 {
        get(&self.read_bytes)
    }

    /// Requests served.
    pub fn requests(&self) -> u64 {
        get(&self.requests)
    }

    /// Every counter, by name.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("read_bytes", self.read_bytes()),
            ("requests", self.requests()),
        ]
    }
}
