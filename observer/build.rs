//! Embeds the eBPF object. It is built by `cargo xtask build-ebpf` with Debian's rustc (the
//! only one here with a `core` for bpfel-unknown-none), not by this build.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_OBJECT");
    let object = match std::env::var_os("OBSERVER_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../observer-ebpf/target/bpfel-unknown-none/release/observer"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object {} is missing.\n\
             Build it first:  cargo xtask build-ebpf\n\
             (on a fresh machine run scripts/bootstrap.sh once before that)",
            object.display()
        );
        std::process::exit(1);
    }
    let object = object.canonicalize().expect("eBPF object path");
    println!("cargo:rustc-env=OBSERVER_EBPF_OBJECT={}", object.display());
}
