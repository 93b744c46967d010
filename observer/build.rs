//! Embeds the eBPF object. It is built by `cargo xtask build-ebpf` with Debian's rustc (the
//! only one here with a `core` for bpfel-unknown-none), not by this build.
use std::path::{Path, PathBuf};
use std::time::SystemTime;

fn newest(dir: &Path) -> Option<SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.is_dir() {
                newest(&p)
            } else {
                e.metadata().ok()?.modified().ok()
            }
        })
        .max()
}

fn fail(msg: &str) -> ! {
    eprintln!(
        "error: {msg}\n\
         Build the eBPF programs first:  cargo xtask build-ebpf\n\
         (it installs the Rust eBPF toolchain with scripts/bootstrap.sh when missing)"
    );
    std::process::exit(1);
}

fn main() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_OBJECT");
    let object = match std::env::var_os("OBSERVER_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => here.join("../observer-ebpf/target/bpfel-unknown-none/release/observer"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    let sources = [
        here.join("../observer-ebpf/src"),
        here.join("../observer-common/src"),
    ];
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let Ok(meta) = std::fs::metadata(&object) else {
        fail(&format!("the eBPF object {} is missing.", object.display()));
    };
    let built = meta.modified().expect("mtime");
    if sources.iter().filter_map(|s| newest(s)).any(|t| t > built) {
        fail(&format!(
            "the eBPF object {} is older than its sources.",
            object.display()
        ));
    }
    let object = object.canonicalize().expect("eBPF object path");
    println!("cargo:rustc-env=OBSERVER_EBPF_OBJECT={}", object.display());
}
