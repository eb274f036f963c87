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
    pub(super) thp: Field<bool>,
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
