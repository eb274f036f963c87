//! Each section of Cloud Hypervisor's `VmConfig` checked and turned into Kite's settings.

use super::*;

impl ch::VmConfig {
    pub(super) fn into_config(self) -> Result<VmConfig, VmConfigError> {
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
        let serial = match self.serial.get("serial")? {
            Some(serial) => serial.into_mode()?,
            None => SerialMode::Tty,
        };
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
            serial,
        })
    }
}

impl ch::PayloadConfig {
    /// Kernel, initramfs, command line.
    pub(super) fn into_payload(
        self,
    ) -> Result<(PathBuf, Option<PathBuf>, Option<String>), VmConfigError> {
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
    pub(super) fn into_cpus(self) -> Result<CpusConfig, VmConfigError> {
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
    pub(super) fn into_memory(self) -> Result<MemoryConfig, VmConfigError> {
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
        // Kite's default (4 KiB pages, see `MemoryConfig::thp`), not Cloud Hypervisor's.
        let thp = self.thp.get("memory.thp")?.unwrap_or(false);
        self.zones
            .none(&f("zones"), "Kite does not support memory zones")?;
        Ok(MemoryConfig {
            size: Size(size.0),
            hotplug_size: hotplug_size.map(|b| Size(b.0)),
            hotplug_backing: HotplugBacking::Anon,
            hotplugged_size: hotplugged_size.map(|b| Size(b.0)),
            thp,
        })
    }
}

impl ch::DiskConfig {
    pub(super) fn into_disk(self, prefix: &str) -> Result<DiskConfig, VmConfigError> {
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
    pub(super) fn check(self) -> Result<(), VmConfigError> {
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
    pub(super) fn into_mode(self) -> Result<SerialMode, VmConfigError> {
        refuse_unknown::<ch::SerialConfig>(&self.unknown, "serial.")?;
        let mode = self
            .mode
            .required("serial.mode", "\"Tty\", \"Null\" or \"Off\"")?;
        let mode = match mode {
            ConsoleMode::Tty => SerialMode::Tty,
            // Kite keeps the port (the guest cannot tell) and drops what it writes.
            ConsoleMode::Null | ConsoleMode::Off => SerialMode::Off,
            other => {
                return Err(VmConfigError::Unsupported {
                    field: "serial.mode".into(),
                    reason: format!(
                        "Kite's serial port (ttyS0) writes to the VMM's standard output or \
                         nowhere: modes \"Tty\", \"Null\" and \"Off\" are accepted, got \
                         \"{other:?}\""
                    ),
                })
            }
        };
        let out = "Kite's serial port writes to the VMM's standard output only";
        self.file.only("serial.file", &[], out)?;
        self.socket.only("serial.socket", &[], out)?;
        Ok(mode)
    }
}

impl ch::ConsoleConfig {
    pub(super) fn check(self) -> Result<(), VmConfigError> {
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
    pub(super) fn check(self) -> Result<(), VmConfigError> {
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
