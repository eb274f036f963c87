//! The VM as Kite builds it: a [`VmConfig`] resolved (the default guest found, every
//! file checked) and validated once, with the final kernel command line — the device
//! announcements included — checked against Linux's limit. The builder, `vm.info` and
//! the API all work from this one type.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, DiskConfig, HotplugBacking, VmConfig, MAX_CMDLINE};
use crate::device_manager::announcement;

/// Errors resolving a configuration.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A setting is out of range or inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file the VM needs cannot be opened.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// "kernel", "initramfs" or "disk".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No kernel given and the default guest is not built.
    #[error(
        "no kernel given, and the default guest is not built ({} is missing; run \
         resources/build-guest)", .0.display()
    )]
    NoDefaultGuest(PathBuf),
    /// The kernel command line is too long once the devices are announced on it.
    #[error(
        "the kernel command line would be {len} bytes with the announcements of {devices} \
         virtio devices appended (at most {MAX_CMDLINE}): shorten the command line"
    )]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// Devices announced on it.
        devices: usize,
    },
}

impl SpecError {
    /// Whether a file (rather than a setting) is at fault.
    pub fn is_bad_file(&self) -> bool {
        matches!(self, SpecError::File { .. } | SpecError::NoDefaultGuest(_))
    }
}

/// The hotplug area (virtio-mem).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotplugSpec {
    /// Its size in bytes.
    pub size: u64,
    /// How plugged blocks are backed.
    pub backing: HotplugBacking,
    /// Bytes requested from the start.
    pub requested: u64,
}

/// One VM, resolved and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// The configuration with every default filled in (kernel, initramfs and command line
    /// as used), as `vm.info` reports it.
    pub config: VmConfig,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line the guest gets: the configured one and the device
    /// announcements.
    pub cmdline: String,
    /// vCPUs (1..=[`crate::config::MAX_VCPUS`]).
    pub cpus: u8,
    /// Boot RAM in bytes.
    pub memory: u64,
    /// The hotplug area, if any.
    pub hotplug: Option<HotplugSpec>,
    /// virtio-blk disks, in the guest's order.
    pub disks: Vec<DiskConfig>,
    /// Whether the guest gets a virtio-rng device.
    pub rng: bool,
}

/// Where the default guest is: `$KITE_GUEST_DIR`, else `resources/build` of this source tree
/// (built by `resources/build-guest`).
pub fn default_guest_dir() -> PathBuf {
    std::env::var_os("KITE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("resources")
                .join("build")
        })
}

/// The kernel command line without one configured.
pub fn default_cmdline() -> String {
    let mut cmdline =
        String::from("console=ttyS0 reboot=k panic=-1 pci=off memhp_default_state=online_movable");
    if on_kvm_pvm_host() {
        // Instructions this host's KVM cannot emulate in guest kernel mode but shows through
        // CPUID anyway: the kernel must not use them.
        cmdline.push_str(
            " noxsave clearcpuid=popcnt,smap,smep,rdtscp,rdpid,fsgsbase,invpcid,pcid,avx,avx2,\
             bmi1,bmi2,umip,pku,rtm,hle",
        );
    }
    cmdline
}

/// Whether this host's KVM is kvm_pvm (no hardware virtualization underneath): there a stock
/// Linux guest cannot run user space.
pub fn on_kvm_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Checks that `path` is a file Kite can read: a regular file (or, for a disk, a block
/// device), never a FIFO or a character device whose open or read could block the VMM
/// for ever; and that it can be opened.
fn readable(what: &'static str, path: &Path) -> Result<(), SpecError> {
    use std::os::unix::fs::FileTypeExt;
    let error = |source| SpecError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let kind = std::fs::metadata(path).map_err(error)?.file_type();
    if !(kind.is_file() || (what == "disk" && kind.is_block_device())) {
        let wanted = if what == "disk" {
            "a regular file or a block device"
        } else {
            "a regular file"
        };
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not {wanted}"),
        )));
    }
    std::fs::File::open(path).map(drop).map_err(error)
}

impl VmSpec {
    /// Validates `config`, fills in its defaults and checks its files.
    pub fn resolve(config: VmConfig) -> Result<VmSpec, SpecError> {
        Self::resolve_for(config, true)
    }

    /// The VM a snapshot's configuration describes: validated, its disks checked, its
    /// kernel and initramfs not needed (the guest runs on from its memory).
    pub fn restored(config: VmConfig) -> Result<VmSpec, SpecError> {
        if config.kernel.is_none() {
            return Err(SpecError::Config(ConfigError::MissingKey {
                option: "the snapshot's configuration",
                key: "kernel",
            }));
        }
        Self::resolve_for(config, false)
    }

    fn resolve_for(mut config: VmConfig, boot: bool) -> Result<VmSpec, SpecError> {
        config.validate()?;
        let (kernel, initramfs) = match &config.kernel {
            Some(kernel) => (kernel.clone(), config.initramfs.clone()),
            None => {
                let dir = default_guest_dir();
                let kernel = dir.join("vmlinux");
                if !kernel.is_file() {
                    return Err(SpecError::NoDefaultGuest(kernel));
                }
                let initramfs = config
                    .initramfs
                    .clone()
                    .or_else(|| Some(dir.join("initramfs.cpio")));
                (kernel, initramfs)
            }
        };
        if boot {
            readable("kernel", &kernel)?;
            if let Some(initramfs) = &initramfs {
                readable("initramfs", initramfs)?;
            }
        }
        for disk in &config.disks {
            readable("disk", &disk.path)?;
        }
        let base = config.cmdline.clone().unwrap_or_else(default_cmdline);
        let hotplug = config
            .memory
            .hotplug_size
            .filter(|s| s.bytes() > 0)
            .map(|size| HotplugSpec {
                size: size.bytes(),
                backing: config.memory.hotplug_backing,
                requested: config.memory.hotplugged_size.map_or(0, |s| s.bytes()),
            });
        let devices = config.disks.len() + usize::from(config.rng) + usize::from(hotplug.is_some());
        let mut cmdline = base.clone();
        for index in 0..devices {
            cmdline.push(' ');
            cmdline.push_str(&announcement(index));
        }
        if cmdline.len() > MAX_CMDLINE {
            return Err(SpecError::CmdlineTooLong {
                len: cmdline.len(),
                devices,
            });
        }
        config.kernel = Some(kernel.clone());
        config.initramfs = initramfs.clone();
        config.cmdline = Some(base);
        Ok(VmSpec {
            // Validated: 1..=MAX_VCPUS, which fits a u8.
            cpus: u8::try_from(config.cpus.boot).unwrap_or(u8::MAX),
            memory: config.memory.size.bytes(),
            hotplug,
            disks: config.disks.clone(),
            rng: config.rng,
            kernel,
            initramfs,
            cmdline,
            config,
        })
    }

    /// Boot RAM plus the hotplug memory requested from the start.
    pub fn initial_memory(&self) -> u64 {
        self.memory + self.hotplug.map_or(0, |h| h.requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size;

    fn file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    #[test]
    fn the_final_command_line_announces_each_device_and_must_fit() {
        let kernel = file();
        let disk = file();
        let config = VmConfig {
            kernel: Some(kernel.path().into()),
            cmdline: Some("console=ttyS0".into()),
            disks: vec![DiskConfig {
                path: disk.path().into(),
                readonly: false,
            }],
            rng: true,
            ..VmConfig::default()
        };
        let spec = VmSpec::resolve(config.clone()).unwrap();
        assert_eq!(
            spec.cmdline,
            format!("console=ttyS0 {} {}", announcement(0), announcement(1))
        );
        assert_eq!(spec.config.cmdline.as_deref(), Some("console=ttyS0"));
        let long = VmConfig {
            cmdline: Some("x".repeat(MAX_CMDLINE - 10)),
            ..config
        };
        assert!(matches!(
            VmSpec::resolve(long),
            Err(SpecError::CmdlineTooLong { devices: 2, .. })
        ));
    }

    #[test]
    fn missing_files_are_named() {
        let config = VmConfig {
            kernel: Some("/nonexistent/vmlinux".into()),
            ..VmConfig::default()
        };
        let e = VmSpec::resolve(config).unwrap_err();
        assert!(
            e.is_bad_file() && e.to_string().contains("/nonexistent/vmlinux"),
            "{e}"
        );
        // Nothing whose open or read could block: a FIFO, a character device.
        for path in ["/dev/zero", "/dev/null"] {
            let config = VmConfig {
                kernel: Some(path.into()),
                ..VmConfig::default()
            };
            let e = VmSpec::resolve(config).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{path}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let config = VmConfig {
            kernel: Some(fifo),
            ..VmConfig::default()
        };
        // Opening a FIFO without a writer would block for ever: refused before that.
        let e = VmSpec::resolve(config).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let kernel = file();
        let bad = VmConfig {
            kernel: Some(kernel.path().into()),
            memory: crate::config::MemoryConfig {
                size: Size(1 << 20),
                ..Default::default()
            },
            ..VmConfig::default()
        };
        let e = VmSpec::resolve(bad).unwrap_err();
        assert!(!e.is_bad_file(), "{e}");
    }
}
