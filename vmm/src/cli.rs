//! The `kite` command line: `kite run` boots a guest. Exit codes are part of the interface
//! (see [`exit`]).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, CpusConfig, DiskConfig, MemoryConfig, VmConfig};
use crate::control::{RestoreRequest, Vmm, VmmOptions};
use crate::seccomp::SeccompMode;
use crate::snapshot::MemoryRestore;

pub use crate::exit;

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
    Run(Box<RunArgs>),
    /// Start the VMM with only its API socket: a VM is created and booted through the
    /// API (vm.create, vm.boot), as with Cloud Hypervisor started without a kernel.
    Serve(ServeArgs),
    /// Talk to a running VMM through its API socket (Cloud Hypervisor's HTTP API).
    Remote(RemoteArgs),
}

/// `--api-socket PATH`, or Cloud Hypervisor's spelling `path=PATH`.
fn parse_api_socket(s: &str) -> Result<PathBuf, String> {
    let path = match s.split_once('=') {
        Some(("path", path)) => path,
        Some((key, _)) if !key.contains('/') => {
            return Err(format!("unknown key '{key}' (PATH or path=PATH)"))
        }
        _ => s,
    };
    if path.is_empty() {
        return Err("an empty path".into());
    }
    Ok(PathBuf::from(path))
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The API socket: PATH or path=PATH.
    #[arg(long, value_name = "PATH", value_parser = parse_api_socket)]
    api_socket: PathBuf,
    /// Confine each thread with its seccomp filter: on, log, off.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    seccomp: SeccompMode,
    /// Stop each VM after this many seconds (exit 124).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
struct RemoteArgs {
    /// The VMM's API socket (kite run/serve --api-socket): PATH or path=PATH.
    #[arg(long, value_name = "PATH", value_parser = parse_api_socket)]
    api_socket: PathBuf,
    #[command(subcommand)]
    request: RemoteRequest,
}

#[derive(Debug, Subcommand)]
enum RemoteRequest {
    /// Print the VMM's version, pid and features (vmm.ping).
    Ping,
    /// Print the VM's configuration, state and memory size as JSON (vm.info).
    Info,
    /// Print the devices' and the region table's counters as JSON (vm.counters).
    Counters,
    /// Ask the guest to plug or unplug memory until it has this much in all (vm.resize).
    Resize {
        /// The new total guest memory (boot memory + hotplugged), e.g. 2G.
        #[arg(long, value_name = "SIZE")]
        memory: String,
    },
    /// Create a VM from a Cloud Hypervisor VmConfig JSON file (vm.create).
    Create {
        /// The VmConfig file.
        config: PathBuf,
    },
    /// Boot the created VM (vm.boot).
    Boot,
    /// Pause the VM (vm.pause).
    Pause,
    /// Resume the paused VM (vm.resume).
    Resume,
    /// Shut the VM down; it can be booted again (vm.shutdown).
    Shutdown,
    /// Shut the VM down and boot it again (vm.reboot).
    Reboot,
    /// Shut the VM down and forget it (vm.delete).
    Delete,
    /// End the VMM (vmm.shutdown).
    ShutdownVmm,
    /// Snapshot the VM into DIR, which must not exist (vm.snapshot): a running VM is
    /// paused for it and runs on, a paused one stays paused.
    Snapshot {
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// Restore the snapshot in DIR into this VMM, which must have no VM (vm.restore);
    /// the VM is paused until `resume`.
    Restore {
        /// The snapshot directory.
        dir: PathBuf,
        /// Read all guest memory before the VM runs (else it is read on first touch).
        #[arg(long)]
        prefault: bool,
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
    /// Serve the API socket here (Cloud Hypervisor's HTTP API; kite remote talks to
    /// it): PATH or path=PATH.
    #[arg(long, value_name = "PATH", value_parser = parse_api_socket)]
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
    /// Restore a snapshot instead of booting: path=DIR[,memory=lazy|private|eager] (lazy:
    /// pages read from the snapshot on first touch by Kite's fault handler; private: a
    /// private mapping of the snapshot's memory file; eager: all read first). `--disk` gives
    /// disks in place of the snapshot's (as many, of the same sizes); the VM's other
    /// settings are the snapshot's.
    #[arg(
        long,
        value_name = "path=DIR[,memory=lazy|private|eager]",
        value_parser = parse_restore,
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "rng", "config"],
    )]
    restore: Option<(PathBuf, MemoryRestore)>,
    /// Run until the guest's console prints TEXT, then snapshot the VM into
    /// `--snapshot-to` and exit 0: a CI job restores that ready guest instead of booting
    /// one.
    #[arg(long, value_name = "TEXT", requires = "snapshot_to")]
    until_console: Option<String>,
    /// Where `--until-console` writes the snapshot: a directory that must not exist.
    #[arg(long, value_name = "DIR", requires = "until_console")]
    snapshot_to: Option<PathBuf>,
}

/// `--restore DIR` or `--restore path=DIR[,memory=lazy|private|eager]`.
fn parse_restore(s: &str) -> Result<(PathBuf, MemoryRestore), String> {
    if !s.contains('=') {
        return Ok((PathBuf::from(s), MemoryRestore::default()));
    }
    let mut path = None;
    let mut mode = MemoryRestore::default();
    let options = crate::config::parse_options("restore", s, &["path", "memory"])
        .map_err(|e| e.to_string())?;
    for (key, value) in options {
        match key {
            "path" => path = Some(PathBuf::from(value)),
            _ => mode = value.parse()?,
        }
    }
    match path {
        Some(path) if !path.as_os_str().is_empty() => Ok((path, mode)),
        _ => Err("path=DIR is needed".into()),
    }
}

/// `--timeout`: whole seconds, 1 to a year.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    const YEAR: u64 = 365 * 24 * 3600;
    match s.parse::<u64>() {
        Ok(n) if (1..=YEAR).contains(&n) => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!("'{s}' is not a number of seconds from 1 to {YEAR}")),
    }
}

pub use crate::spec::{default_cmdline, default_guest_dir, on_kvm_pvm_host};

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

/// How long `kite remote` waits for the VMM's answer (a boot or a shutdown may take
/// seconds).
const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(70);

fn remote(args: RemoteArgs) -> i32 {
    use RemoteRequest as R;
    let body = match &args.request {
        R::Resize { memory } => match memory.parse::<crate::config::Size>() {
            Ok(size) => Some(serde_json::json!({ "desired_ram": size.bytes() }).to_string()),
            Err(e) => {
                eprintln!("kite: --memory: {e}");
                return exit::BAD_ARGUMENTS;
            }
        },
        R::Create { config } => match std::fs::read_to_string(config) {
            Ok(text) => Some(text),
            Err(e) => {
                eprintln!("kite: {}: {e}", config.display());
                return exit::BAD_INPUT;
            }
        },
        R::Snapshot { dir } | R::Restore { dir, .. } => {
            // The VMM may run elsewhere in the file system: an absolute path.
            let dir = match std::path::absolute(dir) {
                Ok(dir) => dir,
                Err(e) => {
                    eprintln!("kite: {}: {e}", dir.display());
                    return exit::BAD_ARGUMENTS;
                }
            };
            let url = format!("file://{}", dir.display());
            Some(
                match &args.request {
                    R::Restore { prefault, .. } => {
                        serde_json::json!({ "source_url": url, "prefault": prefault })
                    }
                    _ => serde_json::json!({ "destination_url": url }),
                }
                .to_string(),
            )
        }
        _ => None,
    };
    let (method, endpoint) = match &args.request {
        R::Ping => ("GET", "vmm.ping"),
        R::Info => ("GET", "vm.info"),
        R::Counters => ("GET", "vm.counters"),
        R::Resize { .. } => ("PUT", "vm.resize"),
        R::Create { .. } => ("PUT", "vm.create"),
        R::Boot => ("PUT", "vm.boot"),
        R::Pause => ("PUT", "vm.pause"),
        R::Resume => ("PUT", "vm.resume"),
        R::Shutdown => ("PUT", "vm.shutdown"),
        R::Reboot => ("PUT", "vm.reboot"),
        R::Delete => ("PUT", "vm.delete"),
        R::ShutdownVmm => ("PUT", "vmm.shutdown"),
        R::Snapshot { .. } => ("PUT", "vm.snapshot"),
        R::Restore { .. } => ("PUT", "vm.restore"),
    };
    let path = format!("{}{endpoint}", crate::api::API_PREFIX);
    match crate::api::request(
        &args.api_socket,
        method,
        &path,
        body.as_deref().map(str::as_bytes),
        REMOTE_TIMEOUT,
    ) {
        Ok((status, reply)) if (200..300).contains(&status) => {
            if !reply.is_empty() {
                let text = serde_json::from_slice::<serde_json::Value>(&reply)
                    .ok()
                    .and_then(|v| serde_json::to_string_pretty(&v).ok())
                    .unwrap_or_else(|| String::from_utf8_lossy(&reply).into_owned());
                println!("{text}");
            }
            0
        }
        Ok((status, reply)) => {
            let why = serde_json::from_slice::<serde_json::Value>(&reply)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&reply).into_owned());
            eprintln!("kite: the VMM refused ({status}): {why}");
            exit::VMM_ERROR
        }
        Err(e) => {
            eprintln!("kite: --api-socket {}: {e}", args.api_socket.display());
            exit::VMM_ERROR
        }
    }
}

/// Starts the API socket at `path`, serving `vmm`.
fn start_api(
    vmm: &mut Vmm,
    path: &Path,
) -> Result<crate::api::ApiServer, crate::machine::MachineError> {
    let (status, hooks, actions) = vmm.api_channel()?;
    let mut dispatcher = crate::api::Dispatcher::new(status, actions);
    Ok(crate::api::ApiServer::start(
        path,
        Box::new(move |request| dispatcher.handle(request)),
        hooks,
    )?)
}

/// Runs `vmm` to its end; the exit code.
fn finish(vmm: Vmm) -> i32 {
    match vmm.run() {
        Ok(outcome) => {
            let (code, report) = exit::of_outcome(&outcome);
            match report {
                exit::Report::Log(message) => log::info!("{message}"),
                exit::Report::Error(message) => eprintln!("kite: {message}"),
            }
            code
        }
        Err(e) => {
            eprintln!("kite: {e}");
            exit::of_error(&e)
        }
    }
}

fn run(args: RunArgs) -> i32 {
    let config = match args.config() {
        Ok(config) => config,
        Err(f) => {
            eprintln!("kite: {}", f.message);
            return f.code;
        }
    };
    let restore = args.restore.clone().map(|(dir, mode)| RestoreRequest {
        dir,
        mode,
        disks: (!args.disk.is_empty()).then(|| config.disks.clone()),
    });
    if let Some(dir) = &args.snapshot_to {
        // Found now, not after a boot of a minute.
        if dir.symlink_metadata().is_ok() {
            eprintln!(
                "kite: --snapshot-to {}: it exists already (a snapshot is never written over)",
                dir.display()
            );
            return exit::BAD_ARGUMENTS;
        }
    }
    if args.until_console.as_deref() == Some("") {
        eprintln!("kite: --until-console: an empty text");
        return exit::BAD_ARGUMENTS;
    }
    let options = VmmOptions {
        seccomp: args.seccomp,
        timeout: args.timeout,
        until_console: args.until_console.clone(),
        snapshot_to: args.snapshot_to.clone(),
    };
    let mut vmm = match Vmm::new(options, args.api_socket.is_some()) {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("kite: {e}");
            return exit::of_error(&e);
        }
    };
    let mut api = None;
    let booted = match &restore {
        // Restored, then started at once (through the API, a restored VM waits for
        // vm.resume); the API socket comes once it runs.
        Some(request) => vmm.restore(request).and_then(|()| {
            vmm.start_unconfined()?;
            if let Some(path) = &args.api_socket {
                api = Some(start_api(&mut vmm, path)?);
            }
            vmm.confine_running()
        }),
        None => vmm.create(config).and_then(|()| {
            if let Some(path) = &args.api_socket {
                api = Some(start_api(&mut vmm, path)?);
            }
            vmm.boot()
        }),
    };
    let code = match booted {
        Ok(()) => return finish_then_stop(vmm, api),
        Err(e) => {
            eprintln!("kite: {e}");
            exit::of_action_error(&e)
        }
    };
    // The VMM goes first: actions still waiting get their answer before the socket goes.
    drop(vmm);
    drop(api);
    code
}

/// Runs `vmm` to its end, then stops the API socket; the exit code.
fn finish_then_stop(vmm: Vmm, api: Option<crate::api::ApiServer>) -> i32 {
    let code = finish(vmm);
    drop(api);
    code
}

fn serve(args: ServeArgs) -> i32 {
    let options = VmmOptions {
        seccomp: args.seccomp,
        timeout: args.timeout,
        until_console: None,
        snapshot_to: None,
    };
    let started = Vmm::new(options, true).and_then(|mut vmm| {
        let api = start_api(&mut vmm, &args.api_socket)?;
        // Every VM is built under the VMM thread's filter.
        vmm.confine()?;
        Ok((vmm, api))
    });
    match started {
        Ok((vmm, _api)) => finish(vmm),
        Err(e) => {
            eprintln!("kite: {e}");
            exit::of_error(&e)
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
    crate::logger::mark_process_start();
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
        Command::Run(args) => run(*args),
        Command::Serve(args) => serve(args),
        Command::Remote(args) => remote(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_socket_takes_both_spellings() {
        let path = |s: &str| parse_api_socket(s).map(|p| p.display().to_string());
        assert_eq!(path("/run/kite.sock").as_deref(), Ok("/run/kite.sock"));
        assert_eq!(path("path=/run/kite.sock").as_deref(), Ok("/run/kite.sock"));
        assert_eq!(path("relative.sock").as_deref(), Ok("relative.sock"));
        // A path with '=' in a directory name is a path, not a key.
        assert_eq!(
            path("/tmp/a=b/kite.sock").as_deref(),
            Ok("/tmp/a=b/kite.sock")
        );
        assert!(path("fd=3").unwrap_err().contains("unknown key 'fd'"));
        assert!(path("").is_err());
        assert!(path("path=").is_err());
    }
}
