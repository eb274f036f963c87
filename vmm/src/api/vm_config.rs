//! Cloud Hypervisor's `VmConfig` body (`PUT /api/v1/vm.create`, and `config` in
//! `GET /api/v1/vm.info`) for what Kite has.
//!
//! [`parse_vm_config`] turns a body into Kite's [`VmConfig`]; [`to_ch_json`] writes a
//! Kite configuration back in Cloud Hypervisor's shape, and the two round-trip.
//!
//! What is taken from the body:
//!
//! - `payload`: `kernel` (required), `initramfs`, `cmdline` (absent: Kite's default
//!   command line). `firmware`, `igvm`, `host_data`, `fw_cfg_config` are refused.
//! - `cpus`: `boot_vcpus`; `max_vcpus` must equal it (Kite has no vCPU hotplug). Absent:
//!   one vCPU.
//! - `memory`: `size`, `hotplug_size`, `hotplugged_size`, in bytes (integers, as in Cloud
//!   Hypervisor's API; strings such as `"1G"` are refused). Absent: 512 MiB. Kite hotplugs
//!   memory with virtio-mem only: with `hotplug_size`, `hotplug_method` must be
//!   `"VirtioMem"`, and an absent `hotplug_method` is refused there, because it means
//!   Cloud Hypervisor's default, `"Acpi"`. Without `hotplug_size` either method is
//!   accepted (neither adds anything). Hotplugged memory is backed by anonymous memory
//!   (`hotplug_backing=anon`): Kite's lazy backing has no counterpart in this shape.
//! - `disks`: `path` (required) and `readonly` of each: virtio-blk on a raw image.
//! - `rng`: present (an object, `src` `/dev/urandom` or `/dev/random`, the default being
//!   `/dev/urandom`) gives the guest a virtio-rng device fed by the host's getrandom;
//!   absent or null gives none (unlike Cloud Hypervisor, which always adds one).
//! - `serial`: Kite's 8250 (`ttyS0`) always writes to the VMM's standard output, which is
//!   mode `"Tty"`; that mode, or an absent `serial`, is accepted, every other mode
//!   (`"Null"`, `"Off"`, `"File"`, `"Pty"`, `"Socket"`) is refused.
//! - `console`: Kite has no virtio-console (`hvc0`): mode `"Off"`, or an absent `console`,
//!   is accepted, every other mode is refused.
//!
//! Every other field Cloud Hypervisor has (net, fs, pmem, vsock, devices, numa, platform,
//! ...) and every other key inside the sections above is accepted only at a value that
//! asks for nothing Kite lacks: null, an empty list, `false` for a switch, Cloud
//! Hypervisor's own default value (e.g. `memory.thp: true`, `disks[].num_queues: 1`), so
//! that the bodies orchestrators generate with every field filled in are taken. Any
//! other value is refused with an error naming the field and saying why. A field Cloud
//! Hypervisor's `VmConfig` does not have is refused too. Nothing is silently dropped.
//! Null means absent, for every field (a required one that is null is missing).
//!
//! `openapi.json` ([`crate::api::OPENAPI`]) documents the same, key by key; the tests
//! check that it lists exactly the keys read here and that its examples parse.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::config::{
    ConfigError, CpusConfig, DiskConfig, HotplugBacking, MemoryConfig, Size, VmConfig,
};

/// Why a `VmConfig` body is refused. Every variant but [`VmConfigError::Body`] names the
/// field, as a path such as `memory.size` or `disks[1].path`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmConfigError {
    /// The body is not JSON, or not a JSON object.
    #[error("the body is not a JSON VmConfig object: {0}")]
    Body(String),
    /// A key Cloud Hypervisor's `VmConfig` does not have there.
    #[error("{field}: unknown field (Cloud Hypervisor's {schema} has {known})")]
    Unknown {
        /// The field's path.
        field: String,
        /// The schema it was found in.
        schema: &'static str,
        /// The keys that schema has.
        known: String,
    },
    /// A required field is absent or null.
    #[error("{field}: required: {what}")]
    Missing {
        /// The field's path.
        field: String,
        /// What it is.
        what: &'static str,
    },
    /// A value of the wrong type, or outside its set.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field's path.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting Kite does not have, at a value other than the ones it accepts.
    #[error("{field}: {reason}")]
    Unsupported {
        /// The field's path.
        field: String,
        /// What Kite lacks and what it accepts.
        reason: String,
    },
    /// Out of Kite's bounds ([`VmConfig::validate`]).
    #[error("{field}: {}", without_flag(source))]
    Bounds {
        /// The field's path.
        field: &'static str,
        /// Kite's error.
        source: ConfigError,
    },
}

impl VmConfigError {
    /// The path of the field at fault (`memory.size`, `disks[0].path`, ...), if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            VmConfigError::Body(_) => None,
            VmConfigError::Unknown { field, .. }
            | VmConfigError::Missing { field, .. }
            | VmConfigError::Invalid { field, .. }
            | VmConfigError::Unsupported { field, .. } => Some(field),
            VmConfigError::Bounds { field, .. } => Some(field),
        }
    }
}

/// `error`'s message without the `--flag: ` it starts with (the field's path replaces it).
fn without_flag(error: &ConfigError) -> String {
    let message = error.to_string();
    match message.split_once(": ") {
        Some((flag, rest)) if flag.starts_with("--") => rest.to_string(),
        _ => message,
    }
}

/// The field of a Cloud Hypervisor `VmConfig` that a [`ConfigError`] from
/// [`VmConfig::validate`] is about.
fn bounds_field(error: &ConfigError) -> &'static str {
    match error {
        ConfigError::VcpuCount(_) | ConfigError::BadCount(_) => "cpus.boot_vcpus",
        ConfigError::MemoryTooSmall(_)
        | ConfigError::MemoryTooLarge(_)
        | ConfigError::MemoryUnaligned(_) => "memory.size",
        ConfigError::HotplugSize(_) => "memory.hotplug_size",
        ConfigError::HotpluggedSize { .. } => "memory.hotplugged_size",
        ConfigError::TooManyDevices(_) => "disks",
        ConfigError::CmdlineTooLong(_) => "payload.cmdline",
        _ => "VmConfig",
    }
}

/// Reads a Cloud Hypervisor `VmConfig` body (`PUT /api/v1/vm.create`) into the VM Kite
/// runs, checked against Kite's bounds. See the [module](self) for what is accepted.
pub fn parse_vm_config(body: &[u8]) -> Result<VmConfig, VmConfigError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| VmConfigError::Body(e.to_string()))?;
    if !value.is_object() {
        return Err(VmConfigError::Body(format!(
            "expected an object, got {}",
            kind(&value)
        )));
    }
    let body: ch::VmConfig =
        serde_json::from_value(value).map_err(|e| VmConfigError::Body(e.to_string()))?;
    let config = body.into_config()?;
    config.validate().map_err(|source| VmConfigError::Bounds {
        field: bounds_field(&source),
        source,
    })?;
    Ok(config)
}

/// `config` as Kite runs it, in Cloud Hypervisor's `VmConfig` shape: `payload` (with the
/// resolved `kernel`, `initramfs` and `cmdline`), `cpus` (`boot_vcpus` = `max_vcpus`),
/// `memory` (bytes; `hotplug_method: "VirtioMem"` with a hotplug area), `disks`, `rng`
/// (when the VM has one), `serial: {mode: "Tty"}` and `console: {mode: "Off"}`.
///
/// [`parse_vm_config`] reads it back into `config` with `kernel`, `initramfs` and
/// `cmdline` set to the ones given, except for what this shape cannot say: lazy hotplug
/// backing (read back as anonymous) and paths that are not UTF-8 (written lossily).
pub fn to_ch_json(
    config: &VmConfig,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Value {
    let mut payload = json!({"kernel": kernel.to_string_lossy(), "cmdline": cmdline});
    if let Some(initramfs) = initramfs {
        payload["initramfs"] = json!(initramfs.to_string_lossy());
    }
    let mut memory = json!({"size": config.memory.size.bytes()});
    if let Some(hotplug) = config.memory.hotplug_size {
        memory["hotplug_method"] = json!("VirtioMem");
        memory["hotplug_size"] = json!(hotplug.bytes());
    }
    if let Some(plugged) = config.memory.hotplugged_size {
        memory["hotplugged_size"] = json!(plugged.bytes());
    }
    let vcpus = config.cpus.boot;
    let mut vm = json!({
        "payload": payload,
        "cpus": {"boot_vcpus": vcpus, "max_vcpus": vcpus},
        "memory": memory,
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    if !config.disks.is_empty() {
        let disks: Vec<Value> = config
            .disks
            .iter()
            .map(|d| json!({"path": d.path.to_string_lossy(), "readonly": d.readonly}))
            .collect();
        vm["disks"] = Value::Array(disks);
    }
    if config.rng {
        vm["rng"] = json!({"src": DEFAULT_RNG_SOURCE});
    }
    vm
}

/// Longest value quoted back in an error.
const MAX_ECHO: usize = 80;
/// Cloud Hypervisor's default `rng.src`.
const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";
/// Cloud Hypervisor's default `cpus.max_phys_bits`.
const DEFAULT_MAX_PHYS_BITS: u64 = 46;
/// Cloud Hypervisor's default `debug_console.iobase`.
const DEFAULT_DEBUG_CONSOLE_PORT: u64 = 0xe9;

/// One field of a body as sent: absent, null, a value of its type, or a value that is not
/// (with serde's message). Taking every field this way lets the checks name the field
/// whose value is wrong.
#[derive(Clone, Debug, Default)]
enum Field<T> {
    #[default]
    Absent,
    Null,
    Value(T),
    Invalid(String),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => Field::Null,
            v => match T::deserialize(v) {
                Ok(t) => Field::Value(t),
                Err(e) => Field::Invalid(e.to_string()),
            },
        })
    }
}

/// Writes the value, or null: a default section serializes to all of its keys, which is
/// how the checks list the keys a schema has.
impl<T: Serialize> Serialize for Field<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Value(v) => v.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

impl<T> Field<T> {
    /// The value, if one was given (null counts as absent).
    fn get(self, field: &str) -> Result<Option<T>, VmConfigError> {
        match self {
            Field::Absent | Field::Null => Ok(None),
            Field::Value(v) => Ok(Some(v)),
            Field::Invalid(reason) => Err(VmConfigError::Invalid {
                field: field.to_string(),
                reason,
            }),
        }
    }

    /// The value, which must be given.
    fn required(self, field: &str, what: &'static str) -> Result<T, VmConfigError> {
        self.get(field)?.ok_or_else(|| VmConfigError::Missing {
            field: field.to_string(),
            what,
        })
    }
}

impl Field<Value> {
    /// Accepts the field absent, null, or one of `accepted`; else refuses it with `why`.
    fn only(&self, field: &str, accepted: &[Value], why: &str) -> Result<(), VmConfigError> {
        match self {
            Field::Value(v) if !accepted.contains(v) => {
                let list: Vec<String> = accepted.iter().map(Value::to_string).collect();
                let list = match list.as_slice() {
                    [] => "null".to_string(),
                    _ => format!("null or {}", list.join(" or ")),
                };
                let mut got = v.to_string();
                if got.len() > MAX_ECHO {
                    let end = (0..=MAX_ECHO).rev().find(|&i| got.is_char_boundary(i));
                    got.truncate(end.unwrap_or(0));
                    got.push_str("...");
                }
                Err(VmConfigError::Unsupported {
                    field: field.to_string(),
                    reason: format!("{why} (accepted: {list}; got {got})"),
                })
            }
            _ => Ok(()),
        }
    }

    /// [`Field::only`] null, absent or an empty list.
    fn none(&self, field: &str, why: &str) -> Result<(), VmConfigError> {
        self.only(field, &[json!([])], why)
    }
}

/// A size in bytes: a JSON integer, as in Cloud Hypervisor's API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
struct Bytes(u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl Visitor<'_> for BytesVisitor {
            type Value = Bytes;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer number of bytes")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Bytes, E> {
                u64::try_from(v)
                    .map(Bytes)
                    .map_err(|_| E::custom(format!("{v} is negative: sizes are bytes")))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Bytes, E> {
                Err(E::custom(format!(
                    "{v} is not an integer: sizes are a whole number of bytes"
                )))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bytes, E> {
                Err(E::custom(format!(
                    "sizes are integers, in bytes, as in Cloud Hypervisor's API \
                     (1073741824 for 1 GiB), not strings such as \"{v}\""
                )))
            }
        }
        d.deserialize_any(BytesVisitor)
    }
}

/// Cloud Hypervisor's `memory.hotplug_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum HotplugMethod {
    Acpi,
    VirtioMem,
}

/// Cloud Hypervisor's `ConsoleMode`, of `serial` and `console`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// Cloud Hypervisor's schemas, named as in its API (and in serde's messages), with every
/// key each has; the ones Kite supports typed.
mod ch {
    use serde::{Deserialize, Serialize};
    use serde_json::{Map, Value};

    use super::{Bytes, ConsoleMode, Field, HotplugMethod};

    /// Cloud Hypervisor's `VmConfig`: every field it has, the ones Kite supports typed.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct VmConfig {
        pub(super) payload: Field<PayloadConfig>,
        pub(super) cpus: Field<CpusConfig>,
        pub(super) memory: Field<MemoryConfig>,
        pub(super) disks: Field<Vec<Field<DiskConfig>>>,
        pub(super) rng: Field<RngConfig>,
        pub(super) serial: Field<SerialConfig>,
        pub(super) console: Field<ConsoleConfig>,
        pub(super) debug_console: Field<DebugConsoleConfig>,
        pub(super) rate_limit_groups: Field<Value>,
        pub(super) net: Field<Value>,
        pub(super) balloon: Field<Value>,
        pub(super) generic_vhost_user: Field<Value>,
        pub(super) fs: Field<Value>,
        pub(super) pmem: Field<Value>,
        pub(super) devices: Field<Value>,
        pub(super) user_devices: Field<Value>,
        pub(super) vdpa: Field<Value>,
        pub(super) vsock: Field<Value>,
        pub(super) pvmemcontrol: Field<Value>,
        pub(super) pvpanic: Field<Value>,
        pub(super) iommu: Field<Value>,
        pub(super) numa: Field<Value>,
        pub(super) watchdog: Field<Value>,
        pub(super) rtc: Field<Value>,
        pub(super) gdb: Field<Value>,
        pub(super) pci_segments: Field<Value>,
        pub(super) platform: Field<Value>,
        pub(super) tpm: Field<Value>,
        pub(super) landlock_enable: Field<Value>,
        pub(super) landlock_rules: Field<Value>,
        pub(super) ivshmem: Field<Value>,
        pub(super) sgx_epc: Field<Value>,
        pub(super) preserved_fds: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `PayloadConfig`.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct PayloadConfig {
        pub(super) kernel: Field<String>,
        pub(super) initramfs: Field<String>,
        pub(super) cmdline: Field<String>,
        pub(super) firmware: Field<Value>,
        pub(super) igvm: Field<Value>,
        pub(super) host_data: Field<Value>,
        pub(super) fw_cfg_config: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `CpusConfig`.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct CpusConfig {
        pub(super) boot_vcpus: Field<u32>,
        pub(super) max_vcpus: Field<u32>,
        pub(super) topology: Field<Value>,
        pub(super) kvm_hyperv: Field<Value>,
        pub(super) max_phys_bits: Field<Value>,
        pub(super) affinity: Field<Value>,
        pub(super) features: Field<Value>,
        pub(super) nested: Field<Value>,
        pub(super) core_scheduling: Field<Value>,
        pub(super) profile: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `MemoryConfig`.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct MemoryConfig {
        pub(super) size: Field<Bytes>,
        pub(super) hotplug_method: Field<HotplugMethod>,
        pub(super) hotplug_size: Field<Bytes>,
        pub(super) hotplugged_size: Field<Bytes>,
        pub(super) mergeable: Field<Value>,
        pub(super) shared: Field<Value>,
        pub(super) hugepages: Field<Value>,
        pub(super) hugepage_size: Field<Value>,
        pub(super) prefault: Field<Value>,
        pub(super) reserve: Field<Value>,
        pub(super) thp: Field<Value>,
        pub(super) zones: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `DiskConfig`.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct DiskConfig {
        pub(super) path: Field<String>,
        pub(super) readonly: Field<bool>,
        pub(super) direct: Field<Value>,
        pub(super) iommu: Field<Value>,
        pub(super) num_queues: Field<Value>,
        pub(super) queue_size: Field<Value>,
        pub(super) vhost_user: Field<Value>,
        pub(super) vhost_socket: Field<Value>,
        pub(super) rate_limit_group: Field<Value>,
        pub(super) rate_limiter_config: Field<Value>,
        pub(super) id: Field<Value>,
        pub(super) serial: Field<Value>,
        pub(super) pci_segment: Field<Value>,
        pub(super) pci_device_id: Field<Value>,
        pub(super) queue_affinity: Field<Value>,
        pub(super) disable_io_uring: Field<Value>,
        pub(super) disable_aio: Field<Value>,
        pub(super) backing_files: Field<Value>,
        pub(super) sparse: Field<Value>,
        pub(super) image_type: Field<Value>,
        pub(super) lock_granularity: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `RngConfig`.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct RngConfig {
        pub(super) src: Field<String>,
        pub(super) iommu: Field<Value>,
        pub(super) id: Field<Value>,
        pub(super) pci_segment: Field<Value>,
        pub(super) pci_device_id: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `SerialConfig`.
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct SerialConfig {
        pub(super) mode: Field<ConsoleMode>,
        pub(super) file: Field<Value>,
        pub(super) socket: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `ConsoleConfig` (virtio-console).
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct ConsoleConfig {
        pub(super) mode: Field<ConsoleMode>,
        pub(super) file: Field<Value>,
        pub(super) socket: Field<Value>,
        pub(super) iommu: Field<Value>,
        pub(super) id: Field<Value>,
        pub(super) pci_segment: Field<Value>,
        pub(super) pci_device_id: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }

    /// Cloud Hypervisor's `DebugConsoleConfig` (the port 0xe9 console).
    #[derive(Default, Serialize, Deserialize)]
    #[serde(default)]
    pub(super) struct DebugConsoleConfig {
        pub(super) mode: Field<Value>,
        pub(super) file: Field<Value>,
        pub(super) iobase: Field<Value>,
        #[serde(flatten)]
        pub(super) unknown: Map<String, Value>,
    }
}

/// The keys of schema `T`: those of its default value, serialized.
fn keys<T: Default + Serialize>() -> Vec<String> {
    match serde_json::to_value(T::default()) {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Refuses the first key of `unknown`, found at `prefix` in schema `T`.
fn refuse_unknown<T: Default + Serialize>(
    unknown: &Map<String, Value>,
    prefix: &str,
) -> Result<(), VmConfigError> {
    match unknown.keys().next() {
        Some(key) => Err(VmConfigError::Unknown {
            field: format!("{prefix}{key}"),
            schema: std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("VmConfig"),
            known: keys::<T>().join(", "),
        }),
        None => Ok(()),
    }
}

/// JSON's name for the type of `v`.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A path that must not be empty.
fn non_empty_path(s: String, field: &str) -> Result<PathBuf, VmConfigError> {
    if s.is_empty() {
        return Err(VmConfigError::Invalid {
            field: field.to_string(),
            reason: "an empty path".into(),
        });
    }
    Ok(PathBuf::from(s))
}

const NO_IOMMU: &str = "Kite has no virtual IOMMU";
const NO_PCI: &str = "Kite has no PCI bus (its devices are virtio-mmio)";
const NO_IDS: &str = "Kite names its devices itself; device ids are not supported";

impl ch::VmConfig {
    fn into_config(self) -> Result<VmConfig, VmConfigError> {
        refuse_unknown::<ch::VmConfig>(&self.unknown, "")?;
        let payload = self
            .payload
            .required("payload", "the kernel to boot, {\"kernel\": PATH}")?
            .into_payload()?;
        let cpus = match self.cpus.get("cpus")? {
            Some(cpus) => cpus.into_cpus()?,
            None => CpusConfig::default(),
        };
        let memory = match self.memory.get("memory")? {
            Some(memory) => memory.into_memory()?,
            None => MemoryConfig::default(),
        };
        let mut disks = Vec::new();
        for (i, disk) in self
            .disks
            .get("disks")?
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let field = format!("disks[{i}]");
            match disk {
                Field::Value(disk) => disks.push(disk.into_disk(&field)?),
                Field::Invalid(reason) => return Err(VmConfigError::Invalid { field, reason }),
                Field::Absent | Field::Null => {
                    return Err(VmConfigError::Invalid {
                        field,
                        reason: "null is not a DiskConfig".into(),
                    })
                }
            }
        }
        let rng = match self.rng.get("rng")? {
            Some(rng) => {
                rng.check()?;
                true
            }
            None => false,
        };
        if let Some(serial) = self.serial.get("serial")? {
            serial.check()?;
        }
        if let Some(console) = self.console.get("console")? {
            console.check()?;
        }
        if let Some(debug) = self.debug_console.get("debug_console")? {
            debug.check()?;
        }
        self.rate_limit_groups
            .none("rate_limit_groups", "Kite has no I/O rate limiting")?;
        self.net
            .none("net", "Kite does not support network devices")?;
        self.balloon.only(
            "balloon",
            &[],
            "Kite has no virtio-balloon (it resizes guest memory with virtio-mem: memory.hotplug_size)",
        )?;
        self.generic_vhost_user.none(
            "generic_vhost_user",
            "Kite does not support vhost-user devices",
        )?;
        self.fs.none("fs", "Kite does not support virtio-fs")?;
        self.pmem
            .none("pmem", "Kite does not support virtio-pmem devices")?;
        self.devices
            .none("devices", "Kite does not support VFIO device passthrough")?;
        self.user_devices
            .none("user_devices", "Kite does not support vfio-user devices")?;
        self.vdpa
            .none("vdpa", "Kite does not support vDPA devices")?;
        self.vsock
            .only("vsock", &[], "Kite does not support virtio-vsock")?;
        self.pvmemcontrol
            .only("pvmemcontrol", &[], "Kite has no pvmemcontrol device")?;
        self.pvpanic
            .only("pvpanic", &[json!(false)], "Kite has no pvpanic device")?;
        self.iommu.only("iommu", &[json!(false)], NO_IOMMU)?;
        self.numa
            .none("numa", "Kite does not support guest NUMA nodes")?;
        self.watchdog
            .only("watchdog", &[json!(false)], "Kite has no watchdog device")?;
        self.rtc.only("rtc", &[], "Kite has no virtio RTC device")?;
        self.gdb
            .only("gdb", &[json!(false)], "Kite has no GDB stub")?;
        self.pci_segments.none("pci_segments", NO_PCI)?;
        self.platform.only(
            "platform",
            &[],
            "Kite has no platform settings (PCI segments, IOMMU, SMBIOS, TDX, SEV-SNP)",
        )?;
        self.tpm.only("tpm", &[], "Kite has no TPM")?;
        let landlock = "Kite does not use Landlock (each of its threads runs under seccomp)";
        self.landlock_enable
            .only("landlock_enable", &[json!(false)], landlock)?;
        self.landlock_rules.none("landlock_rules", landlock)?;
        self.ivshmem
            .only("ivshmem", &[], "Kite has no ivshmem device")?;
        self.sgx_epc
            .none("sgx_epc", "Kite does not support SGX enclaves")?;
        self.preserved_fds.none(
            "preserved_fds",
            "Kite takes no file descriptors with its configuration",
        )?;
        Ok(VmConfig {
            kernel: Some(payload.0),
            initramfs: payload.1,
            cmdline: payload.2,
            cpus,
            memory,
            disks,
            rng,
        })
    }
}

impl ch::PayloadConfig {
    /// Kernel, initramfs, command line.
    fn into_payload(self) -> Result<(PathBuf, Option<PathBuf>, Option<String>), VmConfigError> {
        refuse_unknown::<ch::PayloadConfig>(&self.unknown, "payload.")?;
        self.firmware.only(
            "payload.firmware",
            &[],
            "Kite boots a Linux kernel directly (payload.kernel), not firmware",
        )?;
        self.igvm
            .only("payload.igvm", &[], "Kite does not boot IGVM images")?;
        self.host_data.only(
            "payload.host_data",
            &[],
            "Kite does not support SEV-SNP guests",
        )?;
        self.fw_cfg_config
            .only("payload.fw_cfg_config", &[], "Kite has no fw_cfg device")?;
        let kernel = self.kernel.required(
            "payload.kernel",
            "Kite boots a Linux kernel (an ELF vmlinux or a bzImage)",
        )?;
        let kernel = non_empty_path(kernel, "payload.kernel")?;
        let initramfs = match self.initramfs.get("payload.initramfs")? {
            Some(p) => Some(non_empty_path(p, "payload.initramfs")?),
            None => None,
        };
        let cmdline = self.cmdline.get("payload.cmdline")?;
        Ok((kernel, initramfs, cmdline))
    }
}

impl ch::CpusConfig {
    fn into_cpus(self) -> Result<CpusConfig, VmConfigError> {
        refuse_unknown::<ch::CpusConfig>(&self.unknown, "cpus.")?;
        let boot = self
            .boot_vcpus
            .required("cpus.boot_vcpus", "the number of vCPUs")?;
        if let Some(max) = self.max_vcpus.get("cpus.max_vcpus")? {
            if max != boot {
                return Err(VmConfigError::Unsupported {
                    field: "cpus.max_vcpus".into(),
                    reason: format!(
                        "Kite has no vCPU hotplug: max_vcpus must equal boot_vcpus ({boot}), got {max}"
                    ),
                });
            }
        }
        // Kite's topology: one package, one die, one thread per core.
        let topology = json!({
            "threads_per_core": 1, "cores_per_die": boot, "dies_per_package": 1, "packages": 1,
        });
        self.topology.only(
            "cpus.topology",
            &[topology],
            "Kite presents one package of single-threaded cores, one per vCPU",
        )?;
        self.kvm_hyperv.only(
            "cpus.kvm_hyperv",
            &[json!(false)],
            "Kite has no Hyper-V enlightenments",
        )?;
        self.max_phys_bits.only(
            "cpus.max_phys_bits",
            &[json!(DEFAULT_MAX_PHYS_BITS)],
            "Kite does not set the guest's physical address width (it shows the host's); \
             only Cloud Hypervisor's default is accepted",
        )?;
        self.affinity
            .none("cpus.affinity", "Kite does not pin vCPU threads")?;
        self.features.only(
            "cpus.features",
            &[json!({}), json!({"amx": false})],
            "Kite enables no optional CPU features (amx)",
        )?;
        self.nested.only(
            "cpus.nested",
            &[json!(true)],
            "Kite shows the guest the host's nested virtualization as KVM reports it",
        )?;
        self.core_scheduling.only(
            "cpus.core_scheduling",
            &[json!("Vm")],
            "Kite does not set core scheduling; only Cloud Hypervisor's default is accepted",
        )?;
        self.profile.only(
            "cpus.profile",
            &[json!("Host")],
            "Kite shows the guest the host's CPU model (as KVM reports it)",
        )?;
        Ok(CpusConfig { boot })
    }
}

impl ch::MemoryConfig {
    fn into_memory(self) -> Result<MemoryConfig, VmConfigError> {
        refuse_unknown::<ch::MemoryConfig>(&self.unknown, "memory.")?;
        let size = self.size.required("memory.size", "guest RAM in bytes")?;
        let method = self.hotplug_method.get("memory.hotplug_method")?;
        let hotplug_size = self.hotplug_size.get("memory.hotplug_size")?;
        let hotplugged_size = self.hotplugged_size.get("memory.hotplugged_size")?;
        if hotplug_size.is_some() && method != Some(HotplugMethod::VirtioMem) {
            let got = match method {
                Some(_) => "\"Acpi\"",
                None => "nothing, which means \"Acpi\", Cloud Hypervisor's default",
            };
            return Err(VmConfigError::Unsupported {
                field: "memory.hotplug_method".into(),
                reason: format!(
                    "Kite hotplugs memory with virtio-mem only: with hotplug_size, \
                     hotplug_method must be \"VirtioMem\" (got {got})"
                ),
            });
        }
        let f = |key: &str| format!("memory.{key}");
        self.mergeable.only(
            &f("mergeable"),
            &[json!(false)],
            "Kite does not mark guest memory mergeable (KSM)",
        )?;
        self.shared.only(
            &f("shared"),
            &[json!(false)],
            "Kite's guest memory is private (no vhost-user backends share it)",
        )?;
        let huge = "Kite does not back guest memory with hugetlbfs pages";
        self.hugepages
            .only(&f("hugepages"), &[json!(false)], huge)?;
        self.hugepage_size.only(&f("hugepage_size"), &[], huge)?;
        self.prefault.only(
            &f("prefault"),
            &[json!(false)],
            "Kite does not prefault guest memory",
        )?;
        self.reserve.only(
            &f("reserve"),
            &[json!(false)],
            "Kite does not reserve swap space for guest memory",
        )?;
        self.thp.only(
            &f("thp"),
            &[json!(true)],
            "Kite always asks for transparent huge pages for guest memory",
        )?;
        self.zones
            .none(&f("zones"), "Kite does not support memory zones")?;
        Ok(MemoryConfig {
            size: Size(size.0),
            hotplug_size: hotplug_size.map(|b| Size(b.0)),
            hotplug_backing: HotplugBacking::Anon,
            hotplugged_size: hotplugged_size.map(|b| Size(b.0)),
        })
    }
}

impl ch::DiskConfig {
    fn into_disk(self, prefix: &str) -> Result<DiskConfig, VmConfigError> {
        let f = |key: &str| format!("{prefix}.{key}");
        refuse_unknown::<ch::DiskConfig>(&self.unknown, &format!("{prefix}."))?;
        let path = self.path.required(
            &f("path"),
            "the raw image or block device (Kite has no vhost-user disks)",
        )?;
        let path = non_empty_path(path, &f("path"))?;
        let readonly = self.readonly.get(&f("readonly"))?.unwrap_or(false);
        self.direct.only(
            &f("direct"),
            &[json!(false)],
            "Kite does not open disks with O_DIRECT",
        )?;
        self.iommu.only(&f("iommu"), &[json!(false)], NO_IOMMU)?;
        self.num_queues.only(
            &f("num_queues"),
            &[json!(1)],
            "Kite's virtio-blk has one request queue",
        )?;
        self.queue_size.only(
            &f("queue_size"),
            &[json!(128), json!(256)],
            "Kite's virtio-blk queue has 256 entries (Cloud Hypervisor's default, 128, is \
             accepted too)",
        )?;
        let vhost = "Kite does not support vhost-user disks";
        self.vhost_user
            .only(&f("vhost_user"), &[json!(false)], vhost)?;
        self.vhost_socket.only(&f("vhost_socket"), &[], vhost)?;
        let limit = "Kite has no I/O rate limiting";
        self.rate_limit_group
            .only(&f("rate_limit_group"), &[], limit)?;
        self.rate_limiter_config
            .only(&f("rate_limiter_config"), &[], limit)?;
        self.id.only(
            &f("id"),
            &[],
            "Kite names disks vda, vdb, ... in order; device ids are not supported",
        )?;
        self.serial.only(
            &f("serial"),
            &[],
            "Kite does not set virtio-blk serial numbers",
        )?;
        self.pci_segment
            .only(&f("pci_segment"), &[json!(0)], NO_PCI)?;
        self.pci_device_id.only(&f("pci_device_id"), &[], NO_PCI)?;
        self.queue_affinity
            .none(&f("queue_affinity"), "Kite does not pin queue threads")?;
        let io = "Kite uses neither io_uring nor AIO; either value is accepted";
        self.disable_io_uring
            .only(&f("disable_io_uring"), &[json!(false), json!(true)], io)?;
        self.disable_aio
            .only(&f("disable_aio"), &[json!(false), json!(true)], io)?;
        self.backing_files.only(
            &f("backing_files"),
            &[json!(false)],
            "Kite reads raw images only (no backing files)",
        )?;
        self.sparse.only(
            &f("sparse"),
            &[json!(true)],
            "Kite neither preallocates disks nor discards blocks",
        )?;
        self.image_type.only(
            &f("image_type"),
            &[json!("Raw"), json!("Unknown")],
            "Kite reads every disk as a raw image",
        )?;
        self.lock_granularity.only(
            &f("lock_granularity"),
            &[json!("ByteRange"), json!("Full")],
            "Kite locks the whole disk",
        )?;
        Ok(DiskConfig { path, readonly })
    }
}

impl ch::RngConfig {
    fn check(self) -> Result<(), VmConfigError> {
        refuse_unknown::<ch::RngConfig>(&self.unknown, "rng.")?;
        if let Some(src) = self.src.get("rng.src")? {
            if src != "/dev/urandom" && src != "/dev/random" {
                return Err(VmConfigError::Unsupported {
                    field: "rng.src".into(),
                    reason: format!(
                        "Kite's virtio-rng is fed by the host's getrandom: only \
                         \"/dev/urandom\" or \"/dev/random\" is accepted, got {src:?}"
                    ),
                });
            }
        }
        self.iommu.only("rng.iommu", &[json!(false)], NO_IOMMU)?;
        self.id.only("rng.id", &[], NO_IDS)?;
        self.pci_segment
            .only("rng.pci_segment", &[json!(0)], NO_PCI)?;
        self.pci_device_id.only("rng.pci_device_id", &[], NO_PCI)?;
        Ok(())
    }
}

impl ch::SerialConfig {
    fn check(self) -> Result<(), VmConfigError> {
        refuse_unknown::<ch::SerialConfig>(&self.unknown, "serial.")?;
        let mode = self
            .mode
            .required("serial.mode", "\"Tty\", the only mode Kite has")?;
        if mode != ConsoleMode::Tty {
            return Err(VmConfigError::Unsupported {
                field: "serial.mode".into(),
                reason: format!(
                    "Kite's serial port (ttyS0) always writes to the VMM's standard output: \
                     only mode \"Tty\" is accepted, got \"{mode:?}\""
                ),
            });
        }
        let out = "Kite's serial port writes to the VMM's standard output only";
        self.file.only("serial.file", &[], out)?;
        self.socket.only("serial.socket", &[], out)?;
        Ok(())
    }
}

impl ch::ConsoleConfig {
    fn check(self) -> Result<(), VmConfigError> {
        refuse_unknown::<ch::ConsoleConfig>(&self.unknown, "console.")?;
        let mode = self
            .mode
            .required("console.mode", "\"Off\", the only mode Kite has")?;
        let none = "Kite has no virtio-console (hvc0); its console is the serial port";
        if mode != ConsoleMode::Off {
            return Err(VmConfigError::Unsupported {
                field: "console.mode".into(),
                reason: format!("{none}: only mode \"Off\" is accepted, got \"{mode:?}\""),
            });
        }
        self.file.only("console.file", &[], none)?;
        self.socket.only("console.socket", &[], none)?;
        self.iommu
            .only("console.iommu", &[json!(false)], NO_IOMMU)?;
        self.id.only("console.id", &[], NO_IDS)?;
        self.pci_segment
            .only("console.pci_segment", &[json!(0)], NO_PCI)?;
        self.pci_device_id
            .only("console.pci_device_id", &[], NO_PCI)?;
        Ok(())
    }
}

impl ch::DebugConsoleConfig {
    fn check(self) -> Result<(), VmConfigError> {
        refuse_unknown::<ch::DebugConsoleConfig>(&self.unknown, "debug_console.")?;
        let none = "Kite has no debug console (I/O port 0xe9)";
        self.mode
            .only("debug_console.mode", &[json!("Off")], none)?;
        self.file.only("debug_console.file", &[], none)?;
        self.iobase.only(
            "debug_console.iobase",
            &[json!(DEFAULT_DEBUG_CONSOLE_PORT)],
            none,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
            e.starts_with(
                "memroy: unknown field (Cloud Hypervisor's VmConfig has balloon, console,"
            ) && e.contains(" memory, "),
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
                &["size", "hotplug_method", "hotplug_size", "hotplugged_size"],
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
        assert_eq!(checked, 4 + 8 + 8 + 19 + 4 + 2 + 6 + 3);
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
            ("/memory/thp", json!(false), "memory.thp"),
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
            ("/serial/mode", json!("Null"), "serial.mode"),
            ("/serial/mode", json!("Off"), "serial.mode"),
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
            &with(full(), "/serial", json!({"mode": "Null"})),
            "serial.mode",
        );
        assert!(e.to_string().contains("standard output"), "{e}");
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
            json!({"size": 512 << 20, "hotplug_method": "VirtioMem", "hotplug_size": GIB})
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
}
