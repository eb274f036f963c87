//! virtio-blk on a raw disk file: read, write, flush (fsync) and get-id; a read-only disk
//! refuses writes with `VIRTIO_BLK_S_IOERR`.

mod request;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::worker::DeviceThread;
use super::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use request::BlockHandler;

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
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<File>,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    name: String,
    thread: DeviceThread,
}

impl Block {
    /// Disk `name` (also its thread's name and, truncated, its id) on the raw file `path`.
    /// Its capacity is the file size in whole sectors.
    pub fn new(path: &Path, read_only: bool, name: &str) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let disk = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_error)?;
        let size = disk.metadata().map_err(open_error)?.len();
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            disk: Arc::new(disk),
            read_only,
            capacity_sectors: size / SECTOR_SIZE,
            id,
            name: name.to_string(),
            thread: DeviceThread::default(),
        })
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
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
        let handler = BlockHandler {
            disk: Arc::clone(&self.disk),
            read_only: self.read_only,
            capacity_bytes: self.capacity_sectors * SECTOR_SIZE,
            id: self.id,
            descriptors: Vec::new(),
        };
        self.thread
            .start(format!("kite_{}", self.name), activation, handler)
    }

    fn reset(&mut self) {
        self.thread.stop();
    }
}
