//! `kite`: boot a guest (`kite run`).

fn main() {
    std::process::exit(vmm::cli::main());
}
