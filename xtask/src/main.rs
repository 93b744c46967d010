//! Project tasks: `cargo xtask build-ebpf | test | demo | bench`.

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
    /// Cost per request: the test target under wrk without the observer, without request
    /// metrics (--no-request-metrics), with request metrics, with one empty uprobe per request (the
    /// floor) and with bpftrace, in one interleaved run; prints each mode's throughput as a share
    /// of no observer's and of the floor's.
    Bench {
        /// Seconds of wrk per mode.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// wrk connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
        /// Rounds of all modes (each mode reports its median round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Run each fuzz target (fuzz/: ring buffer records, tarpc frame heads, catalogs, ELF files, memory images)
    /// for a bounded time with cargo-fuzz; fails on the first crash, its input kept.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Minutes of mixed load on the test target with app changes, capacity evictions and
    /// runtime restarts, the observer attached: its memory over time, and every counter
    /// against ground truth at the end.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// One row of the bench's scrape table: the test target with N apps (prints, writes nothing).
    BenchScale {
        #[arg(long, default_value_t = 1000)]
        apps: usize,
    },
}

mod bench;
mod child;
mod soak;

use child::kill;

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
    let have_fuzz = cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if Path::new("/usr/bin/rustc").exists() && have_linker && have_fuzz {
        return Ok(());
    }
    eprintln!("xtask: Rust eBPF toolchain or cargo-fuzz missing; running scripts/bootstrap.sh");
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
    // The test target under the other release profiles operators build with: the end-to-end
    // tests check what the observer exports on each (a probe lost to inlining).
    for profile in testbed_harness::PROFILES {
        if *profile != testbed_harness::RELEASE {
            eprintln!("xtask: building the test target with profile {profile}");
            run(cargo().args([
                "build",
                "--profile",
                profile,
                "-p",
                "testbed-proxy",
                "-p",
                "testbed-runtime",
            ]))?;
        }
    }
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
    let fuzzed = fuzz(FUZZ_SECONDS_IN_TEST);
    println!("xtask: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    fuzzed
}

/// Seconds per fuzz target in `cargo xtask test` (CI): long enough to pass the decoders' first
/// branches, short enough for the 30 minutes CI has.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

/// The fuzz targets, their seed directories (under the project root) and largest inputs.
const FUZZ_TARGETS: &[(&str, Option<&str>, usize)] = &[
    // Up to a few records, with and without the 4 KiB snapshot of a response head.
    ("events", None, 16 * 1024),
    ("wire", None, 256),
    ("catalog", Some("catalog"), 8 * 1024),
    ("elf", None, 4096),
    // A memory image the snapshot walker reads as the proxy's (issue 14).
    ("snapshot", None, 64 * 1024),
];

fn fuzz(seconds: u64) -> anyhow::Result<()> {
    // The observer's build script wants the eBPF object.
    build_ebpf()?;
    let dir = root().join("fuzz");
    for (target, seeds, max_len) in FUZZ_TARGETS {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut cmd = cargo();
        // cargo-fuzz passes the sanitizer-coverage flags as -Z options: stable rustc takes them
        // with RUSTC_BOOTSTRAP (rustup's nightly is not to be had here). No sanitizer: the code
        // under test is safe Rust, and its panics and overflows are what is looked for.
        cmd.current_dir(&dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "--sanitizer", "none", "--debug-assertions"])
            .arg(target)
            .arg(&corpus);
        if let Some(seeds) = seeds {
            cmd.arg(root().join(seeds));
        }
        cmd.args([
            "--".to_string(),
            format!("-max_total_time={seconds}"),
            format!("-max_len={max_len}"),
            // Only the final stats, not a line per new input (a crash is reported either way).
            "-verbosity=0".to_string(),
            "-print_final_stats=1".to_string(),
        ]);
        run(&mut cmd).with_context(|| {
            format!("fuzz target {target} failed: the input that did it is under fuzz/artifacts/{target}/")
        })?;
    }
    eprintln!(
        "xtask: fuzzing: {} targets, {seconds} s each, nothing found",
        FUZZ_TARGETS.len()
    );
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
    // Two plain apps, a slow one and one whose script throws: every kind of series fills.
    let apps: Vec<App> = vec![
        App::new("app-1"),
        App::new("app-2"),
        App::slow("app-3", 20),
        App::failing("app-4", "script"),
    ];
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
    eprintln!("demo: metrics on http://{listen}/metrics");
    let _prometheus = start_prometheus(&tb.dir, listen);
    eprintln!("demo: sending load for {seconds} s (Ctrl-C stops)");
    // Ctrl-C ends the load; the test target and the observer are then stopped in order.
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    ctrlc::set_handler(move || s2.store(true, Ordering::Relaxed)).context("Ctrl-C handler")?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut round = 0usize;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        // Uneven traffic over the apps, a few requests for no app at all, and an app change
        // every 10 rounds.
        let paths: Vec<String> = (0..200)
            .map(|i| match i % 50 {
                0 => format!("/no-such-app/r{i}"),
                _ => format!("{}/r{i}", apps[(i * i + round) % apps.len()].prefix),
            })
            .collect();
        load(tb.http, &paths, 4);
        round += 1;
        if round.is_multiple_of(10) {
            let mut changed = apps.clone();
            let a = &mut changed[round / 10 % apps.len()];
            // A new bundle, the same script.
            a.bundle_id = format!("{};r{round}", a.bundle_id);
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
                || l.starts_with("rusty_workers_process")
                || l.contains("probe_attached")
                || l.starts_with("rusty_workers_netns")
                || l.starts_with("rusty_workers_observer_reattaches")
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

/// Processes the demo started beside the test target, stopped when it ends.
struct Beside(Vec<std::process::Child>);

impl Drop for Beside {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn installed(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// node_exporter and Prometheus with grafana/prometheus.yml (its alert rules included), on
/// free loopback ports, when Debian's packages are installed (scripts/bootstrap.sh installs
/// them); prints where they are.
fn start_prometheus(dir: &Path, observer: &str) -> Beside {
    let mut beside = Beside(Vec::new());
    if !installed("prometheus") {
        eprintln!("demo: Prometheus is not installed (apt-get install prometheus prometheus-node-exporter): metrics only");
        return beside;
    }
    let grafana = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana");
    let mut config = std::fs::read_to_string(grafana.join("prometheus.yml"))
        .unwrap_or_default()
        .replace("127.0.0.1:9898", observer);
    if installed("prometheus-node-exporter") {
        let node = format!("127.0.0.1:{}", testbed_harness::free_port());
        match Command::new("prometheus-node-exporter")
            .process_group(0)
            .arg(format!("--web.listen-address={node}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => {
                beside.0.push(c);
                eprintln!("demo: node_exporter on http://{node}/metrics");
            }
            Err(e) => eprintln!("demo: node_exporter did not start: {e}"),
        }
        config = config.replace("127.0.0.1:9100", &node);
    }
    let _ = std::fs::write(dir.join("prometheus.yml"), config);
    let _ = std::fs::copy(grafana.join("alerts.yml"), dir.join("alerts.yml"));
    let prom = format!("127.0.0.1:{}", testbed_harness::free_port());
    match Command::new("prometheus")
        .process_group(0)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prom}"))
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join("prometheus.log"))
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .spawn()
    {
        Ok(c) => {
            beside.0.push(c);
            eprintln!(
                "demo: Prometheus on http://{prom} (alerts: http://{prom}/alerts); Grafana: add it as a datasource and import grafana/dashboards/*.json (README: Dashboards and alerts)"
            );
        }
        Err(e) => eprintln!("demo: Prometheus did not start: {e}"),
    }
    beside
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => build_ebpf(),
        Task::Test => test(),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Soak { minutes } => {
            build_ebpf()?;
            run(cargo().args(["build", "--release", "--workspace"]))?;
            let r = soak::run(&testbed_harness::release_dir().join("observer"), minutes)?;
            println!(
                "soak: {:.1} minutes, {} requests, {} app changes, {} runtime restarts",
                r.minutes, r.requests, r.app_changes, r.runtime_restarts
            );
            println!(
                "soak: observer RSS {:.1} MiB after warm-up, {:.1} MiB after {:.0} s, {:.1} MiB at the end (max {:.1} MiB): {:+.1} MiB since {:.0} s",
                r.rss_start_mib,
                r.rss_settled_mib,
                r.settled_after_s,
                r.rss_end_mib,
                r.rss_max_mib,
                r.rss_end_mib - r.rss_settled_mib,
                r.settled_after_s
            );
            println!("soak: the observer's log is {}", r.log.display());
            println!(
                "soak: {} counters against ground truth, {} differ",
                r.checked,
                r.mismatches.len()
            );
            for m in &r.mismatches {
                println!("soak: MISMATCH {m}");
            }
            if !r.mismatches.is_empty() {
                bail!("{} counters differ from ground truth", r.mismatches.len());
            }
            Ok(())
        }
        Task::Demo { seconds, listen } => demo(seconds, &listen),
        Task::Bench {
            seconds,
            connections,
            rounds,
        } => bench::run(seconds, connections, rounds),
        Task::BenchScale { apps } => {
            build_ebpf()?;
            run(cargo().args(["build", "--release", "--workspace"]))?;
            let sc = bench::scale::measure(&testbed_harness::release_dir().join("observer"), apps)?;
            println!(
                "{} apps: {} app series, scrape p50 {:.2} ms, max {:.2} ms, {:.0} KiB, RSS {:.1} MiB; snapshot {:.2} ms, {:.0} KiB read; collectors (ms): {:?}",
                sc.apps,
                sc.series_apps,
                sc.scrape_ms_p50,
                sc.scrape_ms_max,
                sc.scrape_bytes as f64 / 1024.0,
                sc.rss_mib,
                sc.snapshot_ms,
                sc.snapshot_bytes / 1024.0,
                sc.collectors
            );
            Ok(())
        }
    }
}
