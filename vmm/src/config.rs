//! What `kite run` boots: the VM configuration, from flags in Cloud Hypervisor's
//! `key=value,…` style or from a JSON file that mirrors them.
//!
//! ```
//! use vmm::config::{MemoryConfig, CpusConfig};
//! let memory: MemoryConfig = "size=1G".parse().unwrap();
//! assert_eq!(memory.size.bytes(), 1 << 30);
//! let cpus: CpusConfig = "boot=2".parse().unwrap();
//! assert_eq!(cpus.boot, 2);
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most vCPUs a VM may have: APIC ids are one byte in the MP table, and 0xff is broadcast.
pub const MAX_VCPUS: u32 = 254;
/// Least guest memory Kite boots a Linux guest with.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Most guest memory Kite accepts (a sanity bound; the host may allow less).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Guest memory without `--memory`.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Most virtio devices (one I/O APIC line each, 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest kernel command line (Linux's x86 `COMMAND_LINE_SIZE`, less the terminating NUL).
pub const MAX_CMDLINE: usize = 2047;
/// Largest JSON configuration file read.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Errors in the VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option list names a key the option does not have.
    #[error("--{option}: unknown key '{key}' (known: {known})")]
    UnknownKey {
        /// The flag.
        option: &'static str,
        /// The key given.
        key: String,
        /// The keys the flag has.
        known: String,
    },
    /// An option list item is not `key=value`.
    #[error("--{option}: '{item}' is not key=value")]
    NotKeyValue {
        /// The flag.
        option: &'static str,
        /// The item given.
        item: String,
    },
    /// A key appears twice.
    #[error("--{option}: key '{key}' given twice")]
    DuplicateKey {
        /// The flag.
        option: &'static str,
        /// The key.
        key: String,
    },
    /// A required key is missing.
    #[error("--{option}: '{key}=' is required")]
    MissingKey {
        /// The flag.
        option: &'static str,
        /// The key.
        key: &'static str,
    },
    /// A size is not a number with an optional K, M, G or T suffix.
    #[error("'{0}' is not a size (examples: 512M, 2G, 1048576)")]
    BadSize(String),
    /// An on/off key has another value.
    #[error("--{option}: {key}='{value}' is not on or off")]
    BadSwitch {
        /// The flag.
        option: &'static str,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A key with a fixed set of values has another.
    #[error("--{option}: {key}='{value}' is not one of {choices}")]
    BadChoice {
        /// The flag.
        option: &'static str,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// The values allowed.
        choices: &'static str,
    },
    /// A hotplug area that is not whole blocks, or too large.
    #[error("--memory: hotplug_size={} must be a multiple of {} MiB, at most {} GiB", Size(*.0), HOTPLUG_BLOCK >> 20, MAX_MEMORY >> 30)]
    HotplugSize(u64),
    /// Initially plugged memory that is not whole virtio-mem blocks or exceeds the area.
    #[error(
        "--memory: hotplugged_size={} must be a multiple of {} MiB and fit in hotplug_size={}",
        Size(*.plugged), devices::virtio::mem::BLOCK_SIZE >> 20, Size(*.area)
    )]
    HotpluggedSize {
        /// The size given.
        plugged: u64,
        /// The hotplug area's size (0 without one).
        area: u64,
    },
    /// More virtio devices than interrupt lines for them.
    #[error("{0} virtio devices is too many (at most {MAX_VIRTIO_DEVICES})")]
    TooManyDevices(usize),
    /// A count is not a number.
    #[error("--cpus: boot='{0}' is not a number")]
    BadCount(String),
    /// Too many or too few vCPUs.
    #[error("--cpus: boot={0} is out of range (1 to {MAX_VCPUS})")]
    VcpuCount(u32),
    /// Guest memory smaller than Kite can boot.
    #[error("--memory: size={} is too small (at least {} MiB)", Size(*.0), MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    /// Guest memory beyond Kite's bound.
    #[error("--memory: size={} is too large (at most {} GiB)", Size(*.0), MAX_MEMORY >> 30)]
    MemoryTooLarge(u64),
    /// Guest memory not a whole number of pages.
    #[error("--memory: size={0} is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    /// The kernel command line is too long.
    #[error("--cmdline: {0} bytes is too long (at most {MAX_CMDLINE})")]
    CmdlineTooLong(usize),
    /// The configuration file cannot be read.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A size in bytes, written as `512M`, `2G`, `4096` (K, M, G, T are powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Size {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadSize(s.to_string());
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1 << shift).map(Size).ok_or_else(bad)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        for (shift, unit) in UNITS {
            if self.0 != 0 && self.0 % (1 << shift) == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    /// A number of bytes, or a string such as `"512M"`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Splits `key=value,key=value` for `option`, rejecting keys not in `known` and repeats.
pub(crate) fn parse_options<'a>(
    option: &'static str,
    s: &'a str,
    known: &[&'static str],
) -> Result<Vec<(&'static str, &'a str)>, ConfigError> {
    let mut out: Vec<(&'static str, &'a str)> = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::NotKeyValue {
                option,
                item: item.to_string(),
            })?;
        let key = *known
            .iter()
            .find(|k| **k == key)
            .ok_or_else(|| ConfigError::UnknownKey {
                option,
                key: key.to_string(),
                known: known.join(", "),
            })?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(ConfigError::DuplicateKey {
                option,
                key: key.to_string(),
            });
        }
        out.push((key, value));
    }
    Ok(out)
}

/// `--cpus boot=N`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    pub boot: u32,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig { boot: 1 }
    }
}

impl FromStr for CpusConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut cpus = CpusConfig::default();
        let options = parse_options("cpus", s, &["boot"])?;
        let (_, boot) = options.first().ok_or(ConfigError::MissingKey {
            option: "cpus",
            key: "boot",
        })?;
        cpus.boot = boot
            .parse()
            .map_err(|_| ConfigError::BadCount(boot.to_string()))?;
        Ok(cpus)
    }
}

/// `--memory size=512M`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM at boot.
    pub size: Size,
    /// Size of the hotplug area (virtio-mem) above guest RAM; none without it.
    #[serde(default)]
    pub hotplug_size: Option<Size>,
    /// How hotplugged memory is backed.
    #[serde(default)]
    pub hotplug_backing: HotplugBacking,
    /// Hotplug memory requested from the start (the guest plugs it when its driver
    /// starts, as after a resize); none without it.
    #[serde(default)]
    pub hotplugged_size: Option<Size>,
    /// Whether guest RAM and the hotplug area are advised transparent huge pages (`thp=on`:
    /// fewer faults and TLB misses, for guests that touch most of their memory); `thp=off`,
    /// the default, keeps 4 KiB pages, so a guest costs the pages it touched and a first
    /// touch zeroes 4 KiB, not 2 MiB (density, start). Memory restored lazily or privately
    /// from a snapshot is never advised.
    #[serde(default = "thp_default")]
    pub thp: bool,
}

fn thp_default() -> bool {
    false
}

/// `hotplug_backing=`: how hotplugged memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HotplugBacking {
    /// Private anonymous memory, populated by the host kernel on first touch.
    #[default]
    Anon,
    /// Populated on first touch through userfaultfd by Kite's fault-handler thread.
    Lazy,
}

/// Granularity of the hotplug area's size: Linux's memory block on x86_64, the unit its
/// virtio-mem driver adds memory to the system in (it plugs 2 MiB device blocks inside).
pub const HOTPLUG_BLOCK: u64 = 128 << 20;

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: Size(DEFAULT_MEMORY),
            hotplug_size: None,
            hotplug_backing: HotplugBacking::Anon,
            hotplugged_size: None,
            thp: thp_default(),
        }
    }
}

impl FromStr for MemoryConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut memory = MemoryConfig::default();
        let mut sized = false;
        let keys = [
            "size",
            "hotplug_size",
            "hotplug_backing",
            "hotplugged_size",
            "thp",
        ];
        for (key, value) in parse_options("memory", s, &keys)? {
            match key {
                "size" => {
                    memory.size = value.parse()?;
                    sized = true;
                }
                "hotplug_size" => memory.hotplug_size = Some(value.parse()?),
                "hotplugged_size" => memory.hotplugged_size = Some(value.parse()?),
                "thp" => {
                    memory.thp = match value {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => {
                            return Err(ConfigError::BadSwitch {
                                option: "memory",
                                key: "thp",
                                value: value.to_string(),
                            })
                        }
                    }
                }
                _ => {
                    memory.hotplug_backing = match value {
                        "anon" => HotplugBacking::Anon,
                        "lazy" => HotplugBacking::Lazy,
                        _ => {
                            return Err(ConfigError::BadChoice {
                                option: "memory",
                                key: "hotplug_backing",
                                value: value.to_string(),
                                choices: "anon, lazy",
                            })
                        }
                    }
                }
            }
        }
        if !sized {
            return Err(ConfigError::MissingKey {
                option: "memory",
                key: "size",
            });
        }
        Ok(memory)
    }
}

/// `--disk path=FILE[,readonly=on]`: a virtio-blk disk on a raw file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The raw disk image.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub readonly: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut path = None;
        let mut readonly = false;
        for (key, value) in parse_options("disk", s, &["path", "readonly"])? {
            match key {
                "path" => path = Some(PathBuf::from(value)),
                _ => {
                    readonly = match value {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => {
                            return Err(ConfigError::BadSwitch {
                                option: "disk",
                                key: "readonly",
                                value: value.to_string(),
                            })
                        }
                    }
                }
            }
        }
        let path = path.ok_or(ConfigError::MissingKey {
            option: "disk",
            key: "path",
        })?;
        Ok(DiskConfig { path, readonly })
    }
}

/// One VM: what `kite run` boots. Also the schema of `--config FILE`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage); the default guest's kernel if absent.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initramfs; the default guest's if absent and the kernel is the default one.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; replaces the default one.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest memory.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Whether the guest gets a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Where the serial console goes.
    #[serde(default)]
    pub serial: SerialMode,
}

/// Where the serial console (`ttyS0`) goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// The VMM's standard output and input.
    #[default]
    Tty,
    /// Nowhere: the guest's output is dropped (still watched for a kernel panic), it
    /// gets no input.
    Off,
}

impl VmConfig {
    /// Reads a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let file_error = |reason: String| ConfigError::File {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| file_error(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| file_error(e.to_string()))?;
        if text.len() as u64 > MAX_CONFIG_FILE {
            return Err(file_error(format!(
                "larger than {} KiB",
                MAX_CONFIG_FILE >> 10
            )));
        }
        serde_json::from_str(&text).map_err(|e| file_error(e.to_string()))
    }

    /// Checks the bounds Kite itself sets; the host's limits are checked when the VM is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.cpus.boot) {
            return Err(ConfigError::VcpuCount(self.cpus.boot));
        }
        let size = self.memory.size.bytes();
        if size < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(size));
        }
        if size > MAX_MEMORY {
            return Err(ConfigError::MemoryTooLarge(size));
        }
        if size % memory::PAGE_SIZE != 0 {
            return Err(ConfigError::MemoryUnaligned(size));
        }
        if let Some(Size(hotplug)) = self.memory.hotplug_size {
            if hotplug % HOTPLUG_BLOCK != 0 || hotplug > MAX_MEMORY {
                return Err(ConfigError::HotplugSize(hotplug));
            }
        }
        if let Some(Size(plugged)) = self.memory.hotplugged_size {
            let area = self.memory.hotplug_size.map_or(0, Size::bytes);
            if plugged % devices::virtio::mem::BLOCK_SIZE != 0 || plugged > area {
                return Err(ConfigError::HotpluggedSize { plugged, area });
            }
        }
        let hotplug = usize::from(self.memory.hotplug_size.is_some_and(|s| s.0 > 0));
        let devices = self.disks.len() + usize::from(self.rng) + hotplug;
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        match &self.cmdline {
            Some(c) if c.len() > MAX_CMDLINE => Err(ConfigError::CmdlineTooLong(c.len())),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert_eq!("512M".parse::<Size>().unwrap(), Size(512 << 20));
        assert_eq!("2g".parse::<Size>().unwrap(), Size(2 << 30));
        assert_eq!("1T".parse::<Size>().unwrap(), Size(1 << 40));
        for bad in [
            "",
            "M",
            "12Q",
            "-1G",
            "1.5G",
            "99999999999999999999",
            "16777216T",
        ] {
            assert_eq!(
                bad.parse::<Size>(),
                Err(ConfigError::BadSize(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(Size(512 << 20).to_string(), "512M");
        assert_eq!(Size(4097).to_string(), "4097");
    }

    #[test]
    fn option_lists_reject_unknown_repeated_and_malformed_keys() {
        assert!(matches!(
            "size=1G,hotplug=2G".parse::<MemoryConfig>(),
            Err(ConfigError::UnknownKey { key, .. }) if key == "hotplug"
        ));
        assert!(matches!(
            "size=1G,size=2G".parse::<MemoryConfig>(),
            Err(ConfigError::DuplicateKey { .. })
        ));
        assert!(matches!(
            "1G".parse::<MemoryConfig>(),
            Err(ConfigError::NotKeyValue { .. })
        ));
        assert!(matches!(
            "".parse::<CpusConfig>(),
            Err(ConfigError::MissingKey { key: "boot", .. })
        ));
        assert_eq!(
            "boot=two".parse::<CpusConfig>(),
            Err(ConfigError::BadCount("two".into()))
        );
    }

    #[test]
    fn hotplug_keys_parse_and_are_checked() {
        let m: MemoryConfig = "size=512M,hotplug_size=4G,hotplug_backing=lazy"
            .parse()
            .unwrap();
        assert_eq!(m.hotplug_size, Some(Size(4 << 30)));
        assert_eq!(m.hotplug_backing, HotplugBacking::Lazy);
        assert!(matches!(
            "hotplug_size=1G".parse::<MemoryConfig>(),
            Err(ConfigError::MissingKey { key: "size", .. })
        ));
        assert!(matches!(
            "size=1G,hotplug_backing=file".parse::<MemoryConfig>(),
            Err(ConfigError::BadChoice { .. })
        ));
        let c = VmConfig {
            memory: "size=512M,hotplug_size=100M".parse().unwrap(),
            ..VmConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::HotplugSize(100 << 20)));
        for (memory, plugged, area) in [
            ("size=512M,hotplugged_size=2M", 2 << 20, 0),
            (
                "size=512M,hotplug_size=128M,hotplugged_size=256M",
                256 << 20,
                128 << 20,
            ),
            (
                "size=512M,hotplug_size=128M,hotplugged_size=3M",
                3 << 20,
                128 << 20,
            ),
        ] {
            let c = VmConfig {
                memory: memory.parse().unwrap(),
                ..VmConfig::default()
            };
            assert_eq!(
                c.validate(),
                Err(ConfigError::HotpluggedSize { plugged, area }),
                "{memory}"
            );
        }
        let c = VmConfig {
            memory: "size=512M,hotplug_size=128M,hotplugged_size=4M"
                .parse()
                .unwrap(),
            ..VmConfig::default()
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.memory.hotplugged_size, Some(Size(4 << 20)));
        let json: VmConfig = serde_json::from_str(
            r#"{"memory": {"size": "512M", "hotplug_size": "2G", "hotplug_backing": "lazy"}}"#,
        )
        .unwrap();
        assert_eq!(json.memory.hotplug_backing, HotplugBacking::Lazy);
    }

    #[test]
    fn disks_parse() {
        let d: DiskConfig = "path=/img,readonly=on".parse().unwrap();
        assert_eq!((d.path.as_path(), d.readonly), (Path::new("/img"), true));
        let d: DiskConfig = "path=/img".parse().unwrap();
        assert!(!d.readonly);
        assert!(matches!(
            "readonly=on".parse::<DiskConfig>(),
            Err(ConfigError::MissingKey { key: "path", .. })
        ));
        assert!(matches!(
            "path=/img,readonly=maybe".parse::<DiskConfig>(),
            Err(ConfigError::BadSwitch { .. })
        ));
        let c: VmConfig = serde_json::from_str(
            r#"{"disks": [{"path": "/a"}, {"path": "/b", "readonly": true}], "rng": true}"#,
        )
        .unwrap();
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].readonly && c.rng);
        let many = VmConfig {
            disks: vec![d; MAX_VIRTIO_DEVICES],
            rng: true,
            ..VmConfig::default()
        };
        assert_eq!(
            many.validate(),
            Err(ConfigError::TooManyDevices(MAX_VIRTIO_DEVICES + 1))
        );
    }

    #[test]
    fn validation_bounds() {
        let mut c = VmConfig::default();
        c.validate().unwrap();
        c.cpus.boot = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(0)));
        c.cpus.boot = MAX_VCPUS + 1;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(MAX_VCPUS + 1)));
        c.cpus.boot = 2;
        c.memory.size = Size(1 << 20);
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(1 << 20)));
        c.memory.size = Size(MAX_MEMORY + 4096);
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooLarge(_))));
        c.memory.size = Size(MIN_MEMORY + 1);
        assert!(matches!(c.validate(), Err(ConfigError::MemoryUnaligned(_))));
        c.memory.size = Size(MIN_MEMORY);
        c.cmdline = Some("x".repeat(MAX_CMDLINE));
        c.validate().unwrap();
        c.cmdline = Some("x".repeat(MAX_CMDLINE + 1));
        assert_eq!(
            c.validate(),
            Err(ConfigError::CmdlineTooLong(MAX_CMDLINE + 1))
        );
    }

    #[test]
    fn json_mirrors_the_flags() {
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel": "/k", "cmdline": "console=ttyS0", "cpus": {"boot": 2},
                "memory": {"size": "1G"}}"#,
        )
        .unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.cpus.boot, 2);
        assert_eq!(c.memory.size, Size(1 << 30));
        let bytes: VmConfig = serde_json::from_str(r#"{"memory": {"size": 134217728}}"#).unwrap();
        assert_eq!(bytes.memory.size, Size(128 << 20));
        assert!(serde_json::from_str::<VmConfig>(r#"{"memroy": {}}"#).is_err());
        let round: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }
}
