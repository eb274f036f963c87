//! The snapshot format: a directory holding `state.json` (everything but guest memory,
//! self-describing and versioned, with a checksum) and `memory` (guest memory, sparse,
//! its map in the state).
//!
//! `state.json` is `{"format": "kite-snapshot", "version": N, "crc32": C, "state": {...}}`,
//! where `C` is the CRC-32 of the `state` object's text exactly as written: a snapshot
//! from another format version is refused before its state is read, and a changed byte
//! of the state is found.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use devices::legacy::SerialSnapshot;
use devices::virtio::mem::MemState;
use devices::virtio::persist::TransportState;

use crate::config::VmConfig;
use crate::vstate::persist::{HostFingerprint, VcpuState, VmState};

/// What `format` says.
pub const FORMAT: &str = "kite-snapshot";
/// The format version this Kite writes. Version 2: the VM's PIT may be absent (`null`).
pub const VERSION: u32 = 2;
/// The oldest version this Kite reads (version 1: every VM had a PIT).
pub const OLDEST_VERSION: u32 = 1;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file read (a VM with 254 vCPUs and every device is well below).
pub const MAX_STATE_FILE: u64 = 64 << 20;

/// The state file's envelope.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<S> {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version.
    pub version: u32,
    /// CRC-32 of `state`'s text.
    pub crc32: u32,
    /// The state.
    pub state: S,
}

/// One range of guest memory in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

impl From<memory::SavedRange> for MemoryRange {
    fn from(r: memory::SavedRange) -> Self {
        MemoryRange {
            guest_addr: r.guest_addr,
            size: r.size,
            file_offset: r.file_offset,
        }
    }
}

impl From<MemoryRange> for memory::SavedRange {
    fn from(r: MemoryRange) -> Self {
        memory::SavedRange {
            guest_addr: r.guest_addr,
            size: r.size,
            file_offset: r.file_offset,
        }
    }
}

/// The memory file's map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryMap {
    /// The memory file's length.
    pub file_size: u64,
    /// Bytes of data in it (the rest is holes).
    pub data_bytes: u64,
    /// Every region of guest memory, boot RAM and plugged blocks, in address order.
    pub ranges: Vec<MemoryRange>,
}

/// A disk as the snapshot's VM had it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    /// Its size in bytes (a disk given at restore must have it).
    pub size: u64,
}

/// Everything of a paused VM but its memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// The Kite that wrote it (for the reader's information).
    pub kite_version: String,
    /// What the host offered: a snapshot is restored only where it can run.
    pub host: HostFingerprint,
    /// The configuration the VM ran with (kernel and command line for information).
    pub config: VmConfig,
    /// The VM: interrupt controllers, PIT, KVM clock.
    pub vm: VmState,
    /// Each vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// The serial port.
    pub serial: SerialSnapshot,
    /// The virtio devices, in the order of their slots (disks, rng, virtio-mem).
    pub virtio: Vec<TransportState>,
    /// The disks, in the guest's order.
    pub disks: Vec<DiskState>,
    /// The hotplug area, if the VM has one.
    pub hotplug: Option<MemState>,
    /// Guest memory: the memory file's map.
    pub memory: MemoryMap,
}

/// The state file's text for `snapshot`.
pub fn to_text(snapshot: &VmSnapshot) -> Result<String, serde_json::Error> {
    let state = serde_json::to_string(snapshot)?;
    let raw = RawValue::from_string(state)?;
    serde_json::to_string(&Envelope {
        format: FORMAT.into(),
        version: VERSION,
        crc32: crc32fast::hash(raw.get().as_bytes()),
        state: raw,
    })
}

/// What a state file of any format version starts with: read first, so that a snapshot
/// of another version is named as such, whatever else its envelope holds.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// Why a state file's text is not a snapshot this Kite can read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not JSON, or not the envelope.
    #[error("not a Kite snapshot state file: {0}")]
    NotASnapshot(serde_json::Error),
    /// The text ends in the middle of the JSON: the file was cut short.
    #[error("the state file is truncated: it ends before its JSON does ({0})")]
    Truncated(serde_json::Error),
    /// Another format.
    #[error("not a Kite snapshot: its format is {0:?}")]
    OtherFormat(String),
    /// Another version of the format.
    #[error(
        "snapshot format version {0}; this Kite ({kite}) reads versions {OLDEST_VERSION} to {VERSION}",
        kite = env!("CARGO_PKG_VERSION")
    )]
    OtherVersion(u32),
    /// The checksum does not match.
    #[error("the state is corrupt: its CRC-32 is {found:#010x}, the file says {expected:#010x}")]
    Corrupt {
        /// What the file says.
        expected: u32,
        /// What the state's text gives.
        found: u32,
    },
    /// The state does not parse.
    #[error("the state does not parse: {0}")]
    BadState(serde_json::Error),
}

/// Reads a state file's text: format and version (before anything else of the
/// envelope, which another version may lay out otherwise), envelope, checksum, then the
/// state.
pub fn from_text(text: &str) -> Result<VmSnapshot, FormatError> {
    let not_envelope = |e: serde_json::Error| {
        if e.is_eof() {
            FormatError::Truncated(e)
        } else {
            FormatError::NotASnapshot(e)
        }
    };
    let header: Header = serde_json::from_str(text).map_err(not_envelope)?;
    if header.format != FORMAT {
        return Err(FormatError::OtherFormat(header.format));
    }
    if !(OLDEST_VERSION..=VERSION).contains(&header.version) {
        return Err(FormatError::OtherVersion(header.version));
    }
    let envelope: Envelope<Box<RawValue>> = serde_json::from_str(text).map_err(not_envelope)?;
    let found = crc32fast::hash(envelope.state.get().as_bytes());
    if found != envelope.crc32 {
        return Err(FormatError::Corrupt {
            expected: envelope.crc32,
            found,
        });
    }
    serde_json::from_str(envelope.state.get()).map_err(FormatError::BadState)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> FormatError {
        from_text(text).expect_err("refused")
    }

    /// A version-1 snapshot (a test-guest VM with a PIT, the fuzz target's seed) is read,
    /// its PIT with it.
    #[test]
    fn version_1_snapshots_are_read() {
        let text = include_str!("../../../fuzz/seeds/snapshot_state/test-guest.json");
        assert!(text.contains(r#""version":1,"#));
        let snapshot = from_text(text).expect("a version-1 snapshot");
        assert!(snapshot.vm.pit.is_some(), "its PIT");
    }

    #[test]
    fn format_and_version_are_read_before_the_rest_of_the_envelope() {
        // Another version's envelope may hold other keys, and not a CRC-32.
        let other = r#"{"format":"kite-snapshot","version":3,"sha256":"00","parts":[]}"#;
        assert!(matches!(error(other), FormatError::OtherVersion(3)));
        let message = error(other).to_string();
        assert!(
            message.contains("version 3") && message.contains("versions 1 to 2"),
            "{message}"
        );
        let foreign = r#"{"format":"other-vmm","version":7,"blob":{}}"#;
        assert!(matches!(error(foreign), FormatError::OtherFormat(f) if f == "other-vmm"));
        assert!(matches!(
            error(r#"{"id":"vm0","snapshots":[]}"#),
            FormatError::NotASnapshot(_)
        ));
        assert!(matches!(error("\u{7f}ELF"), FormatError::NotASnapshot(_)));
    }

    #[test]
    fn a_state_file_cut_short_is_called_truncated() {
        let whole = r#"{"format":"kite-snapshot","version":1,"crc32":0,"state":{"a":[1,2]}}"#;
        for len in [0, 1, 20, whole.len() - 1] {
            assert!(
                matches!(error(&whole[..len]), FormatError::Truncated(_)),
                "{len}: {}",
                error(&whole[..len])
            );
        }
        // Whole, it is read as far as the checksum.
        assert!(matches!(error(whole), FormatError::Corrupt { .. }));
    }
}
