//! A memory-slot recorder for table tests.

use std::sync::Mutex;

use memory::{MemorySlots, SlotError, SlotMapping};

/// Records slot calls, and fails them on request.
#[derive(Default)]
pub struct RecordingSlots {
    calls: Mutex<Vec<(&'static str, SlotMapping)>>,
    /// Set to make every later call fail.
    pub fail: Mutex<bool>,
}

impl RecordingSlots {
    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<(&'static str, SlotMapping)> {
        self.calls.lock().unwrap().clone()
    }
    fn result(&self, slot: u32) -> Result<(), SlotError> {
        if *self.fail.lock().unwrap() {
            Err(SlotError::Update {
                slot,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            })
        } else {
            Ok(())
        }
    }
}

impl MemorySlots for RecordingSlots {
    fn map(&self, m: &SlotMapping) -> Result<(), SlotError> {
        self.calls.lock().unwrap().push(("map", *m));
        self.result(m.slot)
    }
    fn unmap(&self, m: &SlotMapping) -> Result<(), SlotError> {
        self.calls.lock().unwrap().push(("unmap", *m));
        self.result(m.slot)
    }
}
