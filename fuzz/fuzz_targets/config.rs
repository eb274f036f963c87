//! Kite's configuration as a user writes it: a `--config` JSON file and the values of
//! `--memory`, `--cpus`, `--disk` and sizes. Parsing never panics; what parses survives a
//! round trip (written out and read again, it is the same), and validation never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config::{CpusConfig, DiskConfig, MemoryConfig, Size, VmConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = serde_json::from_slice::<VmConfig>(data) {
        let _ = config.validate();
        let written = serde_json::to_string(&config).unwrap();
        let read: VmConfig = serde_json::from_str(&written).unwrap();
        assert_eq!(read, config, "{written}");
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(size) = text.parse::<Size>() {
        assert_eq!(size.to_string().parse::<Size>(), Ok(size), "{text}");
    }
    if let Ok(memory) = text.parse::<MemoryConfig>() {
        let config = VmConfig {
            memory,
            ..VmConfig::default()
        };
        let _ = config.validate();
    }
    let _ = text.parse::<CpusConfig>();
    let _ = text.parse::<DiskConfig>();
});
