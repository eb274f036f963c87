//! Host resources the tests use outside any table: anonymous mappings and scratch
//! files.

/// A private anonymous mapping of `len` bytes, unmapped on drop.
pub struct Mapping {
    pub addr: *mut u8,
    pub len: usize,
}

// SAFETY: the mapping is plain memory shared deliberately between a test's threads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(len: usize) -> Mapping {
        // SAFETY: a fresh anonymous mapping that nothing else refers to; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Mapping {
            addr: addr.cast(),
            len,
        }
    }

    /// Its first byte's address.
    pub fn start(&self) -> u64 {
        self.addr as u64
    }

    pub fn protect(&self, prot: i32) {
        // SAFETY: our own mapping; no Rust reference points into it.
        let rc = unsafe { libc::mprotect(self.addr.cast(), self.len, prot) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns, unused by now.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// A read-write file of no name (removed at once), for `name`'s test.
pub fn scratch_file(name: &str) -> std::fs::File {
    // Unique within the process too: tests of one binary run at once, and one's removal
    // must not take another's file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("kite-{name}-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}
