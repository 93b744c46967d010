//! Project tasks: `cargo xtask build-ebpf | test | demo`.

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testbed_harness::{http_get, load, App, Options, Testbed};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF programs (observer-ebpf) with Debian's Rust toolchain and bpf-linker.
    BuildEbpf,
    /// Build everything and run every test (unit, real symbol table, end to end as root).
    Test,
    /// Start the test target under load with the observer attached; print the metrics.
    Demo {
        /// How long to keep the load running.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Where the observer serves /metrics.
        #[arg(long, default_value = "127.0.0.1:9898")]
        listen: String,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Installs the toolchain when it is missing (scripts/bootstrap.sh is idempotent).
fn ensure_toolchain() -> anyhow::Result<()> {
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if Path::new("/usr/bin/rustc").exists() && have_linker {
        return Ok(());
    }
    eprintln!("xtask: Rust eBPF toolchain missing; running scripts/bootstrap.sh");
    run(Command::new("bash").arg(root().join("scripts/bootstrap.sh")))
}

fn build_ebpf() -> anyhow::Result<()> {
    ensure_toolchain()?;
    eprintln!("xtask: building observer-ebpf (bpfel-unknown-none)");
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(root().join("observer-ebpf"))
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        // Debian's rustc ships a prebuilt `core` for the BPF target; rustup's has none here.
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1");
    // Do not leak the outer (rustup) cargo's settings into the inner build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO") || k == "RUSTUP_TOOLCHAIN" || k == "RUSTC_WRAPPER" {
            cmd.env_remove(k);
        }
    }
    run(&mut cmd)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn test() -> anyhow::Result<()> {
    build_ebpf()?;
    eprintln!(
        "xtask: building the workspace (release: the test target uses rusty-workers' profile)"
    );
    run(cargo().args(["build", "--release", "--workspace"]))?;
    // Stream the test output and close on one total, so the last line speaks for every test
    // binary (not for whichever ran last).
    let mut child = cargo()
        .args([
            "test",
            "--release",
            "--workspace",
            "--all-targets",
            "--no-fail-fast",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap())) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += tally(rest, "passed");
            failed += tally(rest, "failed");
        }
    }
    let status = child.wait()?;
    println!("xtask: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// The count before `word` in a libtest summary (`ok. 19 passed; 0 failed; ...`).
fn tally(summary: &str, word: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            let mut it = part.split_whitespace().rev();
            (it.next()? == word).then_some(())?;
            it.next()?.parse().ok()
        })
        .unwrap_or(0)
}

fn demo(seconds: u64, listen: &str) -> anyhow::Result<()> {
    build_ebpf()?;
    run(cargo().args(["build", "--release", "--workspace"]))?;
    let apps: Vec<App> = (1..=4).map(|i| App::new(&format!("app-{i}"))).collect();
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        ..Options::default()
    });
    eprintln!(
        "demo: test proxy PID {} on http://{} (apps at /app-1 .. /app-4 on Host: localhost)",
        tb.proxy_pid(),
        tb.http
    );
    let observer = testbed_harness::release_dir().join("observer");
    let mut obs = Command::new(&observer)
        // Own process group: Ctrl-C reaches only xtask, which then stops everything in order.
        .process_group(0)
        .args(["--pid", &tb.proxy_pid().to_string(), "--listen", listen])
        .spawn()
        .with_context(|| format!("starting {}", observer.display()))?;
    let addr: std::net::SocketAddr = listen.parse().context("--listen")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, "localhost", "/metrics").is_err() {
        if let Ok(Some(status)) = obs.try_wait() {
            bail!("the observer exited: {status}");
        }
        if Instant::now() > deadline {
            bail!("the observer did not serve http://{listen}/metrics");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "demo: metrics on http://{listen}/metrics; sending load for {seconds} s (Ctrl-C stops)"
    );
    // Ctrl-C ends the load; the test target and the observer are then stopped in order.
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    ctrlc::set_handler(move || s2.store(true, Ordering::Relaxed)).context("Ctrl-C handler")?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut round = 0usize;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        // Uneven traffic over the apps, and an app change every 10 rounds.
        let paths: Vec<String> = (0..200)
            .map(|i| format!("{}/r{i}", apps[(i * i + round) % apps.len()].prefix))
            .collect();
        load(tb.http, &paths, 4);
        round += 1;
        if round.is_multiple_of(10) {
            let mut changed = apps.clone();
            changed[round / 10 % apps.len()].bundle_id = format!("v{round}");
            tb.set_apps(&changed);
        }
        if round.is_multiple_of(25) {
            eprintln!("demo: {} requests sent", round * 200);
        }
    }
    eprintln!();
    let (_, metrics) = http_get(addr, "localhost", "/metrics")?;
    println!("--- observer metrics (excerpt) ---");
    for line in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && !l.contains("_bucket{")
            && (l.starts_with("rusty_workers_app")
                || l.starts_with("rusty_workers_runtime")
                || l.starts_with("rusty_workers_observer_unmatched")
                || l.starts_with("rusty_workers_observer_unattributed")
                || l.starts_with("rusty_workers_observer_layout_learnt")
                || l.starts_with("rusty_workers_observer_bpf_program_runs_total"))
    }) {
        println!("{line}");
    }
    println!("--- proxy ground truth ---\n{:#}", tb.truth());
    // SAFETY: kill(2) on our own child: SIGINT detaches the observer cleanly.
    unsafe { kill(obs.id() as i32, 2) };
    obs.wait()?;
    Ok(())
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => build_ebpf(),
        Task::Test => test(),
        Task::Demo { seconds, listen } => demo(seconds, &listen),
    }
}
