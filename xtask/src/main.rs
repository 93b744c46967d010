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
    /// Cost per request: the test target under wrk without the observer, with its lean mode
    /// (--no-request-metrics), with request metrics, with one empty uprobe per request (the
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
    /// Run each fuzz target (fuzz/: ring buffer records, runtime answers, catalogs, ELF files, memory images)
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

mod attach;
mod bpftrace;
mod fixed;
mod pipeline;
mod scale;
mod soak;

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
    ("answer", None, 256),
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

/// One wrk run: requests per second and latency percentiles (ms) as wrk prints them.
#[derive(Clone)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
}

fn wrk_duration_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1e3,
        "ms" => v,
        "s" => v * 1e3,
        "m" => v * 60e3,
        _ => return None,
    })
}

fn run_wrk(
    http: std::net::SocketAddr,
    path: &str,
    seconds: u64,
    conns: u32,
) -> anyhow::Result<WrkResult> {
    let out = Command::new("wrk")
        .args([
            // wrk needs at least one connection per thread.
            &format!("-t{}", conns.min(2)),
            &format!("-c{conns}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-H",
            "Host: localhost",
            &format!("http://{http}{path}"),
        ])
        .output()
        .context("running wrk (scripts/bootstrap.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    let non2xx = text.lines().any(|l| l.contains("Non-2xx"));
    if non2xx {
        bail!("wrk saw failed requests:\n{text}");
    }
    Ok(WrkResult {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?,
        p50_ms: field("50%")
            .and_then(|v| wrk_duration_ms(&v))
            .unwrap_or(f64::NAN),
        p99_ms: field("99%")
            .and_then(|v| wrk_duration_ms(&v))
            .unwrap_or(f64::NAN),
        requests: requests.unwrap_or(f64::NAN),
    })
}

/// Sum of a metric's series in a Prometheus exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The observer attached to `pid` with `extra` arguments, on a free loopback port, once it
/// serves `/metrics`.
pub(crate) fn start_observer(
    observer: &Path,
    pid: u32,
    extra: &[&str],
) -> anyhow::Result<(Killed, std::net::SocketAddr)> {
    start_observer_logged(observer, pid, extra, Stdio::null())
}

/// `start_observer`, its log (stderr) going to `log`.
pub(crate) fn start_observer_logged(
    observer: &Path,
    pid: u32,
    extra: &[&str],
    log: Stdio,
) -> anyhow::Result<(Killed, std::net::SocketAddr)> {
    let addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", testbed_harness::free_port()).parse()?;
    let child = Killed(
        Command::new(observer)
            .process_group(0)
            .args(["--pid", &pid.to_string(), "--listen", &addr.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", observer.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, "localhost", "/metrics").is_err() {
        if Instant::now() > deadline {
            bail!("the observer did not serve http://{addr}/metrics");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((child, addr))
}

/// A child process killed when dropped (an error must not leave an observer attached).
pub(crate) struct Killed(pub(crate) std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench(seconds: u64, connections: u32, rounds: usize) -> anyhow::Result<()> {
    build_ebpf()?;
    run(cargo().args(["build", "--release", "--workspace"]))?;
    let mut report = String::new();
    macro_rules! out {
        ($($t:tt)*) => {{
            let line = format!($($t)*);
            println!("{line}");
            report.push_str(&line);
            report.push('\n');
        }};
    }
    out!("# Benchmarks\n");
    out!("Written by `cargo xtask bench --seconds {seconds} --connections {connections} --rounds {rounds}` (as root, on a fresh machine after `bash scripts/bootstrap.sh`); do not edit by hand.\n");
    out!("Machine: {}\n", machine());
    let app = App::new("bench");
    let tb = Testbed::start(&Options {
        apps: vec![app.clone()],
        load_interval_ms: 0,
        ready_instance_expiration_ms: 600_000,
        dropout_rate: 0.0,
        max_ready_instances_per_app: 64,
        ..Options::default()
    });
    let path = format!("{}/x", app.prefix);
    eprintln!("bench: warming up the test target (PID {})", tb.proxy_pid());
    run_wrk(tb.http, &path, 2, connections)?;
    let observer = testbed_harness::release_dir().join("observer");
    let modes: [(&str, Option<&[&str]>); 5] = [
        ("no observer", None),
        (
            "lean (--no-request-metrics)",
            Some(&["--no-request-metrics"]),
        ),
        ("request metrics (default)", Some(&[])),
        ("floor (one uprobe/request)", Some(&["--floor"])),
        ("bpftrace (same probes, counts)", None),
    ];
    let bt_script = bpftrace::script(
        &observer,
        (
            &testbed_harness::binary("rusty-workers-proxy"),
            tb.proxy_pid(),
        ),
        (
            &testbed_harness::binary("rusty-workers-runtime"),
            &[tb.runtime_pid(0), tb.runtime_pid(1)],
        ),
    )?;
    let bt_for = |i: usize| (i == 4).then_some(bt_script.as_str());
    // The machine's throughput drifts (shared CPUs): every round runs every mode, in a rotated
    // order, and each mode reports its median round.
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let (name, args) = modes[i];
            eprintln!(
                "bench: round {}/{rounds}: {name}: wrk {seconds} s, {connections} connections",
                round + 1
            );
            let m = measure(&tb, &observer, &path, args, bt_for(i), seconds, connections)?;
            results[i].push(m);
        }
    }
    let median = |v: &[Measured]| median_by(v, |m| m.wrk.rps);
    let rows: Vec<(&str, Measured)> = modes
        .iter()
        .zip(&results)
        .map(|((name, _), r)| (*name, median(r)))
        .collect();
    let base = rows[0].1.wrk.rps;
    out!("## Cost per request at saturation\n");
    out!("```");
    out!("--- cost per request: test target under wrk ({connections} connections, {seconds} s per mode and round, median of {rounds} interleaved rounds; 2 CPUs shared by wrk, proxy, runtimes and observer) ---");
    let floor = rows[3].1.wrk.rps;
    out!(
        "{:<30} {:>10} {:>8} {:>9} {:>9} {:>9} {:>13} {:>11}",
        "mode",
        "req/s",
        "of none",
        "of floor",
        "p50 ms",
        "p99 ms",
        "BPF runs/req",
        "BPF us/req"
    );
    for (name, m) in &rows {
        out!(
            "{:<30} {:>10.0} {:>8.3} {:>9.3} {:>9.2} {:>9.2} {:>13.2} {:>11.2}",
            name,
            m.wrk.rps,
            m.wrk.rps / base,
            m.wrk.rps / floor,
            m.wrk.p50_ms,
            m.wrk.p99_ms,
            m.runs,
            m.bpf_us
        );
    }
    out!("all rounds, req/s:");
    for ((name, _), r) in modes.iter().zip(&results) {
        let all: Vec<String> = r.iter().map(|m| format!("{:.0}", m.wrk.rps)).collect();
        out!("  {name:<30} {}", all.join(" "));
    }
    out!("request metrics, per program (median round; runs and in-program us per request, uprobe traps not included):");
    for (prog, runs, us) in &rows[2].1.per_program {
        out!("  {prog:<16} {runs:>6.2} runs {us:>7.2} us");
    }
    let per_req_us = |rps: f64| 1e6 / rps;
    let lean = rows[1].1.wrk.rps;
    let full = rows[2].1.wrk.rps;
    out!(
        "cost over no observer per request: default {:.1} us, floor (one empty uprobe per request, on the proxy's Channel::call) {:.1} us: {:.2}x the floor",
        per_req_us(full) - per_req_us(base),
        per_req_us(floor) - per_req_us(base),
        (per_req_us(full) - per_req_us(base)) / (per_req_us(floor) - per_req_us(base))
    );
    let bt = rows[4].1.wrk.rps;
    out!(
        "bpftrace with the same probes, counting in maps: {:.1} us per request over no observer ({:.2}x the observer's default)",
        per_req_us(bt) - per_req_us(base),
        (per_req_us(bt) - per_req_us(base)) / (per_req_us(full) - per_req_us(base))
    );
    out!(
        "request metrics cost {:.1} us of wall time per request over the lean mode ({:.1}% throughput), {:.1} us over no observer ({:.1}% throughput)",
        per_req_us(full) - per_req_us(lean),
        (1.0 - full / lean) * 100.0,
        per_req_us(full) - per_req_us(base),
        (1.0 - full / base) * 100.0
    );
    out!("```\n");
    let floor_share = full / floor;

    let rate = 5000.0;
    out!("## At a fixed rate: {rate:.0} requests/s\n");
    out!("Open-loop load from {FIXED_CONNS} keep-alive connections, each request sent at its scheduled time and its latency counted from it (no coordinated omission), {seconds} s per mode, median of {rounds} interleaved rounds. CPU is the share of one core each process used meanwhile (`/proc/<pid>/stat`; the probes' kernel time is the target's).\n");
    out!("| mode | p50 (ms) | p99 (ms) | p99 vs none (ms) | proxy + runtimes user | proxy + runtimes system | observer (or bpftrace) user | observer (or bpftrace) system |");
    out!("|---|---|---|---|---|---|---|---|");
    let fixed_modes = [modes[0], modes[2], modes[3], modes[4]];
    let fixed_bt = |i: usize| (i == 3).then_some(bt_script.as_str());
    let mut fixed_results: Vec<Vec<FixedMeasured>> = vec![Vec::new(); fixed_modes.len()];
    for round in 0..rounds {
        for k in 0..fixed_modes.len() {
            let i = (k + round) % fixed_modes.len();
            let (name, args) = fixed_modes[i];
            eprintln!("bench: fixed rate, round {}/{rounds}: {name}", round + 1);
            fixed_results[i].push(measure_fixed(
                &tb,
                &observer,
                &path,
                args,
                fixed_bt(i),
                rate,
                seconds as f64,
            )?);
        }
    }
    let mut observer_user = f64::NAN;
    let none_p99 = median_by(&fixed_results[0], |m| m.p99).p99;
    for ((name, _), r) in fixed_modes.iter().zip(&fixed_results) {
        let m = median_by(r, |m| m.p99);
        out!(
            "| {name} | {:.2} | {:.2} | {:+.2} | {:.1}% | {:.1}% | {} | {} |",
            m.p50,
            m.p99,
            m.p99 - none_p99,
            m.target.0 * 100.0,
            m.target.1 * 100.0,
            pct(m.observer.0),
            pct(m.observer.1)
        );
        if name.starts_with("request metrics") {
            observer_user = m.observer.0;
        }
        if m.failed > 0 {
            out!("({name}: {} requests failed)", m.failed);
        }
    }
    out!("");
    drop(tb);

    out!("## Attach time\n");
    out!("From the observer's start to its `/metrics` answering with every probe attached (wall), and the observer's own `observer_attach_duration_seconds` (symbols read and resolved, uprobes attached), median of 3 starts.\n");
    out!("| target | function symbols | sites attached | ready (s) | proxy attach (s) | runtime attach (s) |");
    out!("|---|---|---|---|---|---|");
    let observer = testbed_harness::release_dir().join("observer");
    let tb = Testbed::start(&Options::default());
    let median3 =
        |f: &dyn Fn() -> anyhow::Result<attach::Attach>| -> anyhow::Result<attach::Attach> {
            let mut v = vec![f()?, f()?, f()?];
            v.sort_by(|a, b| a.ready_seconds.total_cmp(&b.ready_seconds));
            Ok(v.swap_remove(1))
        };
    let proxy_syms = count_functions(&testbed_harness::binary("rusty-workers-proxy"));
    let a = median3(&|| attach::measure(&observer, tb.proxy_pid(), &[]))?;
    out!(
        "| test target (proxy and 2 runtimes) | {proxy_syms} | {} | {:.3} | {:.3} | {:.3} |",
        a.sites,
        a.ready_seconds,
        a.proxy_seconds,
        a.runtime_seconds
    );
    drop(tb);
    let synth_dir = std::env::temp_dir().join(format!("rw-synthetic-{}", std::process::id()));
    let mut attach_real_size = f64::NAN;
    match attach::synthetic_proxy(&synth_dir) {
        Ok((bin, n)) => {
            let child = Killed(Command::new(&bin).stdout(Stdio::null()).spawn()?);
            let a =
                median3(&|| attach::measure(&observer, child.0.id(), &["--no-runtime-probes"]))?;
            attach_real_size = a.ready_seconds;
            out!(
                "| synthetic proxy (the real proxy's {n} function symbols and sizes) | {n} | {} | {:.3} | {:.3} | |",
                a.sites, a.ready_seconds, a.proxy_seconds
            );
        }
        Err(e) => out!("| synthetic proxy | not built: {e:#} | | | | |"),
    }
    out!("");

    out!("## Event pipeline\n");
    out!("The synthetic proxy calls the function of the `http_request` probe from its threads as fast as they go, for 5 s: each call is one event through the ring buffer (4 MiB, drained every 10 ms) to the observer's userspace. The kernel counts the events it could not queue; an event neither received nor counted would be a silent loss.\n");
    out!("| calling threads | events/s offered | events/s received | lost, counted | lost, not counted | observer CPU (share of a core) |");
    out!("|---|---|---|---|---|---|");
    let synth_bin = synth_dir.join("synthetic-proxy");
    let mut top = None;
    for (threads, extra, label) in [
        (1, &[][..], ""),
        (2, &[][..], ""),
        (
            2,
            &["--drain-interval-ms", "1000"][..],
            " (drained every 0.5 s instead of 10 ms: overrun)",
        ),
    ] {
        match pipeline::measure(&observer, &synth_bin, threads, 5.0, extra) {
            Ok(p) => out!(
                "| {threads}{label} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                p.calls / p.seconds,
                p.received / p.seconds,
                p.lost,
                p.calls - p.received - p.lost,
                pct({
                    if extra.is_empty() && threads == 2 {
                        top = Some((p.received / p.seconds, p.observer_cpu));
                    }
                    p.observer_cpu
                })
            ),
            Err(e) => out!("| {threads} | not measured: {e:#} | | | | |"),
        }
    }
    if let Some((rate, cpu)) = top {
        out!(
            "\nAt {rate:.0} events/s (all that uprobe traps on these CPUs can offer) the observer used {} of a core: at that cost one core of userspace takes about {:.1} M events/s. The ring buffer holds {:.2} M events/s between two 10 ms drains (4 MiB of 224-byte events). Losses, when they come, are counted: the overrun row's lost events plus those received equal the calls.",
            pct(cpu),
            rate / cpu.max(1e-9) / 1e6,
            4.0 * 1024.0 * 1024.0 / 224.0 / 0.010 / 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&synth_dir);
    out!("");

    out!("## Scrape time and memory against the number of apps\n");
    out!("The test target with N apps, each loaded and requested once with the observer attached (default probe set, `--max-apps` 1000: apps past it count under `other`); 20 scrapes of `/metrics`; the observer's resident memory after them. Snapshot: the last read of the proxy's state from its memory (every app and its ready pool, one instance each; taken every 500 ms on the observer's own thread, off the proxy's path: `process_vm_readv` neither stops nor writes it), its time and the bytes it read.\n");
    out!("| apps | app series | scrape p50 (ms) | scrape max (ms) | exposition (KiB) | observer RSS (MiB) | snapshot (ms) | snapshot read (KiB) | slowest collectors (ms, observer's own timing) |");
    out!("|---|---|---|---|---|---|---|---|---|");
    let mut at_1000 = None;
    for n in [10, 1000, 10000] {
        let sc = scale::measure(&observer, n)?;
        let slow: Vec<String> = sc
            .collectors
            .iter()
            .take(3)
            .map(|(n, ms)| format!("{n} {ms:.1}"))
            .collect();
        out!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.1} | {:.2} | {:.0} | {} |",
            sc.apps,
            sc.series_apps,
            sc.scrape_ms_p50,
            sc.scrape_ms_max,
            sc.scrape_bytes as f64 / 1024.0,
            sc.rss_mib,
            sc.snapshot_ms,
            sc.snapshot_bytes / 1024.0,
            slow.join(", ")
        );
        if n == 1000 {
            at_1000 = Some(sc);
        }
    }
    out!("");

    out!("## Targets\n");
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    out!("| target | measured | |");
    out!("|---|---|---|");
    out!(
        "| default at least 90% of the floor's throughput (one uprobe per request) | {:.1}% | {} |",
        floor_share * 100.0,
        verdict(floor_share >= 0.9)
    );
    if let Some(sc) = &at_1000 {
        out!(
            "| RSS under 50 MiB with 1,000 apps | {:.1} MiB | {} |",
            sc.rss_mib,
            verdict(sc.rss_mib < 50.0)
        );
        out!(
            "| scrape under 10 ms with 1,000 apps | {:.2} ms | {} |",
            sc.scrape_ms_p50,
            verdict(sc.scrape_ms_p50 < 10.0)
        );
    }
    out!(
        "| attach under 1 s for the real-size binary | {attach_real_size:.3} s | {} |",
        verdict(attach_real_size < 1.0)
    );
    out!(
        "| observer user CPU under 2% of a core at 5,000 req/s | {} | {} |",
        pct(observer_user),
        verdict(observer_user < 0.02)
    );
    out!("");
    let path = root().join("BENCHMARKS.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

const FIXED_CONNS: usize = 16;

#[derive(Clone)]
struct FixedMeasured {
    p50: f64,
    p99: f64,
    failed: usize,
    /// Share of one core: (user, system).
    target: (f64, f64),
    observer: (f64, f64),
}

fn pct(v: f64) -> String {
    if v.is_nan() {
        "".into()
    } else {
        format!("{:.2}%", v * 100.0)
    }
}

fn median_by<T: Clone>(v: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v[v.len() / 2].clone()
}

/// What runs beside the test target in one mode of the bench.
struct Mode {
    obs: Option<(Killed, std::net::SocketAddr)>,
    bpftrace: Option<bpftrace::Running>,
}

/// Starts bpftrace with `bt_script`, or the observer with `args` (then lets its request joins
/// learn from a second of requests), or nothing.
fn start_mode(
    tb: &Testbed,
    observer: &Path,
    path: &str,
    args: Option<&[&str]>,
    bt_script: Option<&str>,
) -> anyhow::Result<Mode> {
    let bpftrace = match bt_script {
        Some(script) => Some(bpftrace::start(script, &tb.dir)?),
        None => None,
    };
    let obs = match args {
        None => None,
        Some(extra) => {
            let started = start_observer(observer, tb.proxy_pid(), extra)?;
            run_wrk(tb.http, path, 1, 1)?;
            Some(started)
        }
    };
    Ok(Mode { obs, bpftrace })
}

/// One mode at a fixed rate: the observer started with `args` (None: none), then the load.
fn measure_fixed(
    tb: &Testbed,
    observer: &Path,
    path: &str,
    args: Option<&[&str]>,
    bt_script: Option<&str>,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<FixedMeasured> {
    let Mode { obs, bpftrace: bt } = start_mode(tb, observer, path, args, bt_script)?;
    let targets: Vec<u32> = std::iter::once(tb.proxy_pid())
        .chain((0..2).map(|i| tb.runtime_pid(i)))
        .collect();
    let sum = |pids: &[u32]| {
        pids.iter().fold((0.0, 0.0), |acc, p| {
            let (u, s) = fixed::cpu(*p);
            (acc.0 + u, acc.1 + s)
        })
    };
    let obs_pid: Vec<u32> = obs
        .iter()
        .map(|(c, _)| c.0.id())
        .chain(bt.iter().map(|b| b.0 .0.id()))
        .collect();
    let (t0, o0) = (sum(&targets), sum(&obs_pid));
    let started = Instant::now();
    let (lat, failed) = fixed::run(tb.http, path, rate, seconds, FIXED_CONNS);
    let wall = started.elapsed().as_secs_f64();
    let (t1, o1) = (sum(&targets), sum(&obs_pid));
    let share = |a: (f64, f64), b: (f64, f64)| ((b.0 - a.0) / wall, (b.1 - a.1) / wall);
    let m = FixedMeasured {
        p50: fixed::percentile(&lat, 0.5),
        p99: fixed::percentile(&lat, 0.99),
        failed,
        target: share(t0, t1),
        observer: if !obs_pid.is_empty() {
            share(o0, o1)
        } else {
            (f64::NAN, f64::NAN)
        },
    };
    if let Some((mut child, _)) = obs {
        // SAFETY: kill(2) on our own child: SIGINT detaches the observer cleanly.
        unsafe { kill(child.0.id() as i32, 2) };
        child.0.wait()?;
    }
    Ok(m)
}

/// The machine, for the record: CPU model and count, memory, kernel.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} x {model}, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// Function symbols in an executable (for the record).
fn count_functions(bin: &Path) -> usize {
    Command::new("nm")
        .arg(bin)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .is_some_and(|t| t == "t" || t == "T")
                })
                .count()
        })
        .unwrap_or(0)
}

#[derive(Clone)]
struct Measured {
    wrk: WrkResult,
    /// BPF program runs and in-program microseconds per request (NaN without the observer).
    runs: f64,
    bpf_us: f64,
    per_program: Vec<(String, f64, f64)>,
}

/// One mode of the bench: the observer started with `args` (None: no observer), a short
/// warm-up for its joins, then wrk.
fn measure(
    tb: &Testbed,
    observer: &Path,
    path: &str,
    args: Option<&[&str]>,
    bt_script: Option<&str>,
    seconds: u64,
    connections: u32,
) -> anyhow::Result<Measured> {
    let Mode {
        mut obs,
        bpftrace: _bpftrace,
    } = start_mode(tb, observer, path, args, bt_script)?;
    let before = match &obs {
        Some((_, addr)) => http_get(*addr, "localhost", "/metrics")?.1,
        None => String::new(),
    };
    let wrk = run_wrk(tb.http, path, seconds, connections)?;
    let mut m = Measured {
        runs: f64::NAN,
        bpf_us: f64::NAN,
        per_program: Vec::new(),
        wrk,
    };
    if let Some((child, addr)) = obs.as_mut() {
        let after = http_get(*addr, "localhost", "/metrics")?.1;
        let d = |n: &str| metric_sum(&after, n) - metric_sum(&before, n);
        let n = m.wrk.requests;
        m.runs = d("rusty_workers_observer_bpf_program_runs_total") / n;
        m.bpf_us = d("rusty_workers_observer_bpf_program_run_seconds_total") * 1e6 / n;
        for line in after.lines() {
            let Some(rest) =
                line.strip_prefix("rusty_workers_observer_bpf_program_runs_total{program=\"")
            else {
                continue;
            };
            let Some((prog, _)) = rest.split_once('"') else {
                continue;
            };
            let series = |name: &str| format!("{name}{{program=\"{prog}\"}}");
            let runs = d(&series("rusty_workers_observer_bpf_program_runs_total"));
            let secs = d(&series(
                "rusty_workers_observer_bpf_program_run_seconds_total",
            ));
            m.per_program
                .push((prog.to_string(), runs / n, secs * 1e6 / n));
        }
        // SAFETY: kill(2) on our own child: SIGINT detaches the observer cleanly.
        unsafe { kill(child.0.id() as i32, 2) };
        child.0.wait()?;
    }
    Ok(m)
}

extern "C" {
    pub(crate) fn kill(pid: i32, sig: i32) -> i32;
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
        } => bench(seconds, connections, rounds.max(1)),
        Task::BenchScale { apps } => {
            build_ebpf()?;
            run(cargo().args(["build", "--release", "--workspace"]))?;
            let sc = scale::measure(&testbed_harness::release_dir().join("observer"), apps)?;
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
