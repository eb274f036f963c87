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
//! - `serial`: Kite's 8250 (`ttyS0`) writes to the VMM's standard output, which is mode
//!   `"Tty"` (also for an absent `serial`), or nowhere: `"Null"` and `"Off"` (the port
//!   stays, what the guest writes is dropped); `"File"`, `"Pty"` and `"Socket"` are
//!   refused.
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
    ConfigError, CpusConfig, DiskConfig, HotplugBacking, MemoryConfig, SerialMode, Size, VmConfig,
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
/// (when the VM has one), `serial: {mode: "Tty"}` (or `"Off"`) and `console: {mode: "Off"}`.
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
    let mut memory = json!({"size": config.memory.size.bytes(), "thp": config.memory.thp});
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
        "serial": {"mode": match config.serial {
            SerialMode::Tty => "Tty",
            SerialMode::Off => "Off",
        }},
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
mod ch;
mod checks;

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

#[cfg(test)]
mod tests;
