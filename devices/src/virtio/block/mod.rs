//! virtio-blk on a raw disk file: read, write, flush (fsync) and get-id; a read-only disk
//! refuses writes with `VIRTIO_BLK_S_IOERR`.

mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

pub use super::counters::{BlockCounters, BlockOutcome};
use super::device_thread::{DeviceThread, ThreadContext};
use super::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
pub use request::BlockHandler;

/// Bytes per sector, the unit of virtio-blk addresses.
pub const SECTOR_SIZE: u64 = 512;
/// Entries of the request queue.
const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_blk_config` a driver may read.
const CONFIG_SPACE: usize = 60;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk file cannot be opened.
    #[error("disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another process (another VM) holds the disk.
    #[error("disk {path} is in use by another process (it holds a lock on it): {source}")]
    Locked {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The device thread could not be started.
    #[error("disk device thread: {0}")]
    Thread(ActivateError),
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    read_only: bool,
    capacity_sectors: u64,
    name: String,
    counters: Arc<BlockCounters>,
    thread: DeviceThread,
}

/// Takes an open-file-description lock on all of `disk`: shared for reading, exclusive
/// for writing; fails at once if another holds a conflicting one.
fn lock(disk: &File, read_only: bool) -> std::io::Result<()> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    // SAFETY: flock is plain data; all-zero is a valid value, the fields set follow.
    let mut flock: libc::flock = unsafe { std::mem::zeroed() };
    flock.l_type = kind as libc::c_short;
    flock.l_whence = libc::SEEK_SET as libc::c_short;
    flock.l_start = 0;
    flock.l_len = 0; // to the end, however the file grows
                     // SAFETY: fcntl on a file descriptor we own, with a pointer to a valid flock.
    if unsafe { libc::fcntl(disk.as_raw_fd(), libc::F_OFD_SETLK, &flock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Block {
    /// Disk `name` (also its thread's name, `kite_NAME`, and, truncated, its id) on the
    /// raw file or block device `path`. Its capacity is the file's or device's size in
    /// whole sectors. The disk is locked for this process (an OFD lock: shared when
    /// read-only, exclusive otherwise), so two VMs cannot write one image: a disk another
    /// holds is refused.
    pub fn new(
        path: &Path,
        read_only: bool,
        name: &str,
        context: &ThreadContext,
    ) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Without waiting: a FIFO must not hang the VMM (it is refused just below).
        let mut disk = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(open_error)?;
        let kind = disk.metadata().map_err(open_error)?.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(open_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            )));
        }
        lock(&disk, read_only).map_err(|source| BlockError::Locked {
            path: path.to_path_buf(),
            source,
        })?;
        // The end of a block device is its size; its metadata says 0.
        let size = disk.seek(SeekFrom::End(0)).map_err(open_error)?;
        let disk = Arc::new(disk);
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let capacity_sectors = size / SECTOR_SIZE;
        let handler = BlockHandler::new(
            Arc::clone(&disk),
            read_only,
            capacity_sectors * SECTOR_SIZE,
            id,
        );
        let counters = handler.counters();
        let thread =
            DeviceThread::spawn(&format!("kite_{name}"), VIRTIO_ID_BLOCK, handler, context)
                .map_err(BlockError::Thread)?;
        Ok(Block {
            read_only,
            capacity_sectors,
            name: name.to_string(),
            counters,
            thread,
        })
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Its counters, which the device thread updates as requests are used (a handle to
    /// keep once the device is boxed and handed to its transport).
    pub fn counters(&self) -> Arc<BlockCounters> {
        Arc::clone(&self.counters)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> String {
        format!("virtio-blk {}", self.name)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let read_only = if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << VIRTIO_BLK_F_FLUSH) | read_only
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SPACE];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.thread.activate(activation)
    }

    fn reset(&mut self) {
        self.thread.stop();
    }

    fn thread(&self) -> Option<&DeviceThread> {
        Some(&self.thread)
    }

    fn thread_mut(&mut self) -> Option<&mut DeviceThread> {
        Some(&mut self.thread)
    }
}
