//! Builds the test guest (guest/) with the machine's gcc and ld: a freestanding x86_64 ELF
//! that Kite boots like a kernel. Its path reaches the tests as `KITE_TEST_GUEST`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let elf = out.join("test-guest.elf");
    for file in ["guest/entry.S", "guest/guest.c", "guest/guest.ld"] {
        println!("cargo:rerun-if-changed={file}");
    }
    let status = Command::new("gcc")
        .args([
            "-std=gnu11",
            "-O2",
            "-Wall",
            "-Werror",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-mcmodel=small",
            "-nostdlib",
            "-static",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=0x1000",
            "-Wl,--no-warn-rwx-segments",
            "-Wl,-T,guest/guest.ld",
            "-o",
        ])
        .arg(&elf)
        .args(["guest/entry.S", "guest/guest.c"])
        .status()
        .expect("gcc runs (the test guest is built with the machine's gcc and ld)");
    assert!(status.success(), "building the test guest failed");
    println!("cargo:rustc-env=KITE_TEST_GUEST={}", elf.display());
}
