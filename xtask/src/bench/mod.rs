//! `cargo xtask bench`: what the observer costs, written to BENCHMARKS.md. One file per
//! measurement: wrk at saturation (here), a fixed rate (`fixed`), attach time (`attach`), the
//! event pipeline (`pipeline`), scrape time and memory against apps (`scale`), and bpftrace
//! with the same probes (`bpftrace`).

mod attach;
mod bpftrace;
pub(crate) mod fixed;
mod pipeline;
pub(crate) mod scale;

use crate::child::{kill, metric_sum, start_observer, Killed};
use crate::{build_ebpf, cargo, root};
use anyhow::{bail, Context as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;
use testbed_harness::{http_get, App, Options, Testbed};

/// Bytes of the ring buffer one pipeline event takes: the `http_request` probe's record
/// (`observer_common::event::HttpRequest`, 24 bytes) and the header the ring buffer puts before
/// each record (`BPF_RINGBUF_HDR_SZ`, kernel/bpf/ringbuf.c), rounded up to 8.
const PIPELINE_SLOT: usize = 24 + 8;

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

pub(crate) fn run(seconds: u64, connections: u32, rounds: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        rounds > 0 && seconds > 0 && connections > 0,
        "--rounds, --seconds and --connections must be at least 1"
    );
    build_ebpf()?;
    crate::run(cargo().args(["build", "--release", "--workspace"]))?;
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
    // The default again with the kernel's BPF statistics on: the time in each program, and
    // what the statistics themselves cost.
    // Last, the default's probe set with none of its work (its two request-path uprobes
    // empty, the socket tracepoints counting bytes): the ceiling of that probe set.
    let modes: [(&str, Option<&[&str]>); 7] = [
        ("no observer", None),
        ("no request metrics", Some(&["--no-request-metrics"])),
        ("request metrics (default)", Some(&[])),
        ("floor (one uprobe/request)", Some(&["--floor"])),
        ("bpftrace (same probes, counts)", None),
        ("default with --bpf-stats", Some(&["--bpf-stats"])),
        ("default's probes, no work", Some(&["--floor-probe-set"])),
    ];
    let bt_script = bpftrace::script(
        &observer,
        (
            &testbed_harness::binary("rusty-workers-proxy"),
            tb.proxy_pid(),
        ),
        &[tb.runtime_pid(0), tb.runtime_pid(1)],
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
    out!("request metrics with --bpf-stats, per program (median round; runs and in-program us per request, uprobe traps not included):");
    for (prog, runs, us) in &rows[5].1.per_program {
        out!("  {prog:<16} {runs:>6.2} runs {us:>7.2} us");
    }
    let per_req_us = |rps: f64| 1e6 / rps;
    let without = rows[1].1.wrk.rps;
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
        "request metrics cost {:.1} us of wall time per request over --no-request-metrics ({:.1}% throughput), {:.1} us over no observer ({:.1}% throughput)",
        per_req_us(full) - per_req_us(without),
        (1.0 - full / without) * 100.0,
        per_req_us(full) - per_req_us(base),
        (1.0 - full / base) * 100.0
    );
    // Each round ran the default and the floor minutes apart on the same drifting machine:
    // their ratio per round compares like with like, where the ratio of two medians can pair
    // a slow round of one with a fast round of the other (seen here: 0.900 of medians, 0.859
    // of paired rounds).
    let (shown, floor_share) = round_ratios(&results[2], &results[3]);
    out!(
        "default / floor, round by round: {shown} (median {floor_share:.3}; of the medians above: {:.3})",
        full / floor
    );
    let (shown, ceiling) = round_ratios(&results[6], &results[3]);
    out!(
        "default's probes with empty programs and byte counting / floor, round by round: {shown} (median {ceiling:.3}): the ceiling of the default's probe set; the default reaches {:.3} of it (median of the rounds' ratios)",
        round_ratios(&results[2], &results[6]).1
    );
    let (shown, stats_cost) = round_ratios(&results[5], &results[2]);
    out!(
        "default with --bpf-stats / default, round by round: {shown} (median {stats_cost:.3}): the kernel's statistics, two clock reads per program run"
    );
    out!("```\n");
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
            // A slower drain does not overrun: the daemon's 500 ms housekeeping drains too,
            // and 4 MiB hold 0.5 s of these records. A ring of one page does.
            &["--ring-bytes", "4096"][..],
            " (a 4 KiB ring instead of 4 MiB: overrun)",
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
            "\nAt {rate:.0} events/s (all that uprobe traps on these CPUs can offer) the observer used {} of a core: at that cost one core of userspace takes about {:.1} M events/s. The ring buffer holds {:.2} M events/s between two 10 ms drains (4 MiB of {PIPELINE_SLOT}-byte slots: the {}-byte `HttpRequest` record and the ring's 8-byte header). Losses, when they come, are counted: the overrun row's lost events plus those received equal the calls.",
            pct(cpu),
            rate / cpu.max(1e-9) / 1e6,
            4.0 * 1024.0 * 1024.0 / PIPELINE_SLOT as f64 / 0.010 / 1e6,
            PIPELINE_SLOT - 8,
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
        "| default at least 90% of the floor's throughput (one uprobe per request; median of the rounds' ratios) | {:.1}% | {} |",
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

/// The throughput of `a` over `b` in each round (both ran in it, on the same drifting
/// machine), as printed, and their median.
fn round_ratios(a: &[Measured], b: &[Measured]) -> (String, f64) {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| a.wrk.rps / b.wrk.rps)
        .collect();
    let shown: Vec<String> = r.iter().map(|x| format!("{x:.3}")).collect();
    r.sort_by(f64::total_cmp);
    (shown.join(" "), r[r.len() / 2])
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
        // The floor's empty program counts nothing; run time is there only with --bpf-stats.
        let runs = d("rusty_workers_observer_bpf_program_runs_total");
        m.runs = if runs > 0.0 { runs / n } else { f64::NAN };
        m.bpf_us = if after.contains("rusty_workers_observer_bpf_program_run_seconds_total{") {
            d("rusty_workers_observer_bpf_program_run_seconds_total") * 1e6 / n
        } else {
            f64::NAN
        };
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
