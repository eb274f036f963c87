//! Guest memory saved to a sparse file and brought back, eagerly and lazily.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use memory::persist::{self, PersistError, SavedRange};
use memory::{Backing, FaultHandler, LazySource, RegionSpec, RegionTable, TableConfig, PAGE_SIZE};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

fn table(lazy: Option<Arc<FaultHandler>>) -> RegionTable {
    RegionTable::new(
        Arc::new(memory::NoSlots),
        lazy.map(|l| l as Arc<dyn memory::LazyPages>),
        TableConfig::default(),
    )
}

/// Two regions, a few pages of each written (one page of zeros written too).
fn written_table() -> (RegionTable, Vec<(u64, Vec<u8>)>) {
    let t = table(None);
    t.insert(RegionSpec::anonymous(GuestAddress(0), 8 * MIB), None)
        .unwrap();
    t.insert(RegionSpec::anonymous(GuestAddress(64 * MIB), 4 * MIB), None)
        .unwrap();
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, vec![0x11; 100]),
        (
            3 * MIB + 5,
            (0..9000u32).map(|i| (i % 251) as u8 + 1).collect(),
        ),
        (8 * MIB - 8, vec![0x22; 8]),
        (64 * MIB + 2 * MIB, vec![0x33; PAGE_SIZE as usize]),
        // Zeros written: a page touched, holding nothing.
        (64 * MIB + 3 * MIB, vec![0; PAGE_SIZE as usize]),
    ];
    for (addr, bytes) in &writes {
        t.write(GuestAddress(*addr), bytes, None).unwrap();
    }
    (t, writes)
}

fn check(t: &RegionTable, writes: &[(u64, Vec<u8>)]) {
    for (addr, bytes) in writes {
        let mut back = vec![0xffu8; bytes.len()];
        t.read(GuestAddress(*addr), &mut back, None).unwrap();
        assert_eq!(&back, bytes, "the bytes at {addr:#x}");
    }
    // And a page never written reads as zeros.
    let mut page = vec![0xffu8; PAGE_SIZE as usize];
    t.read(GuestAddress(5 * MIB), &mut page, None).unwrap();
    assert!(page.iter().all(|b| *b == 0));
}

#[test]
fn a_saved_table_is_sparse_and_loads_back() {
    let (t, writes) = written_table();
    let file = tempfile::tempfile().unwrap();
    let saved = persist::save(&t, &file, None).unwrap();
    assert_eq!(
        saved.ranges,
        vec![
            SavedRange {
                guest_addr: 0,
                size: 8 * MIB,
                file_offset: 0
            },
            SavedRange {
                guest_addr: 64 * MIB,
                size: 4 * MIB,
                file_offset: 8 * MIB
            },
        ]
    );
    // Pages with data: 1 + 3 (9000 bytes from 3 MiB + 5) + 1 + 1; the zero page is a hole.
    assert_eq!(saved.data_bytes, 6 * PAGE_SIZE);
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), 12 * MIB);
    assert!(
        meta.blocks() * 512 <= 6 * PAGE_SIZE + 64 * 1024,
        "only the data is on disk: {} bytes allocated",
        meta.blocks() * 512
    );

    let back = table(None);
    back.insert(RegionSpec::anonymous(GuestAddress(0), 8 * MIB), None)
        .unwrap();
    back.insert(RegionSpec::anonymous(GuestAddress(64 * MIB), 4 * MIB), None)
        .unwrap();
    let read = persist::load(&back, &file, &saved.ranges, None).unwrap();
    assert_eq!(read, 6 * PAGE_SIZE);
    check(&back, &writes);
}

#[test]
fn a_saved_table_comes_back_lazily() {
    let (t, writes) = written_table();
    let file = tempfile::tempfile().unwrap();
    let saved = persist::save(&t, &file, None).unwrap();
    let handler = match FaultHandler::start() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED: no userfaultfd here: {e}");
            assert!(std::env::var_os("KITE_NO_SKIPS").is_none(), "{e}");
            return;
        }
    };
    let file = Arc::new(file);
    let back = table(Some(handler.clone()));
    for range in &saved.ranges {
        back.insert(
            RegionSpec {
                start: GuestAddress(range.guest_addr),
                size: range.size,
                capacity: range.size,
                backing: Backing::Lazy(LazySource::File {
                    file: Arc::clone(&file),
                    offset: range.file_offset,
                }),
            },
            None,
        )
        .unwrap();
    }
    // A snapshot of the restored table, before the guest touched anything, is the same
    // as the first: pages not filled yet are copied from the file, without filling
    // them (no fault).
    let again = tempfile::tempfile().unwrap();
    let resaved = persist::save(&back, &again, None).unwrap();
    assert_eq!(resaved, saved);
    assert_eq!(handler.stats().faults, 0, "saving filled no page");
    let bytes = |f: &std::fs::File| {
        use std::os::unix::fs::FileExt;
        let mut all = vec![0u8; 12 * MIB as usize];
        f.read_exact_at(&mut all, 0).unwrap();
        all
    };
    assert!(bytes(&again) == bytes(&file), "the same bytes");
    check(&back, &writes);
    assert!(
        handler.stats().faults > 0,
        "pages came through the fault handler"
    );
}

#[test]
fn a_short_or_mismatched_file_is_refused() {
    let (t, _) = written_table();
    let file = tempfile::tempfile().unwrap();
    let saved = persist::save(&t, &file, None).unwrap();
    file.set_len(12 * MIB - PAGE_SIZE).unwrap();
    let back = table(None);
    back.insert(RegionSpec::anonymous(GuestAddress(0), 8 * MIB), None)
        .unwrap();
    assert!(matches!(
        persist::load(&back, &file, &saved.ranges, None),
        Err(PersistError::Short { len, needed }) if len == 12 * MIB - PAGE_SIZE && needed == 12 * MIB
    ));
    file.set_len(12 * MIB).unwrap();
    // The second range has no region here.
    assert!(matches!(
        persist::load(&back, &file, &saved.ranges, None),
        Err(PersistError::Lookup { addr, .. }) if addr == 64 * MIB
    ));
    // A region of another size is not the range.
    back.insert(RegionSpec::anonymous(GuestAddress(64 * MIB), 2 * MIB), None)
        .unwrap();
    assert!(matches!(
        persist::load(&back, &file, &saved.ranges, None),
        Err(PersistError::NoSuchRegion { guest_addr, .. }) if guest_addr == 64 * MIB
    ));
}

/// A private mapping of a saved file (`Backing::File`), on its own and inside an area:
/// the file's bytes, the guest's writes kept from the file, and memory taken away and
/// given back reading as zeros, not as the file (guarantee 13).
#[test]
fn a_private_file_mapping_reads_the_file_and_never_writes_it() {
    let (t, writes) = written_table();
    let file = tempfile::tempfile().unwrap();
    let saved = persist::save(&t, &file, None).unwrap();
    let file = Arc::new(file);
    let before = std::fs::read(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        file.as_raw_fd()
    }))
    .unwrap();
    let back = table(None);
    // The first range as a region of its own, the second inside an area.
    let [own, in_area] = [saved.ranges[0], saved.ranges[1]];
    let spec = |range: SavedRange| RegionSpec {
        start: GuestAddress(range.guest_addr),
        size: range.size,
        capacity: range.size,
        backing: Backing::File {
            file: Arc::clone(&file),
            offset: range.file_offset,
        },
    };
    back.insert(spec(own), None).unwrap();
    back.reserve_area(GuestAddress(in_area.guest_addr), 8 * MIB, None)
        .unwrap();
    let block = back.insert(spec(in_area), None).unwrap();
    check(&back, &writes);
    back.write(GuestAddress(0), &[0x99; 64], None).unwrap();
    back.write(
        GuestAddress(in_area.guest_addr + 2 * MIB),
        &[0x98; 64],
        None,
    )
    .unwrap();
    let after = std::fs::read(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        file.as_raw_fd()
    }))
    .unwrap();
    assert!(before == after, "the guest's writes stay out of the file");
    // The block goes, and anonymous memory plugged in its place reads as zeros.
    back.remove(block, None).unwrap();
    back.insert(
        RegionSpec::anonymous(GuestAddress(in_area.guest_addr), in_area.size),
        None,
    )
    .unwrap();
    let mut page = vec![0xffu8; PAGE_SIZE as usize];
    back.read(GuestAddress(in_area.guest_addr + 2 * MIB), &mut page, None)
        .unwrap();
    assert!(
        page.iter().all(|b| *b == 0),
        "memory plugged again reads as zeros, not as the file"
    );
}
