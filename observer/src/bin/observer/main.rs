//! The `observer` command: `observer --pid PID` serves metrics, `observer probes` checks a target.
//! This file only dispatches; each part is in its own file.

mod cli;
mod daemon;
mod http;
mod lifecycle;
mod preflight;
mod probes;

use anyhow::Context as _;
use clap::Parser as _;

/// Pins glibc's mmap threshold at its default, which also pins its trim threshold.
///
/// glibc raises the mmap threshold to the size of the largest mmapped chunk freed so far (up to
/// 32 MiB) and the trim threshold to twice that ("dynamic mmap threshold", glibc
/// malloc/malloc.c; mallopt(3)). Loading reads the kernel's BTF (5.5 MB) and the target's ELF
/// in one piece each; once they were freed, a heap under event churn kept memory it no longer
/// used. `cargo xtask soak` saw RSS climb from 23 to 63 MiB over six minutes (at 48 MiB glibc
/// held 38 MB, 5.7 MB of it in use: `malloc_stats`). Setting the threshold turns the
/// adjustment off.
fn pin_malloc_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() {
    pin_malloc_thresholds();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        Some(cli::Command::Probes(a)) => probes::run(a),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(daemon::run(cli.run))),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
