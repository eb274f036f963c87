//! virtio-mem's request handling, with host resizes in between: every driver request
//! (plug, unplug, unplug all, state, anything else) and every requested size comes from
//! the input. After each step the device's account matches the region table (one region
//! per plugged block), nothing is plugged outside the area, a plug is acknowledged only
//! within the requested size, and refused or failed requests change nothing.
#![no_main]

use std::sync::{Arc, OnceLock};

use devices::virtio::mem::{MemBacking, MemControl, BLOCK_SIZE, REQUEST_LEN};
use libfuzzer_sys::fuzz_target;
use memory::RegionTable;

const AREA: u64 = 4 << 30;
const AREA_SIZE: u64 = 64 << 20;
const ACK: u16 = 0;
const UNPLUG_ALL: u16 = 2;

/// Guest memory (just the hotplug area) and the device's host side.
fn setup() -> &'static (Arc<RegionTable>, Arc<MemControl>) {
    static SETUP: OnceLock<(Arc<RegionTable>, Arc<MemControl>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let table = Arc::new(RegionTable::default());
        let control =
            MemControl::new(Arc::clone(&table), AREA, AREA_SIZE, MemBacking::Anonymous).unwrap();
        (table, control)
    })
}

fn request(kind: u16, addr: u64, blocks: u16) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[..2].copy_from_slice(&kind.to_le_bytes());
    r[8..16].copy_from_slice(&addr.to_le_bytes());
    r[16..18].copy_from_slice(&blocks.to_le_bytes());
    r
}

fuzz_target!(|data: &[u8]| {
    let (table, c) = setup();
    // A clean device for each input.
    c.request(AREA_SIZE).unwrap();
    assert_eq!(
        c.handle_request(&request(UNPLUG_ALL, 0, 0))[..2],
        ACK.to_le_bytes()
    );
    c.request(0).unwrap();
    assert!(table.layout().is_empty());

    for step in data.chunks(REQUEST_LEN + 1) {
        let Some((&op, body)) = step.split_first() else {
            break;
        };
        let before = c.plugged();
        if op & 0x80 != 0 {
            // The host asks for a size: whole blocks within the area are taken.
            let size = u64::from(u16::from_le_bytes([
                body.first().copied().unwrap_or(0),
                op & 0x7f,
            ])) * BLOCK_SIZE;
            let accepted = c.request(size).is_ok();
            assert_eq!(accepted, size <= AREA_SIZE);
            assert_eq!(c.plugged(), before);
        } else {
            let mut req = [0u8; REQUEST_LEN];
            req[..body.len().min(REQUEST_LEN)]
                .copy_from_slice(&body[..body.len().min(REQUEST_LEN)]);
            // Keep addresses near the area often, so plugs can succeed.
            if op & 0x40 != 0 {
                let block = u64::from(req[8]) % (AREA_SIZE / BLOCK_SIZE + 2);
                req[8..16].copy_from_slice(&(AREA + block * BLOCK_SIZE).to_le_bytes());
                let blocks = u16::from(req[16] % 8);
                req[16..18].copy_from_slice(&blocks.to_le_bytes());
            }
            let kind = u16::from_le_bytes([req[0], req[1]]);
            let response = c.handle_request(&req);
            let status = u16::from_le_bytes([response[0], response[1]]);
            assert!(status <= 3, "response type {status}");
            let after = c.plugged();
            if status != ACK || kind > 2 {
                assert_eq!(
                    after, before,
                    "a refused request or a state query changes nothing"
                );
            }
            if kind == 0 && status == ACK {
                assert!(
                    after > before && after <= c.requested(),
                    "plugs stay within the request"
                );
            }
        }
        let plugged = c.plugged();
        assert!(plugged <= AREA_SIZE && plugged % BLOCK_SIZE == 0);
        assert_eq!(
            table.layout().len() as u64 * BLOCK_SIZE,
            plugged,
            "one region per plugged block"
        );
    }
});
