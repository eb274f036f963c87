//! Serving virtio-blk requests. A request is a descriptor chain (walked by virtio-queue):
//! a device-readable header of 16 bytes first, data descriptors, and a device-writable
//! status last (its last byte is the status), as Linux and other drivers lay it out. Data
//! moves between the disk file and guest memory directly (one copy, by the kernel), through
//! guest memory's vm-memory interface over the region guards.
//!
//! Every check a hostile driver could fail ends in an error status, or, with no status byte
//! to write (a chain cut short by a loop, a bad next index, or no writable last descriptor),
//! a used entry of length 0; never a panic. Per-request failures are logged at debug level
//! only, so a guest cannot flood the log.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use memory::GuardedMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::SECTOR_SIZE;
use crate::virtio::counters::{BlockCounters, BlockOutcome};
use crate::virtio::worker::QueueHandler;

/// Bytes of a request header.
const HEADER: u32 = 16;

/// The request processing of one disk: a [`QueueHandler`] for its request queue (what
/// the device thread runs; public for fuzzing and tools that serve a queue themselves).
pub struct BlockHandler {
    disk: Arc<File>,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Scratch space for a request's descriptors.
    descriptors: Vec<Descriptor>,
    counters: Arc<BlockCounters>,
    /// How the request last served ended: counted once it is used.
    outcome: Option<BlockOutcome>,
}

/// Why a request failed (logged; the driver sees the status).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("no readable header of {HEADER} bytes first")]
    Header,
    #[error("data descriptors in the wrong direction")]
    Direction,
    #[error("request of {len} bytes at sector {sector} is beyond the disk's {capacity} bytes")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("disk I/O: {0}")]
    Io(std::io::Error),
    #[error("guest buffer: {0}")]
    Guest(vm_memory::GuestMemoryError),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

impl BlockHandler {
    /// Requests on `disk` of `capacity_bytes` (whole sectors), refusing writes if
    /// `read_only`; `id` answers `GET_ID`.
    pub fn new(
        disk: Arc<File>,
        read_only: bool,
        capacity_bytes: u64,
        id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    ) -> Self {
        BlockHandler {
            disk,
            read_only,
            capacity_bytes,
            id,
            descriptors: Vec::new(),
            counters: Arc::default(),
            outcome: None,
        }
    }

    /// Its counters (shared: they go on counting).
    pub fn counters(&self) -> Arc<BlockCounters> {
        Arc::clone(&self.counters)
    }

    /// The disk offset of `data` at `sector`, if all of it lies inside the disk and every
    /// descriptor goes the `writable` way.
    fn place(&self, sector: u64, data: &[Descriptor], writable: bool) -> Result<u64, RequestError> {
        if data.iter().any(|d| d.is_write_only() != writable) {
            return Err(RequestError::Direction);
        }
        let len = data_len(data);
        let out_of_range = || RequestError::OutOfRange {
            sector,
            len,
            capacity: self.capacity_bytes,
        };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity_bytes => Ok(offset),
            _ => Err(out_of_range()),
        }
    }

    fn disk_at(&self, offset: u64) -> DiskCursor<'_> {
        DiskCursor {
            file: &self.disk,
            offset,
        }
    }

    /// Serves the request made of `descs`; returns the used length and how it ended.
    fn serve_chain(&self, descs: &[Descriptor], mem: &GuardedMemory<'_>) -> (u32, BlockOutcome) {
        const UNANSWERED: (u32, BlockOutcome) = (0, BlockOutcome::Error);
        let Some((status, rest)) = descs.split_last() else {
            log::debug!("virtio-blk: empty chain");
            return UNANSWERED;
        };
        // A last descriptor that still points on was cut short: a loop, or a bad index.
        if status.has_next() || !status.is_write_only() || status.len() == 0 {
            log::debug!("virtio-blk: request without a status byte");
            return UNANSWERED;
        }
        let Some(status_addr) = status.addr().0.checked_add(u64::from(status.len()) - 1) else {
            return UNANSWERED;
        };
        let (code, written, outcome) = match self.execute(rest, mem) {
            Ok((written, outcome)) => (VIRTIO_BLK_S_OK as u8, written, outcome),
            Err(e) => {
                log::debug!("virtio-blk: {e}");
                (e.status(), 0, BlockOutcome::Error)
            }
        };
        match mem.write_obj(code, GuestAddress(status_addr)) {
            Ok(()) => (written.saturating_add(1), outcome),
            Err(e) => {
                log::debug!("virtio-blk: cannot write the status: {e}");
                UNANSWERED
            }
        }
    }

    /// Runs the request; returns the bytes it wrote to guest memory, and what it did.
    fn execute(
        &self,
        descs: &[Descriptor],
        mem: &GuardedMemory<'_>,
    ) -> Result<(u32, BlockOutcome), RequestError> {
        let (header, data) = descs.split_first().ok_or(RequestError::Header)?;
        if header.is_write_only() || header.len() < HEADER {
            return Err(RequestError::Header);
        }
        let mut raw = [0u8; HEADER as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(RequestError::Guest)?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes(raw[8..].try_into().unwrap_or_default());
        match kind {
            VIRTIO_BLK_T_IN => {
                let mut disk = self.disk_at(self.place(sector, data, true)?);
                let mut written = 0u32;
                for d in data {
                    mem.read_exact_volatile_from(d.addr(), &mut disk, d.len() as usize)
                        .map_err(RequestError::Guest)?;
                    written = written.saturating_add(d.len());
                }
                Ok((written, BlockOutcome::Read(data_len(data))))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let mut disk = self.disk_at(self.place(sector, data, false)?);
                for d in data {
                    mem.write_all_volatile_to(d.addr(), &mut disk, d.len() as usize)
                        .map_err(RequestError::Guest)?;
                }
                Ok((0, BlockOutcome::Write(data_len(data))))
            }
            VIRTIO_BLK_T_FLUSH => self
                .disk
                .sync_all()
                .map(|()| (0, BlockOutcome::Flush))
                .map_err(RequestError::Io),
            VIRTIO_BLK_T_GET_ID => {
                let d = data
                    .first()
                    .filter(|d| d.is_write_only())
                    .ok_or(RequestError::Direction)?;
                let n = (d.len() as usize).min(self.id.len());
                mem.write_slice(&self.id[..n], d.addr())
                    .map_err(RequestError::Guest)?;
                Ok((n as u32, BlockOutcome::Other))
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }
}

/// Bytes of the data descriptors `data`.
fn data_len(data: &[Descriptor]) -> u64 {
    data.iter().map(|d| u64::from(d.len())).sum()
}

/// The disk file from a position on, read and written with positioned I/O (one `pread` or
/// `pwrite` per guest buffer, no shared file position).
struct DiskCursor<'a> {
    file: &'a File,
    offset: u64,
}

impl DiskCursor<'_> {
    fn advance(&mut self, done: isize) -> Result<usize, VolatileMemoryError> {
        let done = usize::try_from(done)
            .map_err(|_| VolatileMemoryError::IOError(std::io::Error::last_os_error()))?;
        self.offset += done as u64;
        Ok(done)
    }
}

impl ReadVolatile for DiskCursor<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let done = {
            let guard = buf.ptr_guard_mut();
            // SAFETY: the file descriptor is open for the cursor's lifetime, and the slice's
            // memory is valid for writes of `buf.len()` bytes while its guard lives.
            unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().cast(),
                    buf.len(),
                    self.offset as libc::off_t,
                )
            }
        };
        let done = self.advance(done)?;
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for DiskCursor<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        // SAFETY: the file descriptor is open for the cursor's lifetime, and the slice's
        // memory is valid for reads of `buf.len()` bytes while its guard lives.
        let done = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                self.offset as libc::off_t,
            )
        };
        self.advance(done)
    }
}

impl QueueHandler for BlockHandler {
    fn serve(&mut self, _index: usize, chain: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
        // The chain's descriptors, in a buffer kept from request to request.
        let mut descs = std::mem::take(&mut self.descriptors);
        descs.clear();
        descs.extend(chain.clone());
        let (used, outcome) = self.serve_chain(&descs, chain.memory());
        self.descriptors = descs;
        // Counted once used: this run may be undone and the request served again.
        self.outcome = Some(outcome);
        used
    }

    fn used(&mut self, _index: usize) {
        if let Some(outcome) = self.outcome.take() {
            self.counters.record(outcome);
        }
    }
}
