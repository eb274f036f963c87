//! Snapshots of a VM, and restoring them: the snapshot directory (written whole or not at
//! all), reading one back with every check a restore needs before anything is built, and
//! how restored memory is backed.
//!
//! A snapshot is taken of a paused VM ([`crate::machine::Machine::snapshot`]); a restore
//! builds a new machine from it ([`crate::builder::build`] with [`Origin::Restore`]).
//!
//! [`Origin::Restore`]: crate::builder::Origin::Restore

pub mod format;

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memory::{Backing, LazySource};

pub use format::{DiskState, MemoryMap, MemoryRange, VmSnapshot};
use format::{FormatError, MAX_STATE_FILE, MEMORY_FILE, STATE_FILE};

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot directory to write exists already.
    #[error("snapshot directory {0}: it exists already (a snapshot is never written over)")]
    Exists(PathBuf),
    /// A file of the snapshot could not be read or written.
    #[error("snapshot {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The state file is not a snapshot this Kite can read.
    #[error("snapshot {}: {source}", path.display())]
    Format {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: FormatError,
    },
    /// Guest memory could not be saved or restored (a memory file shorter than its map).
    #[error("snapshot memory: {0}")]
    Memory(#[from] memory::PersistError),
    /// The snapshot's parts do not fit together (a hand-edited or foreign state).
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
    /// This host cannot run what the snapshot's host ran.
    #[error("this host cannot restore the snapshot: {}", .0.join("; "))]
    Host(Vec<String>),
    /// The disks given at restore are not the snapshot's.
    #[error("disks: {0}")]
    Disks(String),
    /// The VM is not in a state to snapshot.
    #[error("cannot snapshot: {0}")]
    NotReady(String),
    /// Saving or restoring a vCPU's, the VM's or a device's state failed.
    #[error("{what}: {why}")]
    State {
        /// Whose state.
        what: &'static str,
        /// Why.
        why: String,
    },
}

impl SnapshotError {
    /// Whether the snapshot (or a disk given with it) is at fault, not the VMM or the
    /// host: `kite run --restore` exits 3 then.
    pub fn is_bad_input(&self) -> bool {
        match self {
            SnapshotError::Exists(_)
            | SnapshotError::Format { .. }
            | SnapshotError::Inconsistent(_)
            | SnapshotError::Host(_)
            | SnapshotError::Disks(_) => true,
            SnapshotError::Memory(memory::PersistError::Short { .. }) => true,
            // Reading the snapshot (taking one reports its errors through the API).
            SnapshotError::Io { .. } => true,
            _ => false,
        }
    }

    /// Whether the request was wrong for the VM's state (a snapshot during a resize).
    pub fn is_not_ready(&self) -> bool {
        matches!(self, SnapshotError::NotReady(_))
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `path` is a directory: an error naming it if not.
fn check_dir(path: &Path) -> Result<(), SnapshotError> {
    let meta = std::fs::metadata(path).map_err(io_error(path))?;
    if !meta.is_dir() {
        return Err(io_error(path)(std::io::Error::from_raw_os_error(
            libc::ENOTDIR,
        )));
    }
    Ok(())
}

/// Opens `path` for reading if it is a regular file. Never blocks: a FIFO's open would
/// wait for a writer for ever (it is opened non-blocking, then refused), as a device's
/// read might. (`O_NONBLOCK` changes nothing for a regular file.)
fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_error(path))?;
    let meta = file.metadata().map_err(io_error(path))?;
    if !meta.is_file() {
        return Err(io_error(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(file)
}

/// How a restored VM's memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryRestore {
    /// Pages are filled from the memory file on first touch, by Kite's fault handler
    /// (userfaultfd): the VM runs at once, and only what it touches is read.
    #[default]
    Lazy,
    /// A private mapping of the memory file: the host kernel reads pages on first touch
    /// (no fault-handler thread), through its page cache, which clones of one snapshot
    /// share; the guest's writes stay its own.
    Private,
    /// Everything is read before the VM runs.
    Eager,
}

impl MemoryRestore {
    /// Its name, as `--restore memory=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            MemoryRestore::Lazy => "lazy",
            MemoryRestore::Private => "private",
            MemoryRestore::Eager => "eager",
        }
    }
}

impl std::str::FromStr for MemoryRestore {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lazy" => Ok(MemoryRestore::Lazy),
            "private" => Ok(MemoryRestore::Private),
            "eager" => Ok(MemoryRestore::Eager),
            other => Err(format!(
                "'{other}' is not a memory restore mode (lazy, private, eager)"
            )),
        }
    }
}

/// A snapshot read back and checked, ready to build a machine from.
pub struct Restore {
    /// The state.
    pub snapshot: VmSnapshot,
    /// The memory file (never written: clones share it).
    pub memory: Arc<File>,
    /// How memory comes back.
    pub mode: MemoryRestore,
    /// The snapshot directory, for messages.
    pub dir: PathBuf,
}

impl Restore {
    /// Reads the snapshot in `dir`: the state file (format, version, checksum), the
    /// memory file (opened read-only, as long as its map), and the state's consistency
    /// with itself. Nothing is built.
    pub fn open(dir: &Path, mode: MemoryRestore) -> Result<Restore, SnapshotError> {
        check_dir(dir)?;
        let state_path = dir.join(STATE_FILE);
        let file = open_regular(&state_path)?;
        let mut text = String::new();
        file.take(MAX_STATE_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io_error(&state_path))?;
        let format_error = |source| SnapshotError::Format {
            path: state_path.clone(),
            source,
        };
        if text.len() as u64 > MAX_STATE_FILE {
            return Err(SnapshotError::Inconsistent(format!(
                "{} is over {MAX_STATE_FILE} bytes",
                state_path.display()
            )));
        }
        let snapshot = format::from_text(&text).map_err(format_error)?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = open_regular(&memory_path)?;
        let restore = Restore {
            snapshot,
            memory: Arc::new(memory),
            mode,
            dir: dir.to_path_buf(),
        };
        restore.check()?;
        memory::persist::check_file(&restore.memory, &restore.ranges())?;
        let len = restore
            .memory
            .metadata()
            .map_err(io_error(&memory_path))?
            .len();
        if len != restore.snapshot.memory.file_size {
            return Err(SnapshotError::Inconsistent(format!(
                "{} holds {len} bytes; the snapshot wrote {}",
                memory_path.display(),
                restore.snapshot.memory.file_size
            )));
        }
        Ok(restore)
    }

    /// The parts of the state agree with each other.
    fn check(&self) -> Result<(), SnapshotError> {
        check_state(&self.snapshot)
    }

    /// How the guest memory at `guest_addr`, `size` bytes, comes back: one range of the
    /// memory file.
    pub fn backing(&self, guest_addr: u64, size: u64) -> Result<Backing, SnapshotError> {
        let range = self
            .snapshot
            .memory
            .ranges
            .iter()
            .find(|r| r.guest_addr == guest_addr && r.size == size)
            .ok_or_else(|| {
                SnapshotError::Inconsistent(format!(
                    "no memory saved for {size:#x} bytes at {guest_addr:#x}"
                ))
            })?;
        Ok(match self.mode {
            MemoryRestore::Lazy => Backing::Lazy(LazySource::File {
                file: Arc::clone(&self.memory),
                offset: range.file_offset,
            }),
            MemoryRestore::Private => Backing::File {
                file: Arc::clone(&self.memory),
                offset: range.file_offset,
            },
            MemoryRestore::Eager => Backing::Anonymous,
        })
    }

    /// The memory map, as the memory crate takes it.
    pub fn ranges(&self) -> Vec<memory::SavedRange> {
        self.snapshot
            .memory
            .ranges
            .iter()
            .map(|&r| r.into())
            .collect()
    }
}

/// Whether the parts of snapshot `s` agree with each other (vCPU states and vCPUs,
/// devices and the configuration, the memory map): what a restore checks before it
/// builds anything.
pub fn check_state(s: &VmSnapshot) -> Result<(), SnapshotError> {
    let bad = |why: String| Err(SnapshotError::Inconsistent(why));
    if s.vcpus.len() != s.config.cpus.boot as usize {
        return bad(format!(
            "{} vCPU states for {} vCPUs",
            s.vcpus.len(),
            s.config.cpus.boot
        ));
    }
    if s.disks.len() != s.config.disks.len() {
        return bad(format!(
            "{} disk sizes for {} disks",
            s.disks.len(),
            s.config.disks.len()
        ));
    }
    let hotplug = s
        .config
        .memory
        .hotplug_size
        .is_some_and(|size| size.bytes() > 0);
    let devices = s.config.disks.len() + usize::from(s.config.rng) + usize::from(hotplug);
    if s.virtio.len() != devices || s.hotplug.is_some() != hotplug {
        return bad(format!(
            "{} virtio device states for {devices} devices",
            s.virtio.len()
        ));
    }
    let mut end = 0;
    let mut addr = 0;
    for r in &s.memory.ranges {
        let (Some(file_end), Some(guest_end)) = (
            r.file_offset.checked_add(r.size),
            r.guest_addr.checked_add(r.size),
        ) else {
            return bad(format!("memory range {r:?} reaches past 2^64"));
        };
        if r.file_offset < end || r.guest_addr < addr || r.size == 0 {
            return bad(format!("memory range {r:?} overlaps another"));
        }
        end = file_end;
        addr = guest_end;
    }
    if end > s.memory.file_size {
        return bad(format!(
            "the memory map reaches {end} bytes, the file is {}",
            s.memory.file_size
        ));
    }
    Ok(())
}

/// The size of the disk at `path` (a file's length, a block device's size).
pub fn disk_size(path: &Path) -> Result<u64, SnapshotError> {
    use std::io::Seek;
    let mut file = File::open(path).map_err(io_error(path))?;
    file.seek(std::io::SeekFrom::End(0)).map_err(io_error(path))
}

/// Writes a snapshot into `dir`, which must not exist: `write` gets the (empty) memory
/// file to fill and returns the state. Written into a directory of its own beside `dir`
/// and renamed to `dir` once complete and synced: `dir` holds a whole snapshot or
/// nothing, whatever fails.
pub fn write_dir(
    dir: &Path,
    write: impl FnOnce(&File) -> Result<VmSnapshot, SnapshotError>,
) -> Result<VmSnapshot, SnapshotError> {
    if dir.symlink_metadata().is_ok() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| SnapshotError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no directory name"),
        })?
        .to_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Named as the user gave it, not as the partial directory inside it.
    check_dir(&parent)?;
    // Unique to this attempt: one a killed Kite left behind (same pid in a container)
    // does not stand in the way.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(&name);
    partial_name.push(format!(".partial-{}-{stamp:x}", std::process::id()));
    let partial = parent.join(partial_name);
    // Guest memory is the guest's: only Kite's user may read it.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&partial)
        .map_err(io_error(&partial))?;
    let written = fill_dir(&partial, write).and_then(|snapshot| {
        // Its entries are durable before it gets its name.
        File::open(&partial)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&partial))?;
        rename_no_replace(&partial, dir)?;
        // The rename itself is durable once the parent directory is synced.
        File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&parent))?;
        Ok(snapshot)
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written
}

fn fill_dir(
    partial: &Path,
    write: impl FnOnce(&File) -> Result<VmSnapshot, SnapshotError>,
) -> Result<VmSnapshot, SnapshotError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let memory_path = partial.join(MEMORY_FILE);
    let memory = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&memory_path)
        .map_err(io_error(&memory_path))?;
    let snapshot = write(&memory)?;
    memory.sync_all().map_err(io_error(&memory_path))?;
    let state_path = partial.join(STATE_FILE);
    let text = format::to_text(&snapshot).map_err(|e| SnapshotError::State {
        what: "the state file",
        why: e.to_string(),
    })?;
    let mut state = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&state_path)
        .map_err(io_error(&state_path))?;
    state
        .write_all(text.as_bytes())
        .and_then(|()| state.sync_all())
        .map_err(io_error(&state_path))?;
    Ok(snapshot)
}

/// Renames `from` to `to`, failing if `to` exists (even as an empty directory, which a
/// plain rename would replace).
fn rename_no_replace(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(from_c), Ok(to_c)) = (c(from), c(to)) else {
        return Err(SnapshotError::Io {
            path: to.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"),
        });
    };
    // SAFETY: renameat2 with two NUL-terminated paths relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(SnapshotError::Exists(to.to_path_buf()));
        }
        return Err(io_error(to)(e));
    }
    Ok(())
}
