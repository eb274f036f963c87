//! Lazily populated regions through userfaultfd.

mod common;

use std::io::Write;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use common::host::{scratch_file, Mapping};
use common::lazy::{kernel_read, read, within, write, FailingUnregister, FAULT_DEADLINE};
use memory::{
    Backing, FaultHandler, LazyPages, LazyRange, LazySource, RegionSpec, RegionTable, TableConfig,
    TableError, ThreadHooks, PAGE_SIZE,
};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

fn lazy_table() -> Option<(Arc<RegionTable>, Arc<FaultHandler>)> {
    let handler = start(ThreadHooks::default())?;
    Some((table_with(handler.clone()), handler))
}

fn table_with(lazy: Arc<dyn LazyPages>) -> Arc<RegionTable> {
    Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        Some(lazy),
        TableConfig::default(),
    ))
}

fn start(hooks: ThreadHooks) -> Option<Arc<FaultHandler>> {
    match FaultHandler::start_with(hooks) {
        Ok(handler) => Some(handler),
        Err(e) => {
            // userfaultfd with kernel faults needs root; CI runs as root.
            eprintln!("SKIPPED: no userfaultfd here: {e}");
            assert!(
                std::env::var_os("KITE_NO_SKIPS").is_none(),
                "CI must be able to use userfaultfd: {e}"
            );
            None
        }
    }
}

#[test]
fn zero_backed_region_fills_on_first_touch() {
    let Some((table, handler)) = lazy_table() else {
        return;
    };
    let id = table
        .insert(
            RegionSpec {
                start: GuestAddress(0),
                size: 4 * MIB,
                capacity: 8 * MIB,
                backing: Backing::Lazy(LazySource::Zero),
            },
            None,
        )
        .unwrap();
    let buf = read(&table, GuestAddress(MIB), 3 * 4096);
    assert!(buf.iter().all(|&b| b == 0));
    // One fault fills the 64 KiB window around it: the three pages take one fault. The
    // handler counts a fill just after it wakes the faulting thread.
    common::wait_for("a zero fill", Duration::from_secs(10), || {
        handler.stats().zero_fills >= 1
    });
    assert_eq!(handler.stats().faults, 1, "{:?}", handler.stats());
    write(&table, GuestAddress(2 * MIB), b"lazy");
    assert_eq!(read(&table, GuestAddress(2 * MIB), 4), b"lazy");

    // Growth registers the new part; shrink and removal unregister.
    table.grow(id, 8 * MIB, None).unwrap();
    assert_eq!(handler.registered_ranges(), 2);
    assert_eq!(read(&table, GuestAddress(7 * MIB), 4), [0; 4]);
    table.shrink(id, 2 * MIB, None).unwrap();
    table.remove(id, None).unwrap();
    assert_eq!(handler.registered_ranges(), 0);
    assert_eq!(handler.stats().errors, 0);
}

#[test]
fn file_backed_region_reads_the_file_at_its_offset() {
    let Some((table, handler)) = lazy_table() else {
        return;
    };
    let mut file = scratch_file("lazy");
    let contents: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
    file.write_all(&contents).unwrap();
    let file = Arc::new(file);
    table
        .insert(
            RegionSpec {
                start: GuestAddress(MIB),
                size: MIB,
                capacity: MIB,
                backing: Backing::Lazy(LazySource::File {
                    file: file.clone(),
                    offset: 4096,
                }),
            },
            None,
        )
        .unwrap();
    let buf = read(&table, GuestAddress(MIB), 2 * 4096 + 100);
    assert_eq!(&buf[..2 * 4096], &contents[4096..]);
    // Beyond the end of the file: zeroes.
    assert!(buf[2 * 4096..].iter().all(|&b| b == 0));
    common::wait_for("a file fill", Duration::from_secs(10), || {
        handler.stats().file_fills >= 1
    });
    assert_eq!(
        handler.stats().faults,
        1,
        "one window: {:?}",
        handler.stats()
    );
}

#[test]
fn dropping_the_table_unregisters_lazy_ranges() {
    let Some((table, handler)) = lazy_table() else {
        return;
    };
    table
        .insert(
            RegionSpec {
                start: GuestAddress(0),
                size: MIB,
                capacity: MIB,
                backing: Backing::Lazy(LazySource::Zero),
            },
            None,
        )
        .unwrap();
    // A cached snapshot on this thread keeps the region's mapping alive after the
    // table is gone; its range must not stay registered with the handler. (The fault
    // is taken on a helper thread first, so a dead handler fails the test.)
    write(&table, GuestAddress(0), b"x");
    table.write(GuestAddress(0), b"x", None).unwrap();
    assert_eq!(handler.registered_ranges(), 1);
    let table = Arc::into_inner(table).expect("the only reference");
    drop(table);
    assert_eq!(handler.registered_ranges(), 0);
}

#[test]
fn registry_splits_on_remove_and_replaces_overlaps_on_add() {
    let registry = memory::FaultRegistry::default();
    let range = |start: u64, len: u64, offset: u64| memory::LazyRange {
        host_start: start,
        len,
        source: LazySource::Zero,
        source_offset: offset,
    };
    registry.add(range(0x10000, 0x4000, 100));
    // Punch a hole in the middle: two ranges remain, offsets carried along.
    registry.remove(0x11000, 0x1000);
    assert_eq!(registry.len(), 2);
    assert_eq!(registry.lookup(0x10800).map(|(_, o)| o), Some(100 + 0x800));
    assert!(registry.lookup(0x11800).is_none());
    assert_eq!(registry.lookup(0x12010).map(|(_, o)| o), Some(100 + 0x2010));
    // A new range over the old one replaces it where they overlap.
    registry.add(range(0x12000, 0x1000, 7));
    assert_eq!(registry.lookup(0x12010).map(|(_, o)| o), Some(7 + 0x10));
    assert_eq!(registry.lookup(0x13010).map(|(_, o)| o), Some(100 + 0x3010));
    registry.remove(0, u64::MAX / 2);
    assert!(registry.is_empty());
}

#[test]
fn a_fault_handler_that_cannot_start_serving_reports_its_death() {
    let (tx, rx) = std::sync::mpsc::channel();
    let hooks = memory::ThreadHooks {
        confine: Box::new(|| Err("no filter".into())),
        died: Box::new(move |why| {
            let _ = tx.send(why);
        }),
    };
    let handler = match FaultHandler::start_with(hooks) {
        Ok(handler) => handler,
        Err(e) => {
            eprintln!("SKIPPED: no userfaultfd here: {e}");
            assert!(
                std::env::var_os("KITE_NO_SKIPS").is_none(),
                "CI has userfaultfd: {e}"
            );
            return;
        }
    };
    let why = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the death is reported");
    assert!(
        why.contains("fault handler") && why.contains("no filter"),
        "{why}"
    );
    drop(handler);
}

#[test]
fn a_fault_on_a_range_the_registry_forgot_is_woken() {
    let Some(handler) = start(ThreadHooks::default()) else {
        return;
    };
    let memory = Mapping::new(4 * PAGE_SIZE as usize);
    handler
        .register(LazyRange {
            host_start: memory.start(),
            len: 4 * PAGE_SIZE,
            source: LazySource::Zero,
            source_offset: 0,
        })
        .unwrap();
    // The kernel refuses an unaligned unregistration; the registry forgets the range
    // anyway (from its second byte on), so the kernel still sends faults there.
    assert!(handler
        .unregister(memory.start() + 1, 4 * PAGE_SIZE - 1)
        .is_err());
    let page = memory.start() + 2 * PAGE_SIZE;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(kernel_read(page, PAGE_SIZE as usize)));
    common::wait_for("the handler to miss the range", FAULT_DEADLINE, || {
        handler.stats().unregistered >= 1
    });
    // What removal does next: the memory becomes inaccessible. A woken access retries
    // into that and fails; one never woken hangs.
    memory.protect(libc::PROT_NONE);
    let result = rx
        .recv_timeout(FAULT_DEADLINE)
        .expect("the faulting thread was never woken");
    assert_eq!(result, Err(libc::EFAULT));
    assert_eq!(handler.stats().zero_fills, 0);
}

#[test]
fn a_backing_file_that_cannot_be_read_fails_the_fault() {
    let (tx, rx) = std::sync::mpsc::channel();
    let Some(handler) = start(ThreadHooks {
        confine: Box::new(|| Ok(())),
        died: Box::new(move |why| {
            let _ = tx.send(why);
        }),
    }) else {
        return;
    };
    let table = table_with(handler.clone());
    // Opened write-only: every read fails with EBADF.
    let mut file = scratch_file("lazy");
    file.write_all(&[0x5a; 8192]).unwrap();
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let write_only = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    table
        .insert(
            RegionSpec {
                start: GuestAddress(0),
                size: MIB,
                capacity: MIB,
                backing: Backing::Lazy(LazySource::File {
                    file: Arc::new(write_only),
                    offset: 0,
                }),
            },
            None,
        )
        .unwrap();
    let host = table
        .try_lock_region(GuestAddress(0))
        .unwrap()
        .region()
        .host_addr();
    // The page is poisoned, not filled with zeros: the kernel's access fails.
    let result = within("a kernel read of the page", move || {
        kernel_read(host + PAGE_SIZE, PAGE_SIZE as usize)
    });
    assert_eq!(result, Err(libc::EFAULT));
    let stats = handler.stats();
    assert_eq!((stats.source_errors, stats.errors), (1, 0), "{stats:?}");
    assert_eq!(stats.file_fills + stats.zero_fills, 0, "{stats:?}");
    let why = rx
        .recv_timeout(FAULT_DEADLINE)
        .expect("the failure is reported");
    assert!(
        why.contains("backing file") && why.contains(&format!("{:#x}", host + PAGE_SIZE)),
        "{why}"
    );
}

#[test]
fn memory_shrunk_away_and_grown_back_reads_as_zeros() {
    let Some((table, _handler)) = lazy_table() else {
        return;
    };
    let mut file = scratch_file("lazy");
    file.write_all(&[0x5a; 4 * PAGE_SIZE as usize]).unwrap();
    let id = table
        .insert(
            RegionSpec {
                start: GuestAddress(0),
                size: 4 * PAGE_SIZE,
                capacity: 4 * PAGE_SIZE,
                backing: Backing::Lazy(LazySource::File {
                    file: Arc::new(file),
                    offset: 0,
                }),
            },
            None,
        )
        .unwrap();
    let tail = GuestAddress(3 * PAGE_SIZE);
    assert_eq!(read(&table, tail, 4), [0x5a; 4]);
    table.shrink(id, PAGE_SIZE, None).unwrap();
    table.grow(id, 2 * PAGE_SIZE, None).unwrap();
    table.shrink(id, PAGE_SIZE, None).unwrap();
    table.grow(id, 4 * PAGE_SIZE, None).unwrap();
    // Unplugged once: zeros, not the file.
    assert_eq!(read(&table, tail, 4), [0; 4]);
    assert_eq!(read(&table, GuestAddress(PAGE_SIZE), 4), [0; 4]);
    // What stayed plugged keeps the file's bytes.
    assert_eq!(read(&table, GuestAddress(0), 4), [0x5a; 4]);
}

#[test]
fn a_tail_shrunk_away_is_discarded_even_if_unregistering_it_fails() {
    let Some(handler) = start(ThreadHooks::default()) else {
        return;
    };
    let table = table_with(Arc::new(FailingUnregister(handler)));
    let id = table
        .insert(
            RegionSpec {
                start: GuestAddress(0),
                size: 2 * PAGE_SIZE,
                capacity: 2 * PAGE_SIZE,
                backing: Backing::Lazy(LazySource::Zero),
            },
            None,
        )
        .unwrap();
    write(&table, GuestAddress(PAGE_SIZE), b"old!");
    assert!(matches!(
        table.shrink(id, PAGE_SIZE, None),
        Err(TableError::Lazy(_))
    ));
    table.grow(id, 2 * PAGE_SIZE, None).unwrap();
    assert_eq!(read(&table, GuestAddress(PAGE_SIZE), 4), [0; 4]);
}

#[test]
fn dropping_the_handler_ends_its_thread_without_a_death_report() {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let Some(handler) = start(ThreadHooks {
        confine: Box::new(|| Ok(())),
        died: Box::new(move |why| {
            let _ = tx.send(why);
        }),
    }) else {
        return;
    };
    within("dropping the fault handler", move || drop(handler));
    // The thread has ended: its hooks are gone, and `died` was not called.
    assert_eq!(
        rx.recv_timeout(FAULT_DEADLINE),
        Err(RecvTimeoutError::Disconnected)
    );
}

#[test]
fn a_window_partly_present_still_fills_the_faulting_page() {
    let Some(handler) = start(ThreadHooks::default()) else {
        return;
    };
    let pages = (memory::uffd::FILL_WINDOW / PAGE_SIZE) as usize;
    let memory = Mapping::new(pages * PAGE_SIZE as usize);
    // A page in the middle of the window is present before the range is registered:
    // a fill of the whole window stops there.
    // SAFETY: a byte of our own mapping, not registered yet.
    unsafe { ((memory.start() + 5 * PAGE_SIZE) as *mut u8).write_volatile(1) };
    handler
        .register(LazyRange {
            host_start: memory.start(),
            len: memory.len as u64,
            source: LazySource::Zero,
            source_offset: 0,
        })
        .unwrap();
    let page = memory.start() + 7 * PAGE_SIZE;
    let read = within("a read past the present page", move || {
        kernel_read(page, PAGE_SIZE as usize)
    });
    assert_eq!(read, Ok(PAGE_SIZE as usize));
    // Counted just after the fill woke the reader.
    common::wait_for("the page-alone fill", FAULT_DEADLINE, || {
        handler.stats().zero_fills >= 1
    });
    handler
        .unregister(memory.start(), memory.len as u64)
        .unwrap();
}
