//! The `kite` command line: `kite run` boots a guest. Exit codes are part of the interface
//! (see [`exit`]).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, CpusConfig, DiskConfig, MemoryConfig, VmConfig};
use crate::end::VmEnd;
use crate::machine::{self, Blame, HotplugSpec, MachineSpec};
use crate::seccomp::SeccompMode;

/// Exit codes of `kite`.
pub mod exit {
    /// The guest powered off or rebooted.
    pub const GUEST_SHUTDOWN: i32 = 0;
    /// The VMM failed (KVM, the host), or KVM could not run the guest on.
    pub const VMM_ERROR: i32 = 1;
    /// The command line is wrong: unknown flags, unparsable or out-of-range values.
    pub const BAD_ARGUMENTS: i32 = 2;
    /// A file is wrong: the config file, kernel or initramfs (missing, unreadable, not a
    /// kernel, does not fit in guest memory).
    pub const BAD_INPUT: i32 = 3;
    /// The guest kernel panicked or the guest crashed (triple fault).
    pub const GUEST_CRASH: i32 = 4;
    /// The guest reported failure on the test exit port (0xf4).
    pub const GUEST_FAILURE: i32 = 5;
    /// A Kite thread made a system call its seccomp filter does not allow: Kite stopped
    /// at once (`--seccomp=on`).
    pub const BAD_SYSCALL: i32 = 6;
    /// The VM ran longer than `--timeout` and was stopped.
    pub const TIMEOUT: i32 = 124;
    /// Stopped by signal N (SIGINT, SIGTERM): 128 + N.
    pub const SIGNAL_BASE: i32 = 128;
}

#[derive(Debug, Parser)]
#[command(
    name = "kite",
    version,
    about = "Kite: a small KVM virtual-machine monitor"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Write the log to this file instead of stderr.
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest; its console is on stdin/stdout.
    Run(RunArgs),
    /// Talk to a running VM through its control socket.
    Remote(RemoteArgs),
}

#[derive(Debug, Args)]
struct RemoteArgs {
    /// The VM's control socket (kite run --api-socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    request: RemoteRequest,
}

#[derive(Debug, Subcommand)]
enum RemoteRequest {
    /// Print the VM's memory sizes, hotplug latencies and region-table metrics as JSON.
    Info,
    /// Ask the guest to plug or unplug memory until it has this much in all.
    Resize {
        /// The new total guest memory (boot memory + hotplugged), e.g. 2G.
        #[arg(long, value_name = "SIZE")]
        memory: String,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage [default: the default guest's].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs [default: the default guest's, when its kernel is used].
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line, replacing the default one.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// vCPUs: boot=N.
    #[arg(long, value_name = "boot=N")]
    cpus: Option<String>,
    /// Guest memory: size=SIZE[,hotplug_size=SIZE][,hotplugged_size=SIZE]
    /// [,hotplug_backing=anon|lazy] (K, M, G, T suffixes) [default: size=512M].
    #[arg(long, value_name = "size=SIZE")]
    memory: Option<String>,
    /// A virtio-blk disk: path=FILE[,readonly=on]; repeat for more (vda, vdb, ...).
    #[arg(long, value_name = "path=FILE[,readonly=on]")]
    disk: Vec<String>,
    /// A virtio-rng device (host getrandom).
    #[arg(long)]
    rng: bool,
    /// Serve the control socket here (kite remote talks to it).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// JSON configuration mirroring these flags; flags given as well override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Confine each thread with its seccomp filter: on (a forbidden system call ends
    /// Kite, exit 6), log (the kernel logs it), off.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    seccomp: SeccompMode,
    /// Stop the VM after this many seconds (exit 124), so a guest that neither
    /// finishes nor crashes cannot hold a CI job for ever.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: Option<std::time::Duration>,
}

/// `--timeout`: whole seconds, 1 to a year.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    const YEAR: u64 = 365 * 24 * 3600;
    match s.parse::<u64>() {
        Ok(n) if (1..=YEAR).contains(&n) => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!("'{s}' is not a number of seconds from 1 to {YEAR}")),
    }
}

/// The kernel command line without `--cmdline`.
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

/// A failure before the VM runs, with its exit code.
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn arguments(e: impl std::fmt::Display) -> Self {
        Failure {
            code: exit::BAD_ARGUMENTS,
            message: e.to_string(),
        }
    }
    fn input(e: impl std::fmt::Display) -> Self {
        Failure {
            code: exit::BAD_INPUT,
            message: e.to_string(),
        }
    }
}

impl RunArgs {
    /// The configuration: the file's (checked as a file), then the flags over it.
    fn config(&self) -> Result<VmConfig, Failure> {
        let mut config = match &self.config {
            Some(path) => {
                let config = VmConfig::from_file(path).map_err(Failure::input)?;
                config.validate().map_err(|e: ConfigError| {
                    Failure::input(format!("config file {}: {e}", path.display()))
                })?;
                config
            }
            None => VmConfig::default(),
        };
        if let Some(kernel) = &self.kernel {
            config.kernel = Some(kernel.clone());
        }
        if let Some(initramfs) = &self.initramfs {
            config.initramfs = Some(initramfs.clone());
        }
        if let Some(cmdline) = &self.cmdline {
            config.cmdline = Some(cmdline.clone());
        }
        if let Some(cpus) = &self.cpus {
            config.cpus = cpus.parse::<CpusConfig>().map_err(Failure::arguments)?;
        }
        if let Some(memory) = &self.memory {
            config.memory = memory.parse::<MemoryConfig>().map_err(Failure::arguments)?;
        }
        if !self.disk.is_empty() {
            config.disks = self
                .disk
                .iter()
                .map(|d| d.parse::<DiskConfig>())
                .collect::<Result<_, _>>()
                .map_err(Failure::arguments)?;
        }
        config.rng |= self.rng;
        config.validate().map_err(Failure::arguments)?;
        Ok(config)
    }
}

/// Checks that `path` can be opened, before any VM is made for it.
fn readable(what: &str, path: &Path) -> Result<(), Failure> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| Failure::input(format!("{what} {}: {e}", path.display())))
}

/// The boot files: the configured ones, or the default guest's.
fn boot_files(config: &VmConfig) -> Result<(PathBuf, Option<PathBuf>), Failure> {
    let (kernel, initramfs) = default_or_given(config)?;
    readable("kernel", &kernel)?;
    for disk in &config.disks {
        readable("disk", &disk.path)?;
    }
    if let Some(initramfs) = &initramfs {
        readable("initramfs", initramfs)?;
    }
    Ok((kernel, initramfs))
}

fn default_or_given(config: &VmConfig) -> Result<(PathBuf, Option<PathBuf>), Failure> {
    if let Some(kernel) = &config.kernel {
        return Ok((kernel.clone(), config.initramfs.clone()));
    }
    let dir = default_guest_dir();
    let kernel = dir.join("vmlinux");
    if !kernel.is_file() {
        return Err(Failure::input(format!(
            "no --kernel, and the default guest is not built ({} is missing; run \
             resources/build-guest)",
            kernel.display()
        )));
    }
    let initramfs = config
        .initramfs
        .clone()
        .or_else(|| Some(dir.join("initramfs.cpio")));
    Ok((kernel, initramfs))
}

/// How long `kite remote` waits for the VM's answer.
const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn remote(args: RemoteArgs) -> i32 {
    let (method, path, body) = match &args.request {
        RemoteRequest::Info => ("GET", "/api/v1/vm.info", None),
        RemoteRequest::Resize { memory } => {
            if let Err(e) = memory.parse::<crate::config::Size>() {
                eprintln!("kite: --memory: {e}");
                return exit::BAD_ARGUMENTS;
            }
            let body = serde_json::json!({"memory": memory}).to_string();
            ("PUT", "/api/v1/vm.resize", Some(body))
        }
    };
    let body = body.as_deref().map(str::as_bytes);
    match crate::api::request(&args.api_socket, method, path, body, REMOTE_TIMEOUT) {
        Ok((status, reply)) if (200..300).contains(&status) => {
            if matches!(args.request, RemoteRequest::Info) {
                let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap_or_default();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reply).unwrap_or_default()
                );
            }
            0
        }
        Ok((status, reply)) => {
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap_or_default();
            let why = reply
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("error");
            eprintln!("kite: the VM refused ({status}): {why}");
            exit::VMM_ERROR
        }
        Err(e) => {
            eprintln!("kite: --api-socket {}: {e}", args.api_socket.display());
            exit::VMM_ERROR
        }
    }
}

fn run(args: RunArgs) -> i32 {
    let prepared = args.config().and_then(|config| {
        let files = boot_files(&config)?;
        Ok((config, files))
    });
    let (config, (kernel, initramfs)) = match prepared {
        Ok(p) => p,
        Err(f) => {
            eprintln!("kite: {}", f.message);
            return f.code;
        }
    };
    let cmdline = config.cmdline.clone().unwrap_or_else(default_cmdline);
    log::info!(
        "booting {} ({} vCPUs, {} memory), cmdline: {cmdline}",
        kernel.display(),
        config.cpus.boot,
        config.memory.size
    );
    let spec = MachineSpec {
        kernel: &kernel,
        initramfs: initramfs.as_deref(),
        cmdline: &cmdline,
        // Validated: 1..=MAX_VCPUS, which fits a u8.
        cpus: u8::try_from(config.cpus.boot).unwrap_or(u8::MAX),
        memory: config.memory.size.bytes(),
        disks: &config.disks,
        rng: config.rng,
        hotplug: config.memory.hotplug_size.map(|s| HotplugSpec {
            size: s.bytes(),
            backing: config.memory.hotplug_backing,
            requested: config.memory.hotplugged_size.map_or(0, |s| s.bytes()),
        }),
        api_socket: args.api_socket.as_deref(),
        seccomp: args.seccomp,
        timeout: args.timeout,
        console: Box::new(std::io::stdout()),
    };
    let rip = |rip: Option<u64>| rip.map_or_else(|| "unknown".into(), |r| format!("{r:#x}"));
    match machine::run(spec) {
        Ok(VmEnd::PowerOff) => {
            log::info!("the guest powered off");
            exit::GUEST_SHUTDOWN
        }
        Ok(VmEnd::Reset) => {
            log::info!("the guest rebooted");
            exit::GUEST_SHUTDOWN
        }
        Ok(VmEnd::GuestStatus(0)) => {
            log::info!("the guest reported success on the exit port");
            exit::GUEST_SHUTDOWN
        }
        Ok(VmEnd::GuestStatus(status)) => {
            eprintln!("kite: the guest reported failure {status} on the exit port");
            exit::GUEST_FAILURE
        }
        Ok(VmEnd::GuestPanic) => {
            eprintln!("kite: the guest kernel panicked");
            exit::GUEST_CRASH
        }
        Ok(VmEnd::GuestCrash {
            exit: what,
            rip: at,
        }) => {
            eprintln!("kite: the guest crashed: {what} at guest RIP {}", rip(at));
            exit::GUEST_CRASH
        }
        Ok(VmEnd::Fatal {
            exit: what,
            rip: at,
        }) => {
            eprintln!("kite: the VM stopped: {what} at guest RIP {}", rip(at));
            exit::VMM_ERROR
        }
        Ok(VmEnd::Timeout(after)) => {
            eprintln!(
                "kite: the VM ran longer than --timeout {}; stopped",
                after.as_secs()
            );
            exit::TIMEOUT
        }
        Ok(VmEnd::VmmFailure(why)) => {
            eprintln!("kite: the VMM failed: {why}");
            exit::VMM_ERROR
        }
        Ok(VmEnd::Signal(num)) => {
            log::info!("stopped by signal {num}");
            exit::SIGNAL_BASE + num
        }
        Err(e) => {
            eprintln!("kite: {e}");
            match e.blame() {
                Blame::Arguments => exit::BAD_ARGUMENTS,
                Blame::InputFile => exit::BAD_INPUT,
                Blame::Vmm => exit::VMM_ERROR,
            }
        }
    }
}

/// A panic anywhere ends Kite with exit 1 and the panic's message: a VM whose vCPU or
/// device thread died must not stay half alive. (Release builds abort on a panic
/// anyway; this gives the message and the documented code first.)
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        eprintln!("kite: thread {name} panicked: {info}");
        crate::console::restore_terminal_now();
        // SAFETY: _exit ends the process at once: nothing runs on after a panic.
        unsafe { libc::_exit(exit::VMM_ERROR) };
    }));
}

/// Runs `kite` with the process's arguments; returns the exit code.
pub fn main() -> i32 {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("bad arguments");
            eprintln!(
                "kite: {} (see kite --help)",
                first.trim_start_matches("error: ")
            );
            return exit::BAD_ARGUMENTS;
        }
    };
    if let Err(e) = crate::logger::init(cli.verbose, cli.log_file.as_deref()) {
        eprintln!("kite: --log-file: {e}");
        return exit::BAD_ARGUMENTS;
    }
    match cli.command {
        Command::Run(args) => run(args),
        Command::Remote(args) => remote(args),
    }
}
