//! Serving virtio-blk requests: header, data, status byte, parsed from descriptor chains by
//! virtio-queue's reader and writer. Every check a hostile driver could fail ends in an
//! error status (or, with no status byte to write, a used entry of length 0), never a panic;
//! per-request failures are logged at debug level only, so a guest cannot flood the log.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use memory::GuardedMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::SECTOR_SIZE;
use crate::virtio::worker::{QueueError, QueueHandler};

/// Bytes moved between the disk and guest memory at a time.
const CHUNK: usize = 1 << 20;

/// The request processing of one disk.
pub(super) struct BlockHandler {
    pub(super) disk: Arc<File>,
    pub(super) read_only: bool,
    pub(super) capacity_bytes: u64,
    pub(super) id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// Why a request failed (logged; the driver sees the status).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("request header unreadable: {0}")]
    Header(std::io::Error),
    #[error("request of {len} bytes at byte {offset} is beyond the disk's {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("disk I/O: {0}")]
    Io(std::io::Error),
    #[error("guest buffer: {0}")]
    Guest(std::io::Error),
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
    /// The byte range of a request of `len` bytes at `sector`, if inside the disk.
    fn range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let len = len as u64;
        let offset = sector.checked_mul(SECTOR_SIZE);
        match offset.and_then(|o| o.checked_add(len).map(|end| (o, end))) {
            Some((offset, end)) if end <= self.capacity_bytes => Ok(offset),
            _ => Err(RequestError::OutOfRange {
                offset: offset.unwrap_or(u64::MAX),
                len,
                capacity: self.capacity_bytes,
            }),
        }
    }

    fn read(&self, sector: u64, data: &mut Writer<'_>) -> Result<(), RequestError> {
        let mut offset = self.range(sector, data.available_bytes())?;
        let mut buf = vec![0u8; data.available_bytes().min(CHUNK)];
        while data.available_bytes() > 0 {
            let n = data.available_bytes().min(buf.len());
            self.disk
                .read_exact_at(&mut buf[..n], offset)
                .map_err(RequestError::Io)?;
            data.write_all(&buf[..n]).map_err(RequestError::Guest)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn write(&self, sector: u64, data: &mut Reader<'_>) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let mut offset = self.range(sector, data.available_bytes())?;
        let mut buf = vec![0u8; data.available_bytes().min(CHUNK)];
        while data.available_bytes() > 0 {
            let n = data.available_bytes().min(buf.len());
            data.read_exact(&mut buf[..n])
                .map_err(RequestError::Guest)?;
            self.disk
                .write_all_at(&buf[..n], offset)
                .map_err(RequestError::Io)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn execute(&self, reader: &mut Reader<'_>, data: &mut Writer<'_>) -> Result<(), RequestError> {
        let mut header = [0u8; 16];
        reader
            .read_exact(&mut header)
            .map_err(RequestError::Header)?;
        let kind = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        match kind {
            VIRTIO_BLK_T_IN => self.read(sector, data),
            VIRTIO_BLK_T_OUT => self.write(sector, reader),
            VIRTIO_BLK_T_FLUSH => self.disk.sync_all().map_err(RequestError::Io),
            VIRTIO_BLK_T_GET_ID => {
                let n = data.available_bytes().min(self.id.len());
                data.write_all(&self.id[..n]).map_err(RequestError::Guest)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Serves one chain; returns the bytes written to guest memory (the used length).
    fn serve<'m>(
        &self,
        chain: DescriptorChain<&'m GuardedMemory<'m>>,
        mem: &'m GuardedMemory<'m>,
    ) -> u32 {
        let mut writer = match chain.clone().writer(mem) {
            Ok(w) => w,
            Err(e) => {
                log::debug!("virtio-blk: unusable writable buffers: {e}");
                return 0;
            }
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            log::debug!("virtio-blk: request without a status byte");
            return 0;
        }
        let mut status = match writer.split_at(writable - 1) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("virtio-blk: {e}");
                return 0;
            }
        };
        let result = match chain.reader(mem) {
            Ok(mut reader) => self.execute(&mut reader, &mut writer),
            Err(e) => Err(RequestError::Header(std::io::Error::other(e.to_string()))),
        };
        let code = match result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                log::debug!("virtio-blk: {e}");
                e.status()
            }
        };
        if let Err(e) = status.write_all(&[code]) {
            log::debug!("virtio-blk: cannot write the status: {e}");
        }
        u32::try_from(writer.bytes_written() + status.bytes_written()).unwrap_or(u32::MAX)
    }
}

impl QueueHandler for BlockHandler {
    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuardedMemory<'_>,
    ) -> Result<bool, QueueError> {
        let chains: Vec<_> = queue.iter(mem)?.collect();
        let used = !chains.is_empty();
        for chain in chains {
            let head = chain.head_index();
            let len = self.serve(chain, mem);
            queue.add_used(mem, head, len)?;
        }
        Ok(used)
    }
}
