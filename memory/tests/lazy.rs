//! Lazily populated regions through userfaultfd.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use memory::{Backing, FaultHandler, LazyPages, LazySource, RegionSpec, RegionTable, TableConfig};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

fn lazy_table() -> Option<(RegionTable, Arc<FaultHandler>)> {
    match FaultHandler::start() {
        Ok(handler) => Some((
            RegionTable::new(
                Arc::new(memory::NoSlots),
                Some(handler.clone() as Arc<dyn LazyPages>),
                TableConfig::default(),
            ),
            handler,
        )),
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
    let mut buf = vec![0xffu8; 3 * 4096];
    table.read(GuestAddress(MIB), &mut buf, None).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // One fault fills the 64 KiB window around it: the three pages take one fault. The
    // handler counts a fill just after it wakes the faulting thread.
    common::wait_for("a zero fill", Duration::from_secs(10), || {
        handler.stats().zero_fills >= 1
    });
    assert_eq!(handler.stats().faults, 1, "{:?}", handler.stats());
    table.write(GuestAddress(2 * MIB), b"lazy", None).unwrap();
    let mut word = [0u8; 4];
    table.read(GuestAddress(2 * MIB), &mut word, None).unwrap();
    assert_eq!(&word, b"lazy");

    // Growth registers the new part; shrink and removal unregister.
    table.grow(id, 8 * MIB, None).unwrap();
    assert_eq!(handler.registered_ranges(), 2);
    table.read(GuestAddress(7 * MIB), &mut word, None).unwrap();
    assert_eq!(word, [0; 4]);
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
    let mut file = tempfile();
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
    let mut buf = vec![0u8; 2 * 4096 + 100];
    table.read(GuestAddress(MIB), &mut buf, None).unwrap();
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

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("kite-lazy-{}", std::process::id()));
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
    // table is gone; its range must not stay registered with the handler.
    table.write(GuestAddress(0), b"x", None).unwrap();
    assert_eq!(handler.registered_ranges(), 1);
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
