//! The control socket's requests: any bytes, as a client sends them. Every reply says
//! whether it succeeded, an error carries a message, and a resize is accepted only for a
//! size the hotplug area can take.
#![no_main]

use std::sync::{Arc, OnceLock};

use devices::virtio::mem::{MemBacking, MemControl};
use libfuzzer_sys::fuzz_target;
use memory::{RegionSpec, RegionTable};
use serde_json::Value;
use vm_memory::GuestAddress;
use vmm::api::{handle, ApiContext};

const BOOT: u64 = 64 << 20;
const AREA_SIZE: u64 = 128 << 20;

fn context() -> &'static ApiContext {
    static CONTEXT: OnceLock<ApiContext> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let table = Arc::new(RegionTable::default());
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), BOOT), None)
            .unwrap();
        let hotplug = MemControl::new(
            Arc::clone(&table),
            4 << 30,
            AREA_SIZE,
            MemBacking::Anonymous,
        )
        .unwrap();
        ApiContext {
            table,
            boot_memory: BOOT,
            hotplug: Some(hotplug),
            faults: None,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<Value>(data) else {
        return; // the server answers "not JSON" itself
    };
    let context = context();
    let reply = handle(&request, context);
    let ok = reply["ok"].as_bool().expect("every reply says ok or not");
    if !ok {
        assert!(reply["error"].is_string(), "{reply}");
    }
    if ok && request["command"] == "resize" {
        let requested = context.hotplug.as_ref().unwrap().requested();
        assert!(requested <= AREA_SIZE, "{request} -> {requested}");
    }
});
