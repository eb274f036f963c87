//! Writer cost as regions pile up: plug 8 GiB in 2 MiB blocks (4096 regions, inside one
//! reserved area, as memory hotplug does), then unplug them all, timing every operation.
//! Per-operation cost must stay flat: the mean of the last 256 plugs within 2x of the
//! first 256 either way, and the same for unplugs (the first unplugs run with 4096
//! regions, the last with a handful). Lazy (userfaultfd) blocks when the fault handler can start, so
//! its registry is in the loop too; anonymous ones otherwise.
//!
//! `cargo bench -p memory --bench plug_scaling` (`KITE_BENCH_ROUNDS` rounds, default 3;
//! each round's ratios are printed, then the medians).

use std::sync::Arc;
use std::time::Instant;

use memory::{Backing, FaultHandler, LazyPages, LazySource, RegionSpec, RegionTable, TableConfig};
use vm_memory::GuestAddress;

const BLOCK: u64 = 2 << 20;
const BLOCKS: u64 = 4096;
/// Operations averaged at each end.
const EDGE: usize = 256;
const AREA_START: u64 = 1 << 32;

/// Mean of the last `EDGE` samples over the mean of the first `EDGE`.
fn last_over_first(ns: &[u64]) -> (f64, f64, f64) {
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len() as f64;
    let (first, last) = (mean(&ns[..EDGE]), mean(&ns[ns.len() - EDGE..]));
    (first, last, last / first)
}

fn round(lazy: Option<&Arc<FaultHandler>>) -> [(f64, f64, f64); 2] {
    let table = RegionTable::new(
        Arc::new(memory::NoSlots),
        lazy.map(|h| Arc::clone(h) as Arc<dyn LazyPages>),
        TableConfig::default(),
    );
    table
        .reserve_area(GuestAddress(AREA_START), BLOCKS * BLOCK, None)
        .unwrap();
    let backing = match lazy {
        Some(_) => Backing::Lazy(LazySource::Zero),
        None => Backing::Anonymous,
    };
    let mut plug = Vec::with_capacity(BLOCKS as usize);
    let mut ids = Vec::with_capacity(BLOCKS as usize);
    for i in 0..BLOCKS {
        let spec = RegionSpec {
            start: GuestAddress(AREA_START + i * BLOCK),
            size: BLOCK,
            capacity: BLOCK,
            backing: backing.clone(),
        };
        let started = Instant::now();
        ids.push(table.insert(spec, None).unwrap());
        plug.push(started.elapsed().as_nanos() as u64);
    }
    let mut unplug = Vec::with_capacity(BLOCKS as usize);
    for id in ids {
        let started = Instant::now();
        table.remove(id, None).unwrap();
        unplug.push(started.elapsed().as_nanos() as u64);
    }
    [last_over_first(&plug), last_over_first(&unplug)]
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let rounds: usize = std::env::var("KITE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let handler = FaultHandler::start().ok();
    println!(
        "plug then unplug {BLOCKS} blocks of 2 MiB ({} blocks), {rounds} rounds; mean of the \
         first and last {EDGE} operations of each",
        if handler.is_some() {
            "lazy"
        } else {
            "anonymous"
        }
    );
    let mut ratios = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        let results = round(handler.as_ref());
        for (k, (name, (first, last, ratio))) in ["plug", "unplug"].iter().zip(results).enumerate()
        {
            println!(
                "  round {r} {name:>6}: first {:>7.1} us  last {:>7.1} us  last/first {ratio:.2}",
                first / 1e3,
                last / 1e3
            );
            ratios[k].push(ratio);
        }
    }
    for (name, mut r) in ["plug", "unplug"].into_iter().zip(ratios) {
        r.sort_by(f64::total_cmp);
        let median = r[r.len() / 2];
        // Flat either way: growing with the regions shows in plugs, in unplugs as a
        // ratio below one.
        let spread = median.max(1.0 / median);
        println!(
            "{name} cost, last {EDGE} / first {EDGE} (median): {median:.2}, spread {spread:.2} \
             (target <= 2: {})",
            if spread <= 2.0 { "met" } else { "MISSED" }
        );
    }
}
