//! `kite`: boot a guest (`kite run`).

fn main() {
    // First, before any thread starts (see its doc).
    vmm::seccomp::single_arena();
    std::process::exit(vmm::cli::main());
}
