//! Reserved areas: one memory slot for the whole area, regions inside it that never
//! change a slot, and removal that still takes the memory away.

mod common;

use std::sync::Arc;

use common::lazy::{read, write, FailingUnregister};
use common::slots::RecordingSlots;
use memory::{
    Backing, FaultHandler, LazyPages, LazySource, LookupError, RegionError, RegionSpec,
    RegionTable, TableConfig, TableError,
};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const AREA: u64 = 1 << 32;
const AREA_SIZE: u64 = 64 * MIB;

fn block(index: u64, backing: Backing) -> RegionSpec {
    RegionSpec {
        start: GuestAddress(AREA + index * 8 * MIB),
        size: 8 * MIB,
        capacity: 8 * MIB,
        backing,
    }
}

/// Pages of `[host, host + len)` resident in memory.
fn resident_pages(host: u64, len: u64) -> usize {
    let mut vec = vec![0u8; (len / 4096) as usize];
    // SAFETY: mincore only reads the page tables of the range and writes one byte per
    // page into `vec`, which has that many.
    let rc = unsafe { libc::mincore(host as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 != 0).count()
}

/// 16 MiB of RAM at 0, then the test area.
fn ram_and_area(table: &RegionTable) {
    table
        .insert(RegionSpec::anonymous(GuestAddress(0), 16 * MIB), None)
        .unwrap();
    table
        .reserve_area(GuestAddress(AREA), AREA_SIZE, None)
        .unwrap();
}

#[test]
fn regions_in_an_area_share_its_slot_and_never_change_a_slot() {
    let slots = Arc::new(RecordingSlots::default());
    let table = RegionTable::new(slots.clone(), None, TableConfig::default());
    ram_and_area(&table);
    let calls = slots.calls();
    assert_eq!(calls.len(), 2, "RAM's slot, then the area's: {calls:?}");
    let area_slot = calls[1].1;
    assert_eq!((area_slot.guest_addr, area_slot.size), (AREA, AREA_SIZE));
    assert_ne!(area_slot.slot, calls[0].1.slot);

    let first = table.insert(block(0, Backing::Anonymous), None).unwrap();
    let second = table.insert(block(3, Backing::Anonymous), None).unwrap();
    table
        .write(GuestAddress(AREA + 8 * MIB - 2), b"ab", None)
        .unwrap();
    table
        .write(GuestAddress(AREA + 24 * MIB), b"cd", None)
        .unwrap();
    let mut two = [0u8; 2];
    table
        .read(GuestAddress(AREA + 24 * MIB), &mut two, None)
        .unwrap();
    assert_eq!(&two, b"cd");
    // Between the blocks: inside the area, but no region.
    assert!(matches!(
        table.lock_region(GuestAddress(AREA + 8 * MIB), None),
        Err(LookupError::NotMapped { .. })
    ));
    let host = {
        let guard = table.lock_region(GuestAddress(AREA), None).unwrap();
        assert_eq!(guard.region().slot(), area_slot.slot);
        assert_eq!(guard.region().host_addr(), area_slot.host_addr);
        guard.region().host_addr()
    };
    assert!(resident_pages(host, 8 * MIB) > 0);

    table.remove(first, None).unwrap();
    assert_eq!(
        slots.calls().len(),
        2,
        "no slot changed: {:?}",
        slots.calls()
    );
    assert_eq!(resident_pages(host, 8 * MIB), 0, "the memory was freed");
    assert!(matches!(
        table.write(GuestAddress(AREA), b"x", None),
        Err(memory::CopyError::Lookup {
            source: LookupError::NotMapped { .. },
            ..
        })
    ));
    // Plugged again: the same place, fresh zeroed memory.
    table.insert(block(0, Backing::Anonymous), None).unwrap();
    table
        .read(GuestAddress(AREA + 8 * MIB - 2), &mut two, None)
        .unwrap();
    assert_eq!(two, [0, 0]);
    table.remove(second, None).unwrap();
    assert_eq!(
        slots.calls().len(),
        2,
        "no slot changed: {:?}",
        slots.calls()
    );
}

#[test]
fn regions_in_an_area_grow_and_shrink_without_slot_changes() {
    let slots = Arc::new(RecordingSlots::default());
    let table = RegionTable::new(slots.clone(), None, TableConfig::default());
    table
        .reserve_area(GuestAddress(AREA), AREA_SIZE, None)
        .unwrap();
    let id = table
        .insert(
            RegionSpec {
                size: 2 * MIB,
                ..block(1, Backing::Anonymous)
            },
            None,
        )
        .unwrap();
    let end = GuestAddress(AREA + 8 * MIB + 6 * MIB);
    assert!(table.write(end, b"x", None).is_err());
    table.grow(id, 8 * MIB, None).unwrap();
    table.write(end, b"x", None).unwrap();
    table.shrink(id, 4 * MIB, None).unwrap();
    assert!(table.write(end, b"x", None).is_err());
    assert_eq!(
        slots.calls().len(),
        1,
        "only the area's slot: {:?}",
        slots.calls()
    );
}

#[test]
fn areas_reject_straddling_regions_overlaps_and_memfd() {
    let table = RegionTable::default();
    ram_and_area(&table);
    let straddling = RegionSpec::anonymous(GuestAddress(AREA - 4 * MIB), 8 * MIB);
    assert!(matches!(
        table.insert(straddling, None),
        Err(TableError::StraddlesArea { .. })
    ));
    let past_the_end = RegionSpec::anonymous(GuestAddress(AREA + AREA_SIZE - MIB), 2 * MIB);
    assert!(matches!(
        table.insert(past_the_end, None),
        Err(TableError::StraddlesArea { .. })
    ));
    assert!(matches!(
        table.reserve_area(GuestAddress(AREA + MIB), MIB, None),
        Err(TableError::StraddlesArea { .. })
    ));
    assert!(matches!(
        table.reserve_area(GuestAddress(8 * MIB), 16 * MIB, None),
        Err(TableError::Overlap { .. })
    ));
    assert!(matches!(
        table.reserve_area(GuestAddress(AREA << 1), 4095, None),
        Err(TableError::Region(RegionError::Mapping(
            memory::MappingError::Unaligned { .. }
        )))
    ));
    assert!(matches!(
        table.insert(block(0, Backing::Memfd), None),
        Err(TableError::Region(RegionError::MemfdInArea(_)))
    ));
    // Nothing was left behind by the refusals: the whole area is still free.
    for i in 0..AREA_SIZE / (8 * MIB) {
        table.insert(block(i, Backing::Anonymous), None).unwrap();
    }
}

#[test]
fn lazy_regions_in_an_area_fill_on_first_touch() {
    let handler = match FaultHandler::start() {
        Ok(handler) => handler,
        Err(e) => {
            eprintln!("SKIPPED: no userfaultfd here: {e}");
            assert!(
                std::env::var_os("KITE_NO_SKIPS").is_none(),
                "CI must have userfaultfd"
            );
            return;
        }
    };
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        Some(handler.clone() as Arc<dyn LazyPages>),
        TableConfig::default(),
    ));
    table
        .reserve_area(GuestAddress(AREA), AREA_SIZE, None)
        .unwrap();
    let id = table
        .insert(block(2, Backing::Lazy(LazySource::Zero)), None)
        .unwrap();
    let at = GuestAddress(AREA + 16 * MIB + 5 * MIB);
    assert_eq!(read(&table, at, 4), [0; 4]);
    write(&table, at, b"lazy");
    assert_eq!(read(&table, at, 4), b"lazy");
    assert!(handler.stats().faults >= 1);
    table.remove(id, None).unwrap();
    assert_eq!(handler.registered_ranges(), 0);
    // Back again, and empty again.
    table
        .insert(block(2, Backing::Lazy(LazySource::Zero)), None)
        .unwrap();
    assert_eq!(read(&table, at, 4), [0; 4]);
    assert_eq!(handler.stats().errors, 0);
}

#[test]
fn a_block_removed_with_a_failed_unregistration_leaves_no_bytes_behind() {
    let handler = match FaultHandler::start() {
        Ok(handler) => handler,
        Err(e) => {
            eprintln!("SKIPPED: no userfaultfd here: {e}");
            assert!(
                std::env::var_os("KITE_NO_SKIPS").is_none(),
                "CI must have userfaultfd"
            );
            return;
        }
    };
    let table = Arc::new(RegionTable::new(
        Arc::new(memory::NoSlots),
        Some(Arc::new(FailingUnregister(handler))),
        TableConfig::default(),
    ));
    table
        .reserve_area(GuestAddress(AREA), AREA_SIZE, None)
        .unwrap();
    let id = table
        .insert(block(2, Backing::Lazy(LazySource::Zero)), None)
        .unwrap();
    let at = GuestAddress(AREA + 16 * MIB + 5 * MIB);
    write(&table, at, b"old!");
    assert!(matches!(table.remove(id, None), Err(TableError::Lazy(_))));
    // The same pages of the area, plugged in again: empty.
    table.insert(block(2, Backing::Anonymous), None).unwrap();
    assert_eq!(read(&table, at, 4), [0; 4]);
}
