//! The deadlock the region table exists to avoid, shown.
//!
//! Scenario: a reader holds a lock while it copies into lazily populated memory; a
//! writer queues for the lock; the copy faults, and the fault handler must look the
//! page up. With one global reader-writer lock held across the copy, the handler's
//! read lock queues behind the writer, which waits for the reader, which waits for the
//! handler: the watchdog reports the deadlock. With the region table the handler's
//! lookup takes no lock, the copy finishes, and the writer proceeds.

mod common;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::host::Mapping;
use common::lazy::FAULT_DEADLINE;
use common::{wait_for, Watchdog};
use memory::{
    Backing, FaultHandler, LazyPages, LazySource, LookupError, MemorySlots, RegionSpec,
    RegionTable, SlotError, SlotMapping, TableConfig,
};
use parking_lot::RwLock;
use vm_memory::{Bytes, GuestAddress, MemoryRegionAddress};

const STALL: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(60);
const PAGE: usize = 4096;

fn uffd_available() -> bool {
    match userfaultfd::UffdBuilder::new()
        .user_mode_only(false)
        .create()
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: no userfaultfd here: {e}");
            assert!(
                std::env::var_os("KITE_NO_SKIPS").is_none(),
                "CI must have userfaultfd"
            );
            false
        }
    }
}

#[test]
fn global_rwlock_across_a_faulting_copy_deadlocks() {
    if !uffd_available() {
        return;
    }
    // "Guest memory" behind one global lock: a map of regions (name -> host mapping).
    let mapping = Arc::new(Mapping::new(16 * PAGE));
    let lock = Arc::new(RwLock::new(BTreeMap::from([(0u64, mapping.addr as u64)])));
    let uffd = Arc::new(
        userfaultfd::UffdBuilder::new()
            .user_mode_only(false)
            .non_blocking(true)
            .create()
            .unwrap(),
    );
    uffd.register(mapping.addr.cast(), mapping.len).unwrap();

    let abort = Arc::new(AtomicBool::new(false));
    let abort_on_stall = abort.clone();
    let watchdog = Watchdog::start(STALL, move |_| abort_on_stall.store(true, Ordering::SeqCst));
    let (reader_p, writer_p) = (watchdog.worker("reader"), watchdog.worker("writer"));

    // The fault handler looks the region up under the global lock, as a design with
    // only a global lock must.
    let handler = {
        let (lock, uffd, abort) = (lock.clone(), uffd.clone(), abort.clone());
        std::thread::spawn(move || {
            let mut served = 0;
            while served == 0 {
                let mut pfd = libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the call's duration.
                unsafe { libc::poll(&mut pfd, 1, 10) };
                while let Ok(Some(userfaultfd::Event::Pagefault { addr, .. })) = uffd.read_event() {
                    let page = (addr as usize & !(PAGE - 1)) as *mut libc::c_void;
                    // Wait for the read lock, but let the watchdog break the deadlock.
                    loop {
                        if let Some(map) = lock.try_read_for(Duration::from_millis(10)) {
                            assert!(map.contains_key(&0));
                            break;
                        }
                        if abort.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    // SAFETY: `page` lies in the registered mapping.
                    unsafe { uffd.zeropage(page, PAGE, true) }.unwrap();
                    served += 1;
                }
            }
        })
    };

    let writer_queued = Arc::new(AtomicBool::new(false));
    let reader = {
        let (lock, writer_queued) = (lock.clone(), writer_queued.clone());
        std::thread::spawn(move || {
            let map = lock.read();
            reader_p.tick();
            wait_for("the writer to queue", DEADLINE, || {
                writer_queued.load(Ordering::SeqCst) && lock.is_locked_exclusive()
            });
            // The copy faults while the global read lock is held.
            let host = *map.get(&0).unwrap() as *mut u8;
            // SAFETY: `host` points into the live mapping; the write faults and blocks
            // until the handler fills the page.
            unsafe { host.add(3 * PAGE).write_volatile(0x5a) };
            reader_p.tick();
            drop(map);
            reader_p.finish();
        })
    };
    let writer = {
        let lock = lock.clone();
        std::thread::spawn(move || {
            wait_for("the reader to hold the lock", DEADLINE, || {
                lock.try_write().is_none()
            });
            writer_p.tick();
            writer_queued.store(true, Ordering::SeqCst);
            let mut map = lock.write();
            map.insert(1, 0);
            writer_p.tick();
            writer_p.finish();
        })
    };
    reader.join().unwrap();
    writer.join().unwrap();
    handler.join().unwrap();
    let report = watchdog
        .finish()
        .expect("the global-lock design must deadlock");
    assert!(report.stalled.contains(&"reader".to_owned()), "{report}");
    assert!(report.stalled.contains(&"writer".to_owned()), "{report}");
}

#[test]
fn region_table_survives_the_same_scenario() {
    if !uffd_available() {
        return;
    }
    let handler = FaultHandler::start().unwrap();
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        Some(handler.clone() as Arc<dyn LazyPages>),
        TableConfig::default(),
    ));
    let id = table
        .insert(
            RegionSpec {
                start: GuestAddress(0),
                size: 16 * PAGE as u64,
                capacity: 16 * PAGE as u64,
                backing: Backing::Lazy(LazySource::Zero),
            },
            None,
        )
        .unwrap();

    let watchdog = Watchdog::start(STALL, |_| {});
    let (reader_p, writer_p) = (watchdog.worker("reader"), watchdog.worker("writer"));
    let reader_holds = Arc::new(AtomicBool::new(false));
    let reader = {
        let (table, reader_holds) = (table.clone(), reader_holds.clone());
        std::thread::spawn(move || {
            let guard = table.lock_region(GuestAddress(0), None).unwrap();
            reader_holds.store(true, Ordering::SeqCst);
            reader_p.tick();
            // Wait until the writer has unpublished the region and waits for us.
            wait_for("the writer to wait for readers", DEADLINE, || {
                table.metrics().writers_draining == 1
            });
            assert!(matches!(
                table.try_lock_region(GuestAddress(0)),
                Err(LookupError::Removed { .. } | LookupError::NotMapped { .. })
            ));
            // The copy faults while the guard is held; the handler fills the page
            // without any table lock.
            guard
                .write_obj(0x5au8, MemoryRegionAddress(3 * PAGE as u64))
                .unwrap();
            reader_p.tick();
            drop(guard);
            reader_p.finish();
        })
    };
    let writer = {
        let table = table.clone();
        std::thread::spawn(move || {
            wait_for("the reader to hold its guard", DEADLINE, || {
                reader_holds.load(Ordering::SeqCst)
            });
            writer_p.tick();
            table.remove(id, None).unwrap();
            writer_p.tick();
            writer_p.finish();
        })
    };
    // A reader stuck in a fault nobody serves fails the test instead of hanging it.
    wait_for(
        "the reader and the writer to end",
        2 * STALL + FAULT_DEADLINE,
        || reader.is_finished() && writer.is_finished(),
    );
    reader.join().unwrap();
    writer.join().unwrap();
    if let Some(report) = watchdog.finish() {
        panic!("the region table stalled:\n{report}");
    }
    assert!(handler.stats().zero_fills >= 1);
    assert_eq!(table.metrics().writers_draining, 0);
    assert!(matches!(
        table.read(GuestAddress(0), &mut [0u8; 1], None),
        Err(memory::CopyError::Lookup {
            source: LookupError::NotMapped { .. },
            ..
        })
    ));
}

/// Slots whose `map` calls a writer of the same table, as a careless hypervisor
/// binding might: a writer waiting for itself.
struct ReentrantSlots(std::sync::OnceLock<std::sync::Weak<RegionTable>>);

impl MemorySlots for ReentrantSlots {
    fn map(&self, m: &SlotMapping) -> Result<(), SlotError> {
        if let Some(table) = self.0.get().and_then(std::sync::Weak::upgrade) {
            let next = RegionSpec::anonymous(GuestAddress(m.guest_addr + m.size), PAGE as u64);
            let _ = table.insert(next, None);
        }
        Ok(())
    }
    fn unmap(&self, _: &SlotMapping) -> Result<(), SlotError> {
        Ok(())
    }
}

#[test]
fn a_writer_called_from_a_writer_panics_naming_the_table_lock() {
    if !memory::lockdep::ENABLED {
        return;
    }
    let slots = Arc::new(ReentrantSlots(std::sync::OnceLock::new()));
    let table = Arc::new(RegionTable::new(
        slots.clone(),
        None,
        TableConfig::default(),
    ));
    slots.0.set(Arc::downgrade(&table)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let insert = std::panic::AssertUnwindSafe(|| {
            table.insert(RegionSpec::anonymous(GuestAddress(0), PAGE as u64), None)
        });
        let message = std::panic::catch_unwind(insert).err().map(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "a panic without a message".into())
        });
        let _ = tx.send(message);
    });
    let message = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the nested writer hangs instead of panicking")
        .expect("the nested writer goes on instead of panicking");
    assert!(
        message.contains("table lock (write) taken while holding table lock (write)"),
        "{message}"
    );
}
