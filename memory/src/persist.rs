//! Guest memory to and from a file: what a snapshot keeps of the guest's memory.
//!
//! [`save`] writes every region into one file, one range after the other, **sparse**:
//! only pages that hold data are written; pages the guest never touched, and pages of
//! zeros, stay holes. It streams from the guest's own mapping (no second copy in
//! memory), one region held at a time (guarantee 8), so the caller must keep the guest
//! and its devices paused while it runs, or the file is not one point in time.
//!
//! A saved range comes back in one of two ways: lazily, as a region backed by
//! [`crate::LazySource::File`] at its offset (the fault handler fills each page on first
//! touch; holes read as zeros), or eagerly with [`load`], which reads the file's data
//! into regions already in the table, skipping its holes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemoryRegion, MemoryRegionAddress};

use crate::region::{Backing, LazySource, RegionGuard, PAGE_SIZE};
use crate::sync::Deadline;
use crate::table::{LookupError, RegionTable};

/// One range of guest memory in a memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedRange {
    /// Guest-physical address of its first byte.
    pub guest_addr: u64,
    /// Its length in bytes (whole pages).
    pub size: u64,
    /// Where it starts in the file.
    pub file_offset: u64,
}

impl SavedRange {
    /// The file offset just past it (saturating: a range past 2^64 is never in a file).
    pub fn file_end(&self) -> u64 {
        self.file_offset.saturating_add(self.size)
    }
}

/// What [`save`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedMemory {
    /// Every region, in guest-address order.
    pub ranges: Vec<SavedRange>,
    /// Bytes of data written (the rest of the file is holes).
    pub data_bytes: u64,
}

/// Errors saving or loading guest memory.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A region could not be locked.
    #[error("guest memory at {addr:#x}: {source}")]
    Lookup {
        /// Its guest address.
        addr: u64,
        /// Why.
        source: LookupError,
    },
    /// A range is not one region of the table as it is now.
    #[error("guest memory {guest_addr:#x}+{size:#x} is not a region of this VM")]
    NoSuchRegion {
        /// Its guest address.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// The memory file could not be read, written or measured.
    #[error("memory file: {what} at offset {offset:#x}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where in the file.
        offset: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The memory file ends before the last range of its map.
    #[error("the memory file holds {len} bytes, but its map needs {needed}")]
    Short {
        /// The file's length.
        len: u64,
        /// The end of the map's last range.
        needed: u64,
    },
}

fn io_error(what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> PersistError {
    move |source| PersistError::Io {
        what,
        offset,
        source,
    }
}

/// Whether the `len` bytes at `ptr` are all zero.
///
/// # Safety
/// `[ptr, ptr + len)` is readable memory, 8-byte aligned, `len` a multiple of 8.
unsafe fn all_zero(ptr: *const u8, len: usize) -> bool {
    let words = ptr.cast::<u64>();
    // SAFETY: the caller's contract: every word is inside readable memory. Volatile,
    // because it is guest memory, not Rust memory.
    (0..len / 8).all(|i| unsafe { std::ptr::read_volatile(words.add(i)) } == 0)
}

/// Pagemap entry bits: the page is in memory, or in swap.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// Which pages of `[ptr, ptr + len)` have ever held anything: present in memory or
/// swapped out (`/proc/self/pagemap`). A page that is neither was never touched (or was
/// dropped) and reads as zeros. (`mincore` would not do: a swapped-out page is "not
/// resident" to it.) `None` where pagemap cannot be read: every page is then looked at.
fn touched_pages(ptr: *mut u8, len: usize) -> Option<Vec<bool>> {
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let pages = len.div_ceil(PAGE_SIZE as usize);
    let first = ptr as u64 / PAGE_SIZE;
    let mut touched = Vec::with_capacity(pages);
    // A few thousand entries per read.
    let mut entries = vec![0u8; 8 * 4096];
    while touched.len() < pages {
        let count = (pages - touched.len()).min(4096);
        let buf = &mut entries[..8 * count];
        pagemap
            .read_exact_at(buf, (first + touched.len() as u64) * 8)
            .ok()?;
        touched.extend(buf.chunks_exact(8).map(|e| {
            let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
            entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0
        }));
    }
    Some(touched)
}

/// Writes every region of `table` into `file` (which must be empty), one range after the
/// other, only the pages that hold data; the file's length is the sum of the regions'
/// sizes, the rest holes. Each region is held (read-locked, waiting for a writer until
/// `deadline`) while it is written; the guest and its devices must be paused. The file
/// is not synced.
///
/// Pages the guest touched are read from its mapping; pages never touched (neither in
/// memory nor in swap) are not, so saving fills no lazy page and costs no memory: they
/// are zeros, or copied from the file a restored region is backed by (see
/// [`save_region`]).
pub fn save(
    table: &RegionTable,
    file: &File,
    deadline: Deadline,
) -> Result<SavedMemory, PersistError> {
    let layout = table.layout();
    let total = layout.iter().map(|(_, _, size)| size).sum::<u64>();
    file.set_len(total).map_err(io_error("set_len", total))?;
    let mut saved = SavedMemory::default();
    let mut file_offset = 0;
    for (id, start, size) in layout {
        let guard = table
            .lock_region(start, deadline)
            .map_err(|source| PersistError::Lookup {
                addr: start.0,
                source,
            })?;
        if guard.id() != id || guard.len() != size {
            return Err(PersistError::NoSuchRegion {
                guest_addr: start.0,
                size,
            });
        }
        let ptr = guard
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| PersistError::NoSuchRegion {
                guest_addr: start.0,
                size,
            })?;
        saved.data_bytes += save_region(&guard, ptr, file, file_offset)?;
        drop(guard);
        saved.ranges.push(SavedRange {
            guest_addr: start.0,
            size,
            file_offset,
        });
        file_offset += size;
    }
    Ok(saved)
}

/// Where a page of a region being saved comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Page {
    /// Nothing to write: zeros.
    Hole,
    /// The guest's memory.
    Memory,
    /// The region's source file: the page was never touched, and would be filled from it.
    Source,
}

/// Writes the region `guard` holds, mapped at `ptr`, into `file` at `file_offset`; the
/// bytes of data written. Pages never touched (neither in memory nor in swap) are not
/// read through the mapping, which would fill them: they are zeros, or, for a region
/// backed by a file (a restored snapshot's), copied from that file, its holes skipped.
fn save_region(
    guard: &RegionGuard<'_>,
    ptr: *mut u8,
    file: &File,
    file_offset: u64,
) -> Result<u64, PersistError> {
    let region = guard.region();
    let len = guard.len() as usize;
    let source = match region.backing() {
        Backing::Lazy(LazySource::File { file, offset }) | Backing::File { file, offset } => {
            Some((file.as_ref(), *offset))
        }
        _ => None,
    };
    let touched = match region.backing() {
        Backing::Memfd => None,
        _ => touched_pages(ptr, len),
    };
    let page = PAGE_SIZE as usize;
    // Past the file's end (memory a shrink took and a grow gave back) pages are zeros.
    let file_end = region.file_end();
    let kind = |index: usize| {
        if touched.as_ref().is_some_and(|t| !t[index]) {
            return match source {
                Some(_) if ((index + 1) * page) as u64 <= file_end => Page::Source,
                _ => Page::Hole,
            };
        }
        // SAFETY: page `index` lies inside the region's first `size` bytes, which the
        // guard keeps mapped and readable; pages are aligned.
        if unsafe { all_zero(ptr.add(index * page), page) } {
            Page::Hole
        } else {
            Page::Memory
        }
    };
    let mut written = 0;
    let pages = len / page;
    let mut index = 0;
    while index < pages {
        let what = kind(index);
        let first = index;
        index += 1;
        while index < pages && kind(index) == what {
            index += 1;
        }
        let (at, bytes) = (first * page, (index - first) * page);
        let offset = file_offset + at as u64;
        match what {
            Page::Hole => {}
            Page::Memory => {
                // SAFETY: `[at, at + bytes)` lies inside the guarded region (see above);
                // the kernel reads it.
                let data = unsafe { std::slice::from_raw_parts(ptr.add(at), bytes) };
                file.write_all_at(data, offset)
                    .map_err(io_error("write", offset))?;
                written += bytes as u64;
            }
            Page::Source => {
                if let Some((source, source_offset)) = source {
                    written += copy_data(
                        source,
                        source_offset + at as u64,
                        bytes as u64,
                        file,
                        offset,
                    )?;
                }
            }
        }
    }
    Ok(written)
}

/// Copies the data of `[from, from + len)` of `source` to `to` at `at`, skipping the
/// source's holes, through a bounded buffer; the bytes copied.
fn copy_data(source: &File, from: u64, len: u64, to: &File, at: u64) -> Result<u64, PersistError> {
    let end = from + len;
    let mut copied = 0;
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut pos = from;
    while pos < end {
        let Some(data) = seek(source, pos, libc::SEEK_DATA)?.filter(|&d| d < end) else {
            break;
        };
        let hole = seek(source, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let mut chunk = data;
        while chunk < hole {
            let n = buf.len().min((hole - chunk) as usize);
            source
                .read_exact_at(&mut buf[..n], chunk)
                .map_err(io_error("read the source", chunk))?;
            let dest = at + (chunk - from);
            to.write_all_at(&buf[..n], dest)
                .map_err(io_error("write", dest))?;
            chunk += n as u64;
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

/// Checks that `file` holds every range of `ranges`.
pub fn check_file(file: &File, ranges: &[SavedRange]) -> Result<(), PersistError> {
    let len = file.metadata().map_err(io_error("stat", 0))?.len();
    let needed = ranges.iter().map(SavedRange::file_end).max().unwrap_or(0);
    if len < needed {
        return Err(PersistError::Short { len, needed });
    }
    Ok(())
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`; `None` past the last data.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> Result<Option<u64>, PersistError> {
    // SAFETY: lseek on a descriptor we own; it only moves the file position.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(io_error("lseek", offset)(e));
    }
    Ok(Some(at as u64))
}

/// Reads `ranges` of `file` into the regions of `table` that hold them (each range must
/// be one whole region, as [`save`] wrote it, now in the table with memory that reads
/// as zeros): only the file's data is read, its holes are skipped. Returns the bytes
/// read. Each region is held while it is filled.
pub fn load(
    table: &RegionTable,
    file: &File,
    ranges: &[SavedRange],
    deadline: Deadline,
) -> Result<u64, PersistError> {
    check_file(file, ranges)?;
    let mut read = 0;
    for range in ranges {
        let guard = table
            .lock_region(GuestAddress(range.guest_addr), deadline)
            .map_err(|source| PersistError::Lookup {
                addr: range.guest_addr,
                source,
            })?;
        let no_such = || PersistError::NoSuchRegion {
            guest_addr: range.guest_addr,
            size: range.size,
        };
        if guard.start_addr().0 != range.guest_addr || guard.len() != range.size {
            return Err(no_such());
        }
        let ptr = guard
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| no_such())?;
        let end = range.file_end();
        let mut at = range.file_offset;
        while at < end {
            let Some(data) = seek(file, at, libc::SEEK_DATA)?.filter(|&d| d < end) else {
                break;
            };
            let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            let into = (data - range.file_offset) as usize;
            // SAFETY: `[into, into + (hole - data))` lies inside the guarded region
            // (`data` and `hole` are within the range, which is the region); the guest
            // is not running, so nothing else uses this memory while it is written.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(ptr.add(into), (hole - data) as usize) };
            file.read_exact_at(buf, data)
                .map_err(io_error("read", data))?;
            read += hole - data;
            at = hole;
        }
    }
    Ok(read)
}
