//! Kernel images: any bytes given as `--kernel` (ELF vmlinux, bzImage, or neither) are
//! loaded into 64 MiB of guest memory, with the boot tables. Loading succeeds or fails
//! with an error; it never panics or writes outside guest memory.
#![no_main]

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use memory::{GuardedMemory, RegionSpec, RegionTable};
use vm_memory::GuestAddress;
use vmm::arch::x86_64::boot::{load, BootSpec};

const RAM: u64 = 64 << 20;

struct Setup {
    table: RegionTable,
    /// The image, in a memfd: what `load` opens by path.
    image: Mutex<File>,
    path: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let table = RegionTable::default();
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), RAM), None)
            .unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"fuzz-kernel".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let image = unsafe { File::from_raw_fd(fd) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", image.as_raw_fd()));
        Setup {
            table,
            image: Mutex::new(image),
            path,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    {
        let mut image = setup.image.lock().unwrap();
        image.set_len(0).unwrap();
        image.seek(SeekFrom::Start(0)).unwrap();
        image.write_all(data).unwrap();
    }
    let mem = GuardedMemory::lock_all(&setup.table, None).unwrap();
    let _ = load(
        &mem,
        &BootSpec {
            kernel: &setup.path,
            initramfs: None,
            cmdline: "console=ttyS0",
            cpus: 1,
            ram: &[(GuestAddress(0), RAM)],
        },
    );
});
