use super::*;
use crate::config::{MAX_CMDLINE, MAX_VIRTIO_DEVICES};

const GIB: u64 = 1 << 30;

fn parse(body: &Value) -> Result<VmConfig, VmConfigError> {
    parse_vm_config(body.to_string().as_bytes())
}

/// The smallest body Kite takes.
fn minimal() -> Value {
    json!({"payload": {"kernel": "/k/vmlinux"}})
}

/// `minimal()` with a disk, an rng, a console and a serial port, so that every
/// section's keys can be set.
fn full() -> Value {
    json!({
        "payload": {"kernel": "/k/vmlinux"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": GIB},
        "disks": [{"path": "/img/root.raw"}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "debug_console": {"mode": "Off"},
    })
}

/// `body` with `value` at the JSON pointer `at` (its parent must exist).
fn with(mut body: Value, at: &str, value: Value) -> Value {
    let (parent, key) = at.rsplit_once('/').unwrap();
    let parent = body.pointer_mut(parent).unwrap();
    match parent {
        Value::Object(map) => {
            map.insert(key.to_string(), value);
        }
        Value::Array(list) => list[key.parse::<usize>().unwrap()] = value,
        _ => panic!("{at}: no parent"),
    }
    body
}

/// `body` without the key at `at`.
fn without(mut body: Value, at: &str) -> Value {
    let (parent, key) = at.rsplit_once('/').unwrap();
    body.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
    body
}

#[track_caller]
fn refused(body: &Value, field: &str) -> VmConfigError {
    let e = parse(body).expect_err(field);
    assert_eq!(e.field(), Some(field), "{e}");
    assert!(e.to_string().starts_with(&format!("{field}: ")), "{e}");
    e
}

#[test]
fn hand_written_body_parses() {
    // What one writes for `ch-remote create`: the supported sections, nulls and empty
    // lists for devices the VM has none of.
    let c = parse(&json!({
        "payload": {
            "kernel": "/k/vmlinux",
            "initramfs": "/k/initramfs.cpio",
            "cmdline": "console=ttyS0 reboot=k panic=1"
        },
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": GIB, "hotplug_method": "VirtioMem", "hotplug_size": 2 * GIB,
                   "hotplugged_size": 256 << 20},
        "disks": [{"path": "/img/root.raw", "readonly": true}, {"path": "/img/data.raw"}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "net": null, "fs": null, "pmem": [], "devices": [], "vsock": null, "numa": null,
        "balloon": null, "iommu": false, "watchdog": false, "pvpanic": false
    }))
    .unwrap();
    assert_eq!(
        c,
        VmConfig {
            kernel: Some("/k/vmlinux".into()),
            initramfs: Some("/k/initramfs.cpio".into()),
            cmdline: Some("console=ttyS0 reboot=k panic=1".into()),
            cpus: CpusConfig { boot: 2 },
            memory: MemoryConfig {
                size: Size(GIB),
                hotplug_size: Some(Size(2 * GIB)),
                hotplug_backing: HotplugBacking::Anon,
                hotplugged_size: Some(Size(256 << 20)),
                thp: false,
            },
            disks: vec![
                DiskConfig {
                    path: "/img/root.raw".into(),
                    readonly: true
                },
                DiskConfig {
                    path: "/img/data.raw".into(),
                    readonly: false
                },
            ],
            rng: true,
            serial: SerialMode::Tty,
        }
    );
}

#[test]
fn generated_body_with_every_default_parses() {
    // What an OpenAPI-generated client (Kata's Go client: NewVmConfig, NewCpusConfig,
    // NewMemoryConfig, NewDiskConfig, ... fill in the schema's defaults) sends in debug
    // mode, virtio-mem hotplug, a read-only root disk: every default spelled out.
    let c = parse(&json!({
        "payload": {"kernel": "/opt/kata/vmlinux", "cmdline": "root=/dev/vda1 console=ttyS0,115200n8 quiet", "firmware": null, "igvm": null},
        "cpus": {"boot_vcpus": 4, "max_vcpus": 4,
                 "topology": {"threads_per_core": 1, "cores_per_die": 4, "dies_per_package": 1, "packages": 1},
                 "kvm_hyperv": false, "max_phys_bits": 46, "nested": true, "affinity": null,
                 "features": {"amx": false}, "core_scheduling": "Vm", "profile": "Host"},
        "memory": {"size": 2 * GIB, "mergeable": false, "hotplug_method": "VirtioMem",
                   "hotplug_size": 4 * GIB, "shared": false, "hugepages": false,
                   "hugepage_size": null, "prefault": false, "reserve": false, "thp": true,
                   "zones": null},
        "disks": [{"path": "/opt/kata/root.img", "readonly": true, "direct": false,
                   "iommu": false, "num_queues": 1, "queue_size": 128, "vhost_user": false,
                   "vhost_socket": null, "rate_limiter_config": null, "id": null,
                   "pci_segment": 0, "backing_files": false, "sparse": true,
                   "image_type": "Raw", "lock_granularity": "ByteRange",
                   "disable_io_uring": false, "disable_aio": false}],
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off", "iommu": false},
        "debug_console": {"mode": "Off", "iobase": 233},
        "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false,
        "net": [], "fs": null, "pmem": null, "devices": null, "user_devices": null,
        "vdpa": null, "vsock": null, "numa": null, "sgx_epc": null, "platform": null,
        "tpm": null, "rate_limit_groups": null, "pci_segments": null, "rtc": null,
        "generic_vhost_user": null, "landlock_rules": null, "balloon": null
    }))
    .unwrap();
    assert_eq!(c.cpus.boot, 4);
    assert_eq!(c.memory.size, Size(2 * GIB));
    assert_eq!(c.memory.hotplug_size, Some(Size(4 * GIB)));
    assert_eq!(c.disks.len(), 1);
    assert!(c.disks[0].readonly && c.rng);
    assert_eq!(c.initramfs, None);
}

#[test]
fn absent_sections_take_defaults() {
    let c = parse(&minimal()).unwrap();
    assert_eq!(
        c,
        VmConfig {
            kernel: Some("/k/vmlinux".into()),
            ..VmConfig::default()
        }
    );
    // `max_vcpus` may be left out; `rng: {}` is Cloud Hypervisor's default source.
    let c = parse(
        &json!({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 3},
                          "rng": {}, "serial": null, "console": null}),
    )
    .unwrap();
    assert_eq!((c.cpus.boot, c.rng), (3, true));
    assert!(
        parse(&with(full(), "/rng/src", json!("/dev/random")))
            .unwrap()
            .rng
    );
    // Without a hotplug area either hotplug method asks for nothing.
    for method in ["Acpi", "VirtioMem"] {
        let c = parse(&with(full(), "/memory/hotplug_method", json!(method))).unwrap();
        assert_eq!(c.memory.hotplug_size, None);
    }
}

#[test]
fn every_unsupported_field_is_refused_by_name() {
    let supported = [
        "payload", "cpus", "memory", "disks", "rng", "serial", "console",
    ];
    let mut checked = 0;
    for key in keys::<ch::VmConfig>() {
        if supported.contains(&key.as_str()) {
            continue;
        }
        let at = format!("/{key}");
        // Null, and an empty list, are what orchestrators send for "none".
        parse(&with(full(), &at, Value::Null)).unwrap();
        let e = refused(&with(full(), &at, json!([{"id": "x"}])), &key);
        let kind_ok = matches!(e, VmConfigError::Unsupported { .. })
            || (key == "debug_console" && matches!(e, VmConfigError::Invalid { .. }));
        assert!(kind_ok, "{e}");
        checked += 1;
    }
    assert_eq!(checked, 26);
    let e = refused(&with(full(), "/net", json!([{"tap": "tap0"}])), "net");
    assert!(e
        .to_string()
        .starts_with("net: Kite does not support network devices"));
    for key in ["iommu", "watchdog", "pvpanic", "landlock_enable", "gdb"] {
        parse(&with(full(), &format!("/{key}"), json!(false))).unwrap();
        refused(&with(full(), &format!("/{key}"), json!(true)), key);
    }
    for key in ["net", "fs", "pmem", "devices", "numa", "pci_segments"] {
        parse(&with(full(), &format!("/{key}"), json!([]))).unwrap();
    }
    refused(
        &with(full(), "/platform", json!({"num_pci_segments": 1})),
        "platform",
    );
    refused(
        &with(full(), "/vsock", json!({"cid": 3, "socket": "/v"})),
        "vsock",
    );
    refused(&with(full(), "/balloon", json!({"size": 0})), "balloon");
    refused(
        &with(full(), "/debug_console", json!({"mode": "Tty"})),
        "debug_console.mode",
    );
}

#[test]
fn refused_values_are_quoted_back_short() {
    let long = json!([{"tap": "t".repeat(1000)}]);
    let e = refused(&with(full(), "/net", long), "net").to_string();
    assert!(e.len() < 200 && e.ends_with("...)"), "{e}");
    let e = refused(&with(full(), "/memroy", json!({})), "memroy").to_string();
    assert!(
        e.starts_with("memroy: unknown field (Cloud Hypervisor's VmConfig has balloon, console,")
            && e.contains(" memory, "),
        "{e}"
    );
    let e = refused(&with(full(), "/memory/size", json!(1 << 20)), "memory.size");
    assert_eq!(
        e.to_string(),
        "memory.size: size=1M is too small (at least 64 MiB)"
    );
}

#[test]
fn every_unsupported_key_in_a_section_is_refused_by_name() {
    // Each section's keys that Kite does not take: any value other than the accepted
    // ones (here a list with something in it) is refused, naming the key.
    let sections: [(&str, &str, Vec<String>, &[&str]); 8] = [
        (
            "/payload",
            "payload.",
            keys::<ch::PayloadConfig>(),
            &["kernel", "initramfs", "cmdline"],
        ),
        (
            "/cpus",
            "cpus.",
            keys::<ch::CpusConfig>(),
            &["boot_vcpus", "max_vcpus"],
        ),
        (
            "/memory",
            "memory.",
            keys::<ch::MemoryConfig>(),
            &[
                "size",
                "hotplug_method",
                "hotplug_size",
                "hotplugged_size",
                "thp",
            ],
        ),
        (
            "/disks/0",
            "disks[0].",
            keys::<ch::DiskConfig>(),
            &["path", "readonly"],
        ),
        ("/rng", "rng.", keys::<ch::RngConfig>(), &["src"]),
        ("/serial", "serial.", keys::<ch::SerialConfig>(), &["mode"]),
        (
            "/console",
            "console.",
            keys::<ch::ConsoleConfig>(),
            &["mode"],
        ),
        (
            "/debug_console",
            "debug_console.",
            keys::<ch::DebugConsoleConfig>(),
            &[],
        ),
    ];
    let mut checked = 0;
    for (at, prefix, keys, supported) in sections {
        for key in keys.iter().filter(|k| !supported.contains(&k.as_str())) {
            let field = format!("{prefix}{key}");
            let body = with(full(), &format!("{at}/{key}"), Value::Null);
            parse(&body).unwrap_or_else(|e| panic!("{field}: null refused: {e}"));
            let body = with(full(), &format!("{at}/{key}"), json!([{"id": "x"}]));
            let e = refused(&body, &field);
            assert!(matches!(e, VmConfigError::Unsupported { .. }), "{e}");
            checked += 1;
        }
    }
    assert_eq!(checked, 4 + 8 + 7 + 19 + 4 + 2 + 6 + 3);
}

#[test]
fn unsupported_values_of_supported_sections_are_refused() {
    let cases = [
        (
            "/payload/firmware",
            json!("/fw/hypervisor-fw"),
            "payload.firmware",
        ),
        ("/cpus/max_vcpus", json!(4), "cpus.max_vcpus"),
        ("/cpus/kvm_hyperv", json!(true), "cpus.kvm_hyperv"),
        ("/cpus/max_phys_bits", json!(40), "cpus.max_phys_bits"),
        ("/cpus/nested", json!(false), "cpus.nested"),
        ("/cpus/features", json!({"amx": true}), "cpus.features"),
        (
            "/cpus/topology",
            json!({"threads_per_core": 2, "cores_per_die": 1, "dies_per_package": 1, "packages": 1}),
            "cpus.topology",
        ),
        ("/memory/shared", json!(true), "memory.shared"),
        ("/memory/hugepages", json!(true), "memory.hugepages"),
        (
            "/memory/zones",
            json!([{"id": "z", "size": GIB}]),
            "memory.zones",
        ),
        ("/disks/0/direct", json!(true), "disks[0].direct"),
        ("/disks/0/num_queues", json!(4), "disks[0].num_queues"),
        ("/disks/0/queue_size", json!(1024), "disks[0].queue_size"),
        ("/disks/0/vhost_user", json!(true), "disks[0].vhost_user"),
        ("/disks/0/id", json!("_disk0"), "disks[0].id"),
        ("/disks/0/image_type", json!("Qcow2"), "disks[0].image_type"),
        ("/rng/src", json!("/dev/hwrng"), "rng.src"),
        ("/rng/iommu", json!(true), "rng.iommu"),
        ("/serial/mode", json!("File"), "serial.mode"),
        ("/serial/mode", json!("Pty"), "serial.mode"),
        ("/serial/mode", json!("Socket"), "serial.mode"),
        ("/serial/file", json!("/tmp/serial.log"), "serial.file"),
        ("/console/mode", json!("Tty"), "console.mode"),
        ("/console/mode", json!("Pty"), "console.mode"),
    ];
    for (at, value, field) in cases {
        let e = refused(&with(full(), at, value), field);
        assert!(matches!(e, VmConfigError::Unsupported { .. }), "{e}");
    }
    // Cloud Hypervisor's default console is a virtio-console on the terminal: Kite
    // refuses it when asked for, and takes an absent `console` as "Off".
    let e = refused(
        &with(full(), "/console", json!({"mode": "Tty"})),
        "console.mode",
    );
    assert!(e.to_string().contains("no virtio-console"), "{e}");
    parse(&without(full(), "/console")).unwrap();
    let e = refused(
        &with(full(), "/serial", json!({"mode": "Pty"})),
        "serial.mode",
    );
    assert!(e.to_string().contains("standard output"), "{e}");
    // "Null" and "Off" (what orchestrators send when nobody reads the console): the port
    // stays and its output is dropped.
    for mode in ["Null", "Off"] {
        let config = parse(&with(full(), "/serial", json!({ "mode": mode }))).unwrap();
        assert_eq!(config.serial, SerialMode::Off, "{mode}");
    }
    assert_eq!(parse(&full()).unwrap().serial, SerialMode::Tty);
}

#[test]
fn hotplug_needs_virtio_mem() {
    let body = with(full(), "/memory/hotplug_size", json!(2 * GIB));
    let e = refused(&body, "memory.hotplug_method");
    assert!(e.to_string().contains("\"VirtioMem\""), "{e}");
    assert!(e.to_string().contains("means \"Acpi\""), "{e}");
    let acpi = with(body.clone(), "/memory/hotplug_method", json!("Acpi"));
    refused(&acpi, "memory.hotplug_method");
    let virtio = with(body, "/memory/hotplug_method", json!("VirtioMem"));
    assert_eq!(
        parse(&virtio).unwrap().memory.hotplug_size,
        Some(Size(2 * GIB))
    );
}

#[test]
fn unknown_fields_are_refused_by_name() {
    for (at, field) in [
        ("/frobnicate", "frobnicate"),
        ("/kernel", "kernel"), // Kite's own --config shape is not Cloud Hypervisor's
        ("/payload/kernal", "payload.kernal"),
        ("/cpus/boot", "cpus.boot"),
        ("/memory/size_mb", "memory.size_mb"),
        ("/memory/hotplug_backing", "memory.hotplug_backing"),
        ("/disks/0/paht", "disks[0].paht"),
        ("/rng/source", "rng.source"),
        ("/serial/path", "serial.path"),
        ("/console/tty", "console.tty"),
        ("/debug_console/port", "debug_console.port"),
    ] {
        let e = refused(&with(full(), at, json!(1)), field);
        assert!(matches!(e, VmConfigError::Unknown { .. }), "{e}");
    }
    let e = refused(&with(full(), "/memroy", json!({})), "memroy");
    assert!(
        e.to_string().contains("memory"),
        "the known keys are listed: {e}"
    );
}

#[test]
fn wrong_types_get_clear_messages() {
    let e = refused(&with(full(), "/memory/size", json!("1G")), "memory.size");
    assert!(matches!(e, VmConfigError::Invalid { .. }), "{e}");
    assert!(e.to_string().contains("not strings such as \"1G\""), "{e}");
    assert!(e.to_string().contains("in bytes"), "{e}");
    let e = refused(
        &with(full(), "/memory/hotplug_size", json!("2G")),
        "memory.hotplug_size",
    );
    assert!(e.to_string().contains("\"2G\""), "{e}");
    let e = refused(&with(full(), "/memory/size", json!(-1)), "memory.size");
    assert!(e.to_string().contains("negative"), "{e}");
    let e = refused(&with(full(), "/memory/size", json!(1.5e9)), "memory.size");
    assert!(e.to_string().contains("not an integer"), "{e}");
    let e = refused(&with(full(), "/memory/size", json!(true)), "memory.size");
    assert!(e.to_string().contains("integer number of bytes"), "{e}");
    refused(
        &with(full(), "/cpus/boot_vcpus", json!("2")),
        "cpus.boot_vcpus",
    );
    refused(
        &with(full(), "/cpus/boot_vcpus", json!(-1)),
        "cpus.boot_vcpus",
    );
    refused(
        &with(full(), "/disks/0/readonly", json!("yes")),
        "disks[0].readonly",
    );
    refused(&with(full(), "/payload/kernel", json!(7)), "payload.kernel");
    let e = refused(&with(full(), "/serial/mode", json!("tty")), "serial.mode");
    assert!(e.to_string().contains("Tty"), "the modes are listed: {e}");
    let e = refused(
        &with(full(), "/memory/hotplug_method", json!("acpi")),
        "memory.hotplug_method",
    );
    assert!(e.to_string().contains("VirtioMem"), "{e}");
    let e = refused(&with(full(), "/memory", json!(GIB)), "memory");
    assert!(e.to_string().contains("MemoryConfig"), "{e}");
    refused(&with(full(), "/disks", json!({"path": "/a"})), "disks");
    refused(&with(full(), "/disks/0", Value::Null), "disks[0]");
    refused(&with(full(), "/disks/0", json!("/img")), "disks[0]");
    refused(
        &with(full(), "/payload/kernel", json!("")),
        "payload.kernel",
    );
    for (body, field) in [
        (json!({}), "payload"),
        (json!({"payload": null}), "payload"),
        (json!({"payload": {"initramfs": "/i"}}), "payload.kernel"),
        (
            with(full(), "/memory", json!({"hotplug_size": GIB})),
            "memory.size",
        ),
        (
            with(full(), "/cpus", json!({"max_vcpus": 2})),
            "cpus.boot_vcpus",
        ),
        (
            with(full(), "/disks/0", json!({"readonly": true})),
            "disks[0].path",
        ),
        (with(full(), "/serial", json!({})), "serial.mode"),
        (with(full(), "/console", json!({})), "console.mode"),
    ] {
        let e = refused(&body, field);
        assert!(matches!(e, VmConfigError::Missing { .. }), "{e}");
    }
    for body in [&b"{"[..], b"[]", b"\"vm\"", b"", b"{\"payload\": {}} x"] {
        let e = parse_vm_config(body).unwrap_err();
        assert!(matches!(e, VmConfigError::Body(_)), "{e}");
        assert_eq!(e.field(), None);
    }
}

#[test]
fn out_of_range_values_fail_kites_bounds() {
    let cases = [
        ("/memory/size", json!(1 << 20), "memory.size"),
        ("/memory/size", json!((1u64 << 40) + 4096), "memory.size"),
        ("/memory/size", json!((64 << 20) + 1), "memory.size"),
        ("/memory/size", json!(u64::MAX), "memory.size"),
        ("/cpus/boot_vcpus", json!(0), "cpus.boot_vcpus"),
        ("/cpus/boot_vcpus", json!(255), "cpus.boot_vcpus"),
        (
            "/memory/hotplugged_size",
            json!(2 << 20),
            "memory.hotplugged_size",
        ),
        (
            "/payload/cmdline",
            json!("x".repeat(MAX_CMDLINE + 1)),
            "payload.cmdline",
        ),
    ];
    for (at, value, field) in cases {
        let body = with(with(full(), "/cpus/max_vcpus", Value::Null), at, value);
        let e = refused(&body, field);
        assert!(matches!(e, VmConfigError::Bounds { .. }), "{e}");
    }
    let hotplug = |size: u64, plugged: u64| {
        json!({"size": GIB, "hotplug_method": "VirtioMem", "hotplug_size": size,
               "hotplugged_size": plugged})
    };
    let e = refused(
        &with(full(), "/memory", hotplug(100 << 20, 0)),
        "memory.hotplug_size",
    );
    assert!(e.to_string().contains("multiple of 128 MiB"), "{e}");
    refused(
        &with(full(), "/memory", hotplug(GIB, 2 * GIB)),
        "memory.hotplugged_size",
    );
    refused(
        &with(full(), "/memory", hotplug(GIB, 3 << 20)),
        "memory.hotplugged_size",
    );
    parse(&with(full(), "/memory", hotplug(GIB, 4 << 20))).unwrap();
    let disks = vec![json!({"path": "/img"}); MAX_VIRTIO_DEVICES];
    refused(&with(full(), "/disks", Value::Array(disks)), "disks");
}

#[test]
fn to_ch_json_round_trips() {
    let configs = [
        VmConfig::default(),
        VmConfig {
            cmdline: Some("console=ttyS0".into()),
            cpus: CpusConfig { boot: 8 },
            memory: MemoryConfig {
                size: Size(3 * GIB),
                hotplug_size: Some(Size(4 * GIB)),
                hotplug_backing: HotplugBacking::Anon,
                hotplugged_size: Some(Size(512 << 20)),
                thp: true,
            },
            disks: vec![
                DiskConfig {
                    path: "/img/a".into(),
                    readonly: true,
                },
                DiskConfig {
                    path: "/img/b".into(),
                    readonly: false,
                },
            ],
            rng: true,
            ..VmConfig::default()
        },
        VmConfig {
            memory: MemoryConfig {
                size: Size(256 << 20),
                hotplug_size: Some(Size(0)),
                ..MemoryConfig::default()
            },
            ..VmConfig::default()
        },
    ];
    for config in configs {
        for initramfs in [None, Some(Path::new("/k/initramfs.cpio"))] {
            let kernel = Path::new("/k/vmlinux");
            let cmdline = "console=ttyS0 reboot=k panic=-1";
            let json = to_ch_json(&config, kernel, initramfs, cmdline);
            assert_eq!(json["serial"], json!({"mode": "Tty"}));
            assert_eq!(json["console"], json!({"mode": "Off"}));
            assert_eq!(json["cpus"]["max_vcpus"], json!(config.cpus.boot));
            assert_eq!(json["memory"]["size"], json!(config.memory.size.bytes()));
            let expected = VmConfig {
                kernel: Some(kernel.into()),
                initramfs: initramfs.map(Path::to_path_buf),
                cmdline: Some(cmdline.into()),
                ..config.clone()
            };
            let back = parse_vm_config(json.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, expected, "{json}");
        }
    }
    let json = to_ch_json(
        &VmConfig {
            memory: MemoryConfig {
                hotplug_size: Some(Size(GIB)),
                ..MemoryConfig::default()
            },
            ..VmConfig::default()
        },
        Path::new("/k"),
        None,
        "",
    );
    assert_eq!(
        json["memory"],
        json!({"size": 512 << 20, "hotplug_method": "VirtioMem", "hotplug_size": GIB, "thp": false})
    );
    assert_eq!(json.get("rng"), None);
    assert_eq!(json.get("disks"), None);
}

/// The OpenAPI document, and the schema `name` in it.
fn openapi() -> Value {
    serde_json::from_str(crate::api::OPENAPI).expect("openapi.json is JSON")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("no schema {name}"))
}

#[test]
fn openapi_vm_config_examples_parse() {
    let doc = openapi();
    let mut examples = vec![schema(&doc, "VmConfig")["example"].clone()];
    let create = doc
        .pointer("/paths/~1vm.create/put/requestBody/content/application~1json/examples")
        .and_then(Value::as_object)
        .expect("vm.create has examples");
    examples.extend(create.values().map(|e| e["value"].clone()));
    examples.push(schema(&doc, "VmInfo")["example"]["config"].clone());
    assert!(examples.len() >= 4, "{examples:?}");
    for example in examples {
        assert!(example.is_object(), "{example}");
        parse(&example).unwrap_or_else(|e| panic!("{example}: {e}"));
    }
    // vm.create's documented failure examples fail as documented.
    let bad = doc
        .pointer("/paths/~1vm.create/put/x-kite-refused-examples")
        .and_then(Value::as_array)
        .expect("vm.create has refused examples");
    for case in bad {
        let e = parse(&case["body"]).expect_err("refused example");
        assert_eq!(json!(e.to_string()), case["error"], "{case}");
    }
}

#[test]
fn openapi_schemas_list_the_keys_the_code_takes() {
    let doc = openapi();
    let schemas: [(&str, Vec<String>); 9] = [
        ("VmConfig", keys::<ch::VmConfig>()),
        ("PayloadConfig", keys::<ch::PayloadConfig>()),
        ("CpusConfig", keys::<ch::CpusConfig>()),
        ("MemoryConfig", keys::<ch::MemoryConfig>()),
        ("DiskConfig", keys::<ch::DiskConfig>()),
        ("RngConfig", keys::<ch::RngConfig>()),
        ("SerialConfig", keys::<ch::SerialConfig>()),
        ("ConsoleConfig", keys::<ch::ConsoleConfig>()),
        ("DebugConsoleConfig", keys::<ch::DebugConsoleConfig>()),
    ];
    for (name, mut code) in schemas {
        let s = schema(&doc, name);
        assert_eq!(s["additionalProperties"], json!(false), "{name}");
        let mut documented: Vec<String> = s["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        documented.sort();
        code.sort();
        assert_eq!(documented, code, "{name}");
    }
}

#[test]
fn openapi_references_resolve() {
    fn walk(doc: &Value, v: &Value, refs: &mut usize) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    let pointer = r.strip_prefix('#').expect("local reference");
                    assert!(doc.pointer(pointer).is_some(), "{r} resolves");
                    *refs += 1;
                }
                map.values().for_each(|v| walk(doc, v, refs));
            }
            Value::Array(list) => list.iter().for_each(|v| walk(doc, v, refs)),
            _ => {}
        }
    }
    let doc = openapi();
    let mut refs = 0;
    walk(&doc, &doc, &mut refs);
    assert!(refs > 20, "{refs}");
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..4]), Some("3.0."));
    assert_eq!(doc["servers"][0]["url"], json!("http://localhost/api/v1"));
}
