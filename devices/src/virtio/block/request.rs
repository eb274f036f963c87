//! Serving virtio-blk requests. A request is a descriptor chain (walked by virtio-queue):
//! a device-readable header of 16 bytes first, data descriptors, and a device-writable
//! status last (its last byte is the status), as Linux and other drivers lay it out. Data
//! moves between the disk file and guest memory directly (one copy, by the kernel), through
//! guest memory's vm-memory interface over the region guards.
//!
//! Requests served in a batch (see [`QueueHandler::serve_batched`]) that read or write
//! the disk are deferred to the end of the batch, their guest buffers resolved to host
//! memory once, and done together: a run of them the same way, each beginning on the
//! disk where the one before ends, is one `preadv` or `pwritev`. A run that stops short
//! is done again request by request, so each gets its own status. A batch defers up to
//! `BATCH_BYTES`; a request served at once (a flush, an ID, a bad request, one beyond
//! that) first finishes those deferred before it, and ends the batch.
//!
//! Every check a hostile driver could fail ends in an error status, or, with no status byte
//! to write (a chain cut short by a loop, a bad next index, or no writable last descriptor),
//! a used entry of length 0; never a panic. Per-request failures are logged at debug level
//! only, so a guest cannot flood the log.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use memory::GuardedMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use super::SECTOR_SIZE;
use crate::virtio::counters::{BlockCounters, BlockOutcome};
use crate::virtio::worker::QueueHandler;

/// Bytes of a request header.
const HEADER: u32 = 16;
/// Host buffers one `preadv` or `pwritev` takes at most (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// Bytes of the requests one batch defers at most (one request beyond it is served at
/// once, which ends the batch): a writer of the region a batch holds waits for at most
/// this much I/O, or one request's.
const BATCH_BYTES: u64 = 1 << 20;

/// A read or write deferred to the end of its batch.
struct Deferred {
    /// To the disk (a write), or from it.
    write: bool,
    /// Where on the disk.
    offset: u64,
    /// Bytes.
    len: u64,
    /// Its host buffers, in [`BlockHandler::iovecs`].
    bufs: Range<usize>,
    /// The status byte.
    status: GuestAddress,
}

/// Host buffers of the deferred requests: guest memory their batch holds.
#[derive(Default)]
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are only dereferenced (by the kernel, in `preadv`/`pwritev`) on the
// device thread, while the batch that resolved them holds their regions; the vector is
// emptied when the batch is finished or forgotten, before those locks are dropped, so a
// handler moved to another thread (handed to its device thread, between batches) carries
// none.
unsafe impl Send for IoVecs {}

/// The request processing of one disk: a [`QueueHandler`] for its request queue (what
/// the device thread runs; public for fuzzing and tools that serve a queue themselves).
pub struct BlockHandler {
    disk: Arc<File>,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Scratch space for a request's descriptors.
    descriptors: Vec<Descriptor>,
    /// The reads and writes deferred in the batch being served.
    deferred: Vec<Deferred>,
    /// Their host buffers.
    iovecs: IoVecs,
    counters: Arc<BlockCounters>,
    /// How the requests of the last run ended, in order: counted once they are used.
    outcomes: Vec<BlockOutcome>,
    /// Outcomes of the last run counted so far.
    counted: usize,
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
            deferred: Vec::new(),
            iovecs: IoVecs::default(),
            counters: Arc::default(),
            outcomes: Vec::new(),
            counted: 0,
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
        if descs.is_empty() {
            log::debug!("virtio-blk: empty chain");
            return UNANSWERED;
        }
        let Some((status_addr, rest)) = status_byte(descs) else {
            log::debug!("virtio-blk: request without a status byte");
            return UNANSWERED;
        };
        let (code, written, outcome) = match self.execute(rest, mem) {
            Ok((written, outcome)) => (VIRTIO_BLK_S_OK as u8, written, outcome),
            Err(e) => {
                log::debug!("virtio-blk: {e}");
                (e.status(), 0, BlockOutcome::Error)
            }
        };
        match mem.write_obj(code, status_addr) {
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
        let (kind, sector, data) = read_header(descs, mem)?;
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

impl BlockHandler {
    /// Defers the request made of `descs` to the end of the batch, if it is a read or a
    /// write that is valid and whose buffers and status byte lie in memory `mem` can hold
    /// (for a request after a batch's first, memory it holds already): whether it did.
    fn defer(&mut self, descs: &[Descriptor], mem: &GuardedMemory<'_>) -> bool {
        let Some((status, rest)) = status_byte(descs) else {
            return false;
        };
        let Ok((kind, sector, data)) = read_header(rest, mem) else {
            return false;
        };
        if data.is_empty() {
            return false;
        }
        let write = match kind {
            VIRTIO_BLK_T_IN => false,
            VIRTIO_BLK_T_OUT if !self.read_only => true,
            _ => return false,
        };
        let Ok(offset) = self.place(sector, data, !write) else {
            return false;
        };
        let pending: u64 = self.deferred.iter().map(|d| d.len).sum();
        if !self.deferred.is_empty() && pending + data_len(data) > BATCH_BYTES {
            return false;
        }
        if mem.get_slice(status, 1).is_err() {
            return false;
        }
        let start = self.iovecs.0.len();
        for d in data {
            for slice in mem.get_slices(d.addr(), d.len() as usize) {
                let slice = match slice {
                    Ok(slice) if self.iovecs.0.len() - start < IOV_MAX => slice,
                    _ => {
                        self.iovecs.0.truncate(start);
                        return false;
                    }
                };
                if !write {
                    slice.bitmap().mark_dirty(0, slice.len());
                }
                self.iovecs.0.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        self.deferred.push(Deferred {
            write,
            offset,
            len: data_len(data),
            bufs: start..self.iovecs.0.len(),
            status,
        });
        true
    }

    /// Does the deferred requests' I/O, runs of them together, and answers each (status
    /// byte, used length in `lens`, outcome), in order.
    fn finish(&mut self, mem: &GuardedMemory<'_>, lens: &mut Vec<u32>) {
        let mut deferred = std::mem::take(&mut self.deferred);
        let mut i = 0;
        while i < deferred.len() {
            let first = &deferred[i];
            // A run: the same way, each beginning on the disk where the one before ends.
            let (mut end, mut j) = (first.offset + first.len, i + 1);
            while let Some(next) = deferred.get(j).filter(|next| {
                next.write == first.write
                    && next.offset == end
                    && next.bufs.start == deferred[j - 1].bufs.end
                    && next.bufs.end - first.bufs.start <= IOV_MAX
            }) {
                end += next.len;
                j += 1;
            }
            let bufs = first.bufs.start..deferred[j - 1].bufs.end;
            let (done, mut error) = self.transfer(first.write, first.offset, &self.iovecs.0[bufs]);
            for d in &deferred[i..j] {
                let result = if d.offset + d.len <= first.offset + done {
                    Ok(())
                } else if j - i == 1 {
                    Err(error.take().take_or_eof())
                } else {
                    // The run stopped short: this one alone says how it fares.
                    match self.transfer(d.write, d.offset, &self.iovecs.0[d.bufs.clone()]) {
                        (done, _) if done == d.len => Ok(()),
                        (_, error) => Err(error.take_or_eof()),
                    }
                };
                let (code, used, outcome) = match result {
                    Ok(()) if d.write => (VIRTIO_BLK_S_OK, 1, BlockOutcome::Write(d.len)),
                    Ok(()) => (
                        VIRTIO_BLK_S_OK,
                        u32::try_from(d.len.saturating_add(1)).unwrap_or(u32::MAX),
                        BlockOutcome::Read(d.len),
                    ),
                    Err(e) => {
                        log::debug!("virtio-blk: disk I/O: {e}");
                        (VIRTIO_BLK_S_IOERR, 1, BlockOutcome::Error)
                    }
                };
                let (used, outcome) = match mem.write_obj(code as u8, d.status) {
                    Ok(()) => (used, outcome),
                    Err(e) => {
                        log::debug!("virtio-blk: cannot write the status: {e}");
                        (0, BlockOutcome::Error)
                    }
                };
                lens.push(used);
                self.outcomes.push(outcome);
            }
            i = j;
        }
        deferred.clear();
        self.deferred = deferred;
        self.iovecs.0.clear();
    }

    /// Moves the host buffers `iovecs` to (`write`) or from the disk at `offset`, as few
    /// system calls as the kernel allows; returns the bytes moved, and what stopped it
    /// short, if anything did.
    fn transfer(
        &self,
        write: bool,
        offset: u64,
        iovecs: &[libc::iovec],
    ) -> (u64, Option<std::io::Error>) {
        let (mut done, mut first, mut skip) = (0u64, 0usize, 0usize);
        loop {
            while first < iovecs.len() && skip >= iovecs[first].iov_len {
                skip -= iovecs[first].iov_len;
                first += 1;
            }
            if first == iovecs.len() {
                return (done, None);
            }
            // After a short transfer, the rest of the buffer it stopped in alone.
            let rest = [libc::iovec {
                // SAFETY: `skip` is less than the buffer's length: still inside it.
                iov_base: unsafe { iovecs[first].iov_base.cast::<u8>().add(skip) }.cast(),
                iov_len: iovecs[first].iov_len - skip,
            }];
            let bufs = if skip == 0 {
                &iovecs[first..iovecs.len().min(first + IOV_MAX)]
            } else {
                &rest[..]
            };
            let at = (offset + done) as libc::off_t;
            let fd = self.disk.as_raw_fd();
            // SAFETY: the file descriptor is open while the handler lives, and every
            // buffer is guest memory the batch holds (resolved by `defer`, its region
            // read-locked until the batch is finished): valid for `iov_len` bytes, for
            // the kernel to read (a write) or write (a read). The count is at most
            // IOV_MAX.
            let moved = unsafe {
                if write {
                    libc::pwritev(fd, bufs.as_ptr(), bufs.len() as libc::c_int, at)
                } else {
                    libc::preadv(fd, bufs.as_ptr(), bufs.len() as libc::c_int, at)
                }
            };
            match moved {
                0 => return (done, None),
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return (done, Some(e));
                    }
                }
                n => {
                    done += n as u64;
                    skip += n as usize;
                }
            }
        }
    }
}

/// The error that stopped a transfer short, or, if nothing did, the end of the file.
trait OrEof {
    fn take_or_eof(self) -> std::io::Error;
}

impl OrEof for Option<std::io::Error> {
    fn take_or_eof(self) -> std::io::Error {
        self.unwrap_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }
}

/// The address of the status byte of the request made of `descs` (the last byte of its
/// last descriptor), and its other descriptors; none if that descriptor is unusable: one
/// that still points on was cut short (a loop, a bad index), or it is read-only or empty.
fn status_byte(descs: &[Descriptor]) -> Option<(GuestAddress, &[Descriptor])> {
    let (status, rest) = descs.split_last()?;
    if status.has_next() || !status.is_write_only() || status.len() == 0 {
        return None;
    }
    let addr = status.addr().checked_add(u64::from(status.len()) - 1)?;
    Some((addr, rest))
}

/// The request type and first sector its header (the first of `descs`) says, and its
/// data descriptors.
fn read_header<'d>(
    descs: &'d [Descriptor],
    mem: &GuardedMemory<'_>,
) -> Result<(u32, u64, &'d [Descriptor]), RequestError> {
    let (header, data) = descs.split_first().ok_or(RequestError::Header)?;
    if header.is_write_only() || header.len() < HEADER {
        return Err(RequestError::Header);
    }
    let mut raw = [0u8; HEADER as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(RequestError::Guest)?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes(raw[8..].try_into().unwrap_or_default());
    Ok((kind, sector, data))
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
    fn serve(&mut self, index: usize, chain: DescriptorChain<&GuardedMemory<'_>>) -> u32 {
        // A run of its own.
        self.forget_batch(index);
        // The chain's descriptors, in a buffer kept from request to request.
        let mut descs = std::mem::take(&mut self.descriptors);
        descs.clear();
        descs.extend(chain.clone());
        let (used, outcome) = self.serve_chain(&descs, chain.memory());
        self.descriptors = descs;
        // Counted once used: this run may be undone and the request served again.
        self.outcomes.push(outcome);
        used
    }

    fn serve_batched(
        &mut self,
        _index: usize,
        chain: DescriptorChain<&GuardedMemory<'_>>,
        lens: &mut Vec<u32>,
    ) {
        let mut descs = std::mem::take(&mut self.descriptors);
        descs.clear();
        descs.extend(chain.clone());
        let mem = chain.memory();
        // One that reached beyond the batch's memory is left for the next batch.
        if !self.defer(&descs, mem) && !mem.reached_out() {
            // Served now, after the requests deferred before it.
            self.finish(mem, lens);
            let (used, outcome) = self.serve_chain(&descs, mem);
            lens.push(used);
            self.outcomes.push(outcome);
        }
        self.descriptors = descs;
    }

    fn finish_batch(&mut self, _index: usize, mem: &GuardedMemory<'_>, lens: &mut Vec<u32>) {
        self.finish(mem, lens);
    }

    fn forget_batch(&mut self, _index: usize) {
        self.deferred.clear();
        self.iovecs.0.clear();
        self.outcomes.clear();
        self.counted = 0;
    }

    fn used(&mut self, _index: usize) {
        if let Some(outcome) = self.outcomes.get(self.counted) {
            self.counters.record(*outcome);
            self.counted += 1;
        }
    }
}
