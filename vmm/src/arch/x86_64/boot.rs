//! Loading a Linux guest: the kernel (ELF vmlinux with a PVH or 64-bit entry, or bzImage),
//! the initramfs and command line, and the tables the kernel reads at boot (PVH start info or
//! zero page with the memory map, boot GDT and page tables, MP table).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    self, CMDLINE, CMDLINE_MAX, GDT_ADDR, HIMEM_START, IDT_ADDR, MPTABLE, PML4, PVH_MEMMAP,
    PVH_MODLIST, PVH_START_INFO, ZERO_PAGE,
};
use super::mptable;
use super::regs::BootEntry;

const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// bzImage `xloadflags`: the kernel has a 64-bit entry at its load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry in a bzImage's protected-mode kernel.
const BZIMAGE_ENTRY_64: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;

/// Errors loading a guest. [`BootError::is_bad_input`] tells the user's files and settings
/// apart from the VMM's own failures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot file cannot be opened or read.
    #[error("{what} {path}: {source}")]
    Open {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel file is neither format Kite loads.
    #[error("kernel {0}: not a kernel image (an ELF vmlinux or a bzImage)")]
    NotAKernel(PathBuf),
    /// The kernel cannot be loaded.
    #[error("kernel {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The loader's error.
        source: linux_loader::loader::Error,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("kernel {0}: this bzImage has no 64-bit entry point")]
    No64BitEntry(PathBuf),
    /// The initramfs is empty.
    #[error("initramfs {0}: the file is empty")]
    EmptyInitramfs(PathBuf),
    /// The initramfs does not fit between the kernel and the end of low memory.
    #[error(
        "initramfs {path}: {size} bytes do not fit in guest memory between the kernel \
         (ends at {kernel_end:#x}) and {limit:#x}; give the guest more memory"
    )]
    InitramfsTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// Highest address the initramfs may end at.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0} (at most {max} bytes)", max = CMDLINE_MAX - 1)]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line to guest memory failed.
    #[error("cannot write the kernel command line to guest memory: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
    /// Writing boot data to guest memory failed.
    #[error("cannot write the {what} to guest memory: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the boot parameters failed.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

impl BootError {
    /// Whether the user's files or settings are at fault (rather than the VMM).
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            BootError::GuestMemory { .. } | BootError::BootParams(_) | BootError::CmdlineWrite(_)
        )
    }
}

/// What to boot.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Initramfs, if any.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPUs (for the MP table).
    pub cpus: u8,
    /// Guest RAM regions `(start, size)`, sorted; the first starts at 0.
    pub ram: &'a [(GuestAddress, u64)],
}

fn guest_write(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::GuestMemory { what, source }
}

/// A loaded kernel: where it is and how to enter it.
struct LoadedKernel {
    end: u64,
    entry: KernelEntry,
    /// The bzImage setup header, to start the zero page from.
    header: Option<setup_header>,
}

#[derive(Clone, Copy)]
enum KernelEntry {
    Pvh(u64),
    Linux64(u64),
}

/// Opens a boot file without waiting (a FIFO put there since the configuration was
/// checked must not hang the VMM), and only a regular file.
fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    use std::os::unix::fs::OpenOptionsExt;
    let error = |source| BootError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(error)?;
    if !file.metadata().map_err(error)?.is_file() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(file)
}

fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = open("kernel", path)?;
    let mut magic = [0u8; 4];
    let read_error = |source| BootError::Open {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let is_elf = match file.read_exact(&mut magic) {
        Ok(()) => magic == *b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(BootError::NotAKernel(path.to_path_buf()))
        }
        Err(e) => return Err(read_error(e)),
    };
    let is_bzimage = !is_elf && {
        let mut hdr = [0u8; 4];
        file.seek(SeekFrom::Start(0x202)).map_err(read_error)?;
        file.read_exact(&mut hdr).is_ok() && hdr == *b"HdrS"
    };
    let load_error = |source| BootError::Load {
        path: path.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    if is_elf {
        let result = Elf::load(mem, None, &mut file, himem).map_err(load_error)?;
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => KernelEntry::Pvh(addr.0),
            _ => KernelEntry::Linux64(result.kernel_load.0),
        };
        Ok(LoadedKernel {
            end: result.kernel_end,
            entry,
            header: None,
        })
    } else if is_bzimage {
        let result = BzImage::load(mem, None, &mut file, himem).map_err(load_error)?;
        let header = result
            .setup_header
            .ok_or_else(|| BootError::NotAKernel(path.to_path_buf()))?;
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry(path.to_path_buf()));
        }
        Ok(LoadedKernel {
            end: result.kernel_end,
            entry: KernelEntry::Linux64(result.kernel_load.0 + BZIMAGE_ENTRY_64),
            header: Some(header),
        })
    } else {
        Err(BootError::NotAKernel(path.to_path_buf()))
    }
}

/// Loads the initramfs at the top of low memory, above the kernel; returns (address, size).
fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = open("initramfs", path)?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initramfs",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(BootError::EmptyInitramfs(path.to_path_buf()));
    }
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(memory::PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    let size_usize = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size_usize)
        .map_err(guest_write("initramfs"))?;
    Ok((addr, size))
}

/// Loads everything `spec` names into `mem` and returns how to enter the kernel.
pub fn load<M: GuestMemoryBackend>(mem: &M, spec: &BootSpec<'_>) -> Result<BootEntry, BootError> {
    let cmdline = Cmdline::try_from(spec.cmdline, CMDLINE_MAX).map_err(BootError::Cmdline)?;
    let kernel = load_kernel(mem, spec.kernel)?;
    let low_end = spec.ram.first().map_or(0, |(start, size)| start.0 + size);
    let initrd_limit = match kernel.header {
        Some(h) => low_end.min(u64::from(h.initrd_addr_max) + 1),
        None => low_end,
    };
    let initramfs = spec
        .initramfs
        .map(|path| load_initramfs(mem, path, kernel.end, initrd_limit))
        .transpose()?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(BootError::CmdlineWrite)?;
    let e820 = layout::e820_ram(spec.ram);

    let entry = match kernel.entry {
        KernelEntry::Pvh(entry) => {
            write_pvh_start_info(mem, &e820, initramfs)?;
            BootEntry::Pvh {
                entry,
                start_info: PVH_START_INFO,
            }
        }
        KernelEntry::Linux64(entry) => {
            let len = cmdline
                .as_cstring()
                .map(|c| c.as_bytes().len())
                .unwrap_or(0);
            write_zero_page(mem, kernel.header, &e820, initramfs, len as u32)?;
            write_page_tables(mem)?;
            BootEntry::Linux64 {
                entry,
                zero_page: ZERO_PAGE,
            }
        }
    };
    for (i, descriptor) in entry.gdt().iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(guest_write("boot GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(guest_write("boot IDT"))?;
    mem.write_slice(&mptable::build(spec.cpus), GuestAddress(MPTABLE))
        .map_err(guest_write("MP table"))?;
    Ok(entry)
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    e820: &[(u64, u64)],
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initramfs.is_some()),
        modlist_paddr: if initramfs.is_some() { PVH_MODLIST } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
    if let Some((paddr, size)) = initramfs {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    header: Option<setup_header>,
    e820: &[(u64, u64)],
    initramfs: Option<(u64, u64)>,
    cmdline_len: u32,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = addr;
        slot.size = size;
        slot.r#type = E820_RAM;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(BootError::BootParams)
}

/// Identity map of the first GiB in 2 MiB pages, for the 64-bit entry.
fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let (pdpt, pd) = (PML4 + 0x1000, PML4 + 0x2000);
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(guest_write("boot page tables"))
    };
    write(pdpt | PRESENT_WRITABLE, PML4)?;
    write(pd | PRESENT_WRITABLE, pdpt)?;
    for i in 0..512u64 {
        write((i << 21) | PRESENT_WRITABLE | HUGE, pd + 8 * i)?;
    }
    Ok(())
}
