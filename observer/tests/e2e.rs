//! End to end, for real: the test target runs, the observer attaches its uprobes to the test
//! proxy, load flows, and every metric must EQUAL the proxy's own ground truth.
//!
//! Needs root (eBPF) and the release build of the test target (`cargo xtask test`).

use observer_common::method;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testbed_harness::{
    free_port, http_get, joins_learnt, load, load_requests, lost_instances, parse_metrics, rss_mib,
    truth_u64, App, Options, Request, Testbed, APP_COUNTERS,
};

/// Probes without request metrics (`--no-request-metrics`), and those request metrics add.
const SPINE_PROBES: &[&str] = &[
    "app_cache_insert",
    "app_cache_remove",
    "runtime_rpc",
    "net_send",
    "net_recv",
];
const REQUEST_PROBES: &[&str] = &[
    "http_request",
    "http_response",
    "sched_error",
    "rpc_response",
    "rpc_done",
    "rpc_done_direct",
];

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc_geteuid() },
        0,
        "the end-to-end tests load eBPF programs: run them as root (CI does)"
    );
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

struct Observer {
    child: Child,
    /// The proxy it was started on.
    target: u32,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
    stopped: bool,
}

impl Drop for Observer {
    /// A failed test must not leave its observer attached for the next one.
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Observer {
    /// Starts the observer with request metrics (the default), or without
    /// (`no_request_metrics`: `--no-request-metrics`).
    fn start(pid: u32, dir: &std::path::Path, no_request_metrics: bool) -> Observer {
        Observer::start_with(pid, dir, no_request_metrics, &[])
    }

    /// As `start`, with more command line options.
    fn start_with(
        pid: u32,
        dir: &std::path::Path,
        no_request_metrics: bool,
        extra: &[&str],
    ) -> Observer {
        Observer::start_missing(pid, dir, no_request_metrics, extra, &[])
    }

    /// As `start_with`, on a build that lacks the functions of the probes `missing`: those
    /// must be reported `unresolved`, every other one attached.
    fn start_missing(
        pid: u32,
        dir: &std::path::Path,
        no_request_metrics: bool,
        extra: &[&str],
        missing: &[String],
    ) -> Observer {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("observer.log");
        let mut args = vec![
            "--pid".to_string(),
            pid.to_string(),
            "--listen".to_string(),
            addr.to_string(),
        ];
        if no_request_metrics {
            args.push("--no-request-metrics".into());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_observer"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the observer");
        let o = Observer {
            child,
            target: pid,
            addr,
            log,
            stopped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(m) = o.try_scrape() {
                let extra = if no_request_metrics {
                    &[][..]
                } else {
                    REQUEST_PROBES
                };
                let attached = SPINE_PROBES.iter().chain(extra).all(|p| {
                    let reason = if missing.iter().any(|x| x == p) {
                        "unresolved"
                    } else {
                        ""
                    };
                    let want = (reason.is_empty() as u8) as f64;
                    m.get(&format!(
                        "rusty_workers_observer_probe_attached{{probe=\"{p}\",reason=\"{reason}\"}}"
                    )) == Some(&want)
                });
                assert!(attached, "not every probe attached:\n{}", o.log_text());
                return o;
            }
            assert!(
                Instant::now() < deadline,
                "observer did not serve /metrics:\n{}",
                o.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_scrape(&self) -> std::io::Result<BTreeMap<String, f64>> {
        let (status, body) = http_get(self.addr, "localhost", "/metrics")?;
        if status != 200 {
            return Err(std::io::Error::other(format!("status {status}")));
        }
        Ok(parse_metrics(&body))
    }

    /// The exposition must pass `promtool check metrics` (Prometheus' own linter), when installed.
    fn lint(&self) {
        let (_, body) =
            http_get(self.addr, "localhost", "/metrics").expect("scraping the observer");
        let Ok(mut child) = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            return;
        };
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn scrape(&self) -> BTreeMap<String, f64> {
        self.try_scrape().expect("scraping the observer")
    }

    /// The uprobe breakpoints in the proxy's code now: there must be some (else the check after
    /// the observer's exit could not fail).
    fn breakpoints_while_attached(&self) -> usize {
        let sites = breakpoints_in(self.target);
        assert!(
            sites > 0,
            "no uprobe breakpoint in the proxy's code while attached"
        );
        sites
    }

    /// SIGINT (an operator's Ctrl-C, 2) or SIGTERM (systemd, 15): must detach and exit 0.
    fn stop(mut self, signal: i32) -> String {
        self.stopped = true;
        let ours = ours_in_kernel();
        assert!(
            !ours.programs.is_empty() && !ours.links.is_empty(),
            "bpftool shows none of the observer's programs and links: {ours:?}"
        );
        let sites = self.breakpoints_while_attached();
        // SAFETY: kill(2) on our own child.
        unsafe { libc_kill(self.child.id() as i32, signal) };
        let status = self.child.wait().expect("observer exit");
        let log = self.log_text();
        assert!(status.success(), "observer exited with {status}:\n{log}");
        assert!(log.contains("detached"), "no detach message:\n{log}");
        assert_nothing_left(&ours);
        assert_no_breakpoint_left(self.target, sites);
        log
    }

    /// SIGKILL: no detach code runs. Returns what it had in the kernel and how long that took
    /// to go (checked by `assert_nothing_left`).
    fn kill9(mut self) -> (KernelObjects, Duration) {
        self.stopped = true;
        let ours = ours_in_kernel();
        assert!(
            !ours.programs.is_empty() && !ours.links.is_empty(),
            "bpftool shows none of the observer's programs and links: {ours:?}"
        );
        let sites = self.breakpoints_while_attached();
        // SAFETY: kill(2) on our own child.
        unsafe { libc_kill(self.child.id() as i32, 9) };
        let _ = self.child.wait();
        let gone = assert_nothing_left(&ours);
        assert_no_breakpoint_left(self.target, sites);
        (ours, gone)
    }
}

/// The observer's programs and links in the kernel, by id (`bpftool`; the e2e tests run one
/// observer at a time, `SERIAL`).
#[derive(Debug, Default)]
struct KernelObjects {
    programs: Vec<u64>,
    links: Vec<u64>,
}

const OUR_PROGRAMS: &[&str] = &[
    "rpc_call",
    "lru_insert",
    "lru_remove",
    "rpc_response",
    "rpc_done",
    "http_request",
    "http_response",
    "sched_error",
    "sock_recv",
    "sock_send",
    "server_poll",
    "server_poll_sret",
    "server_drop",
];

fn bpftool_json(what: &str) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show"])
        .output()
        .expect("bpftool (scripts/bootstrap.sh installs it)");
    assert!(
        out.status.success(),
        "bpftool {what} show failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool {what} show printed no JSON list ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn ours_in_kernel() -> KernelObjects {
    let programs: Vec<u64> = bpftool_json("prog")
        .iter()
        .filter(|p| OUR_PROGRAMS.contains(&p["name"].as_str().unwrap_or("")))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let links = bpftool_json("link")
        .iter()
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|id| programs.contains(&id))
        })
        .filter_map(|l| l["id"].as_u64())
        .collect();
    KernelObjects { programs, links }
}

/// None of `before`'s programs and links is in the kernel any more (it frees them shortly
/// after their last file descriptor closes: waits up to 5 s), and no uprobe is registered
/// through tracefs. Returns how long they took to go.
fn assert_nothing_left(before: &KernelObjects) -> Duration {
    let t0 = Instant::now();
    loop {
        let progs: Vec<u64> = bpftool_json("prog")
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .filter(|id| before.programs.contains(id))
            .collect();
        let links: Vec<u64> = bpftool_json("link")
            .iter()
            .filter_map(|l| l["id"].as_u64())
            .filter(|id| before.links.contains(id))
            .collect();
        if progs.is_empty() && links.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "programs {progs:?} and links {links:?} still in the kernel 5 s after the observer's exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// The proxy's uprobe sites (the catalog's, resolved in its executable) whose code in the
/// process differs from the executable file: where the kernel has written its breakpoint into
/// the process's copy of the page (kernel/events/uprobes.c, `uprobe_write_opcode`). Read from
/// `/proc/<pid>/mem`: no tracefs is needed, and uprobes made through the perf PMU, which
/// tracefs's `uprobe_events` never lists, are seen too. Panics if anything cannot be read.
fn breakpoints_in(pid: u32) -> usize {
    use std::os::unix::fs::FileExt as _;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("the proxy (PID {pid}) must run to check its code: {e}"));
    // Through /proc: the executable of a contained proxy is not at its path on the host.
    let file = std::fs::read(format!("/proc/{pid}/exe")).expect("reading the proxy's executable");
    let table = observer::symbols::SymbolTable::from_elf_bytes(&file, &exe.to_string_lossy())
        .expect("the proxy's symbols");
    let sites: Vec<u64> =
        observer::resolve::resolve(&observer::catalog::Catalog::builtin_proxy(), &table)
            .iter()
            .flat_map(|r| r.sites().iter().map(|s| s.file_offset).collect::<Vec<_>>())
            .collect();
    assert!(!sites.is_empty(), "no probe resolves in {}", exe.display());
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("the proxy's maps");
    let exe_name = exe.to_string_lossy().into_owned();
    // (start, end, file offset) of the executable's mappings.
    let mapped: Vec<(u64, u64, u64)> = maps
        .lines()
        .filter(|l| l.ends_with(&exe_name))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (lo, hi) = f.next()?.split_once('-')?;
            let _perms = f.next()?;
            let off = u64::from_str_radix(f.next()?, 16).ok()?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
                off,
            ))
        })
        .collect();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("opening the proxy's memory");
    sites
        .iter()
        .filter(|&&fo| {
            let (lo, _, off) = mapped
                .iter()
                .find(|(lo, hi, off)| fo >= *off && fo < off + (hi - lo))
                .unwrap_or_else(|| panic!("site {fo:#x} is in no mapping of {exe_name}:\n{maps}"));
            let mut b = [0u8; 1];
            mem.read_exact_at(&mut b, lo + fo - off)
                .unwrap_or_else(|e| panic!("reading the proxy's code at file offset {fo:#x}: {e}"));
            b[0] != file[fo as usize]
        })
        .count()
}

/// No breakpoint is left in the proxy's code (it had `had` while the observer ran).
fn assert_no_breakpoint_left(pid: u32, had: usize) {
    let left = breakpoints_in(pid);
    assert_eq!(
        left, 0,
        "{left} of the {had} uprobe breakpoints are still in the proxy's code after the observer's exit"
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// e2e tests attach eBPF programs and check that none is left after: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Every per-app metric and every RPC counter must equal the ground truth; returns the number
/// of series compared.
fn assert_metrics_equal_truth(
    m: &BTreeMap<String, f64>,
    truth: &Value,
    t0: &Value,
    apps: &[App],
) -> usize {
    let mut checked = 0;
    for a in apps {
        let t = &truth["apps"][a.id.as_str()];
        let instances = [("app_instances{app=\"{}\"}", "instances_alive")];
        for (metric, field) in APP_COUNTERS.iter().chain(&instances) {
            let series = format!("rusty_workers_{}", metric.replace("{}", &a.id));
            let want = t[field].as_u64().unwrap_or(0) as f64;
            let got = m
                .get(&series)
                .copied()
                .unwrap_or_else(|| panic!("no series {series}"));
            assert_eq!(
                got,
                want,
                "{series}: observer {got}, ground truth {want}\n{t}\n{}",
                observer_self(m)
            );
            checked += 1;
        }
        let want = t["dropped"].as_u64().unwrap_or(0) as f64;
        let got = lost_instances(m, &a.id);
        assert_eq!(
            got,
            want,
            "instances of {} lost (dropped less dropped and ended): observer {got}, ground truth {want}\n{t}\n{}",
            a.id,
            observer_self(m)
        );
        checked += 1;
        let age = m.get(&format!(
            "rusty_workers_app_loaded_seconds{{app=\"{}\"}}",
            a.id
        ));
        match t["loaded"].as_bool() {
            Some(true) => assert!(
                age.is_some_and(|s| *s > 0.0 && *s < 600.0),
                "{}: age {age:?}",
                a.id
            ),
            _ => assert!(age.is_none(), "{} is not loaded but has an age", a.id),
        }
    }
    assert_eq!(
        m["rusty_workers_apps_loaded"],
        truth["apps_loaded"].as_u64().unwrap() as f64,
        "apps loaded"
    );
    // RPCs: the observer counts from its attach; ground truth from the proxy's start.
    for method in &method::NAMES[..method::UNKNOWN as usize] {
        let want = truth_u64(truth, &["rpc_calls", method]) - truth_u64(t0, &["rpc_calls", method]);
        let got = m[&format!("rusty_workers_runtime_rpcs_total{{method=\"{method}\"}}")];
        assert_eq!(got, want as f64, "runtime_rpcs_total{{method={method}}}");
        checked += 1;
    }
    assert_eq!(
        m["rusty_workers_runtime_rpcs_total{method=\"unknown\"}"],
        0.0
    );
    assert_eq!(m["rusty_workers_observer_events_lost_total"], 0.0);
    assert_eq!(m["rusty_workers_observer_unattributed_requests_total"], 0.0);
    assert_eq!(m["rusty_workers_observer_decode_errors_total"], 0.0);
    assert_eq!(
        m["rusty_workers_observer_capacity_evictions_unnamed_total"],
        0.0
    );
    checked
}

/// The request-path budget: BPF program runs per proxied request, counted by the kernel's own
/// BPF stats over everything the scenario did.
/// Uprobe program runs in the proxy per request (the socket tracepoints, which run on every
/// socket read and write of the host, and the runtime probes are left out).
fn bpf_runs_per_request(m: &BTreeMap<String, f64>, truth: &Value) -> f64 {
    let runs: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_observer_bpf_program_runs_total"))
        .filter(|(k, _)| !k.contains("program=\"sock_") && !k.contains("program=\"server_"))
        .map(|(_, v)| v)
        .sum();
    let requests = truth_u64(truth, &["rpc_calls", "fetch"]) as f64;
    assert!(runs > 0.0, "BPF stats are on: {}", observer_self(m));
    runs / requests
}

fn all_ok(statuses: &BTreeMap<u16, usize>, n: usize) {
    assert_eq!(
        statuses.get(&200),
        Some(&n),
        "all requests succeed: {statuses:?}"
    );
}

#[test]
fn metrics_equal_ground_truth() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (1..=5).map(|i| App::new(&format!("app-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        load_interval_ms: 0,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);
    // Without request metrics: the metrics that do not need them, and the request-path budget.
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, true);
    let t0 = tb.truth();

    // N requests over K apps from 8 concurrent clients: concurrent cold starts included.
    let n = 1000;
    let paths: Vec<String> = (0..n)
        .map(|i| format!("{}/r{i}", apps[(i * 7 + i / 3) % apps.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 8), n);

    // Change one app: the proxy's gc evicts it from the app cache.
    let mut changed = apps.clone();
    changed[1].bundle_id = "v2".into();
    tb.set_apps(&changed);
    wait_until("the eviction of app-2", 15, || {
        truth_u64(&tb.truth(), &["apps", "app-2", "evictions"]) == 1
    });

    // Let pooled instances expire, then touch every app: the gc terminates expired instances.
    std::thread::sleep(Duration::from_millis(
        opts.ready_instance_expiration_ms + 500,
    ));
    let touch: Vec<String> = apps
        .iter()
        .flat_map(|a| [format!("{}/t1", a.prefix), format!("{}/t2", a.prefix)])
        .collect();
    all_ok(&load(tb.http, &touch, 1), touch.len());
    let truth = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m = obs.scrape();

    let checked = assert_metrics_equal_truth(&m, &truth, &t0, &apps);
    obs.lint();
    // Without request metrics: at most 2 runs per request in steady state: the fetch is one; spawns,
    // terminations and loads are the rest.
    let runs = bpf_runs_per_request(&m, &truth);
    assert!(runs <= 2.0, "{runs} BPF runs per request");
    let terminations: u64 = apps
        .iter()
        .map(|a| truth_u64(&truth, &["apps", &a.id, "terminations"]))
        .sum();
    assert!(
        terminations > 0,
        "the scenario must produce terminations: {truth}"
    );
    eprintln!(
        "e2e: {checked} series equal ground truth; {} requests, {} spawns, {terminations} terminations, {runs:.3} BPF runs per request",
        truth_u64(&truth, &["rpc_calls", "fetch"]),
        truth_u64(&truth, &["rpc_calls", "spawn_worker"]),
    );
    obs.stop(2);
}

#[test]
fn capacity_evictions_equal_ground_truth() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Six apps through an app cache of three: every new app pushes out the least recently used.
    let apps: Vec<App> = (1..=6).map(|i| App::new(&format!("cap-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        app_cache_size: 3,
        load_interval_ms: 0,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);
    // With request metrics on: the metrics that do not need them are the same.
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let t0 = tb.truth();
    for round in 0..3 {
        // Sequential sweeps (each app reloaded after being pushed out) then a concurrent mix.
        let sweep: Vec<String> = apps
            .iter()
            .map(|a| format!("{}/s{round}", a.prefix))
            .collect();
        all_ok(&load(tb.http, &sweep, 1), sweep.len());
        // A cache this small thrashes: an app can be pushed out between its load and the
        // request's second look-up, which rusty-workers answers 502. Not every request succeeds.
        let mix: Vec<String> = (0..300)
            .map(|i| format!("{}/m{i}", apps[(i * 5 + round) % apps.len()].prefix))
            .collect();
        let statuses = load(tb.http, &mix, 6);
        assert!(
            statuses.get(&200).copied().unwrap_or(0) * 10 >= mix.len() * 9,
            "{statuses:?}"
        );
    }
    let truth = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m = obs.scrape();
    let capacity: u64 = apps
        .iter()
        .map(|a| truth_u64(&truth, &["apps", &a.id, "capacity_evictions"]))
        .sum();
    assert!(capacity > 0, "the scenario must evict by capacity: {truth}");
    let checked = assert_metrics_equal_truth(&m, &truth, &t0, &apps);
    eprintln!("e2e: {checked} series equal ground truth; {capacity} capacity evictions");
    obs.stop(15);
}

#[test]
fn a_listen_port_in_use_is_named_with_the_fix() {
    require_root();
    let tb = Testbed::start(&Options {
        runtimes: 1,
        load_interval_ms: 0,
        ..Options::default()
    });
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_observer"))
        .args([
            "--pid",
            &tb.proxy_pid().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("running the observer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("port {port} is already in use")),
        "{stderr}"
    );
    assert!(stderr.contains("--listen"), "{stderr}");
}

fn observer_self(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_observer_") && !k.contains("collector"))
        .map(|(k, v)| format!("{k} {v}\n"))
        .collect()
}

/// A counter's value in `after` minus `before` (0 for a series absent from both).
fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, series: &str) -> u64 {
    let a = after.get(series).copied().unwrap_or(0.0);
    let b = before.get(series).copied().unwrap_or(0.0);
    (a - b).round() as u64
}

/// Per app, per outcome / start: what the truth counted between two snapshots.
fn truth_delta(after: &Value, before: &Value, app: &str, path: &[&str]) -> u64 {
    let full = |v: &Value| {
        let mut x = &v["apps"][app];
        for p in path {
            x = &x[*p];
        }
        x.as_u64().unwrap_or(0)
    };
    full(after) - full(before)
}

/// Index of the latency bucket (by upper bound) holding quantile `q` of a histogram delta.
fn bucket_of_quantile(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
    app: &str,
    q: f64,
) -> usize {
    let bounds = observer::expo::LATENCY_BUCKETS;
    let count = |le: String| {
        delta(
            after,
            before,
            &format!(
                "rusty_workers_app_request_duration_seconds_bucket{{app=\"{app}\",le=\"{le}\"}}"
            ),
        )
    };
    let total = count("+Inf".into());
    assert!(total > 0, "no requests observed for {app}");
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    bounds
        .iter()
        .position(|b| count(b.to_string()) >= rank)
        .unwrap_or(bounds.len())
}

fn bucket_of(seconds: f64) -> usize {
    let bounds = observer::expo::LATENCY_BUCKETS;
    bounds
        .iter()
        .position(|b| seconds <= *b)
        .unwrap_or(bounds.len())
}

fn client_quantile(mut lat: Vec<Duration>, q: f64) -> f64 {
    lat.sort();
    let rank = ((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
    lat[rank - 1].as_secs_f64()
}

/// Until every relation the joins need is learnt (the first requests after attach teach it).
fn warm_up(tb: &Testbed, obs: &Observer, apps: &[App]) {
    if !try_warm_up(tb, obs, apps, Duration::from_secs(60)) {
        panic!(
            "the observer did not learn its joins:\n{}\n{}",
            observer_self(&obs.scrape()),
            obs.log_text()
        );
    }
}

/// As `warm_up`, for at most `wait`: whether the joins were learnt.
fn try_warm_up(tb: &Testbed, obs: &Observer, apps: &[App], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut round = 0;
    loop {
        let m = obs.scrape();
        if joins_learnt(&m) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        // One at a time, each on an app whose pool was just emptied by a fresh bundle: every
        // request is alone in flight and cold.
        let reqs: Vec<Request> = apps
            .iter()
            .map(|a| Request::get(&format!("{}/warm{round}", a.prefix)))
            .collect();
        load_requests(tb.http, &reqs, 1);
        round += 1;
    }
}

#[test]
fn request_metrics_equal_ground_truth() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let slow = [("lat-5", 5u64), ("lat-50", 50), ("lat-200", 200)];
    let mut apps: Vec<App> = slow.iter().map(|(id, ms)| App::slow(id, *ms)).collect();
    // Failure injection by the apps' scripts: an execution error that ends the worker, one
    // that does not, and a worker the runtime has lost (the proxy retries, then gives up).
    apps.push(App::failing("crashes", "runtime_throws"));
    apps.push(App::failing("throws", "script"));
    apps.push(App::failing("lost", "no_such_worker"));
    apps.push(App::new("plain"));
    let opts = Options {
        apps: apps.clone(),
        // The proxy drops a runtime that does not answer its load query.
        load_interval_ms: 300,
        // Expiry off the test's time scale: instances stay pooled.
        ready_instance_expiration_ms: 60_000,
        dropout_rate: 0.0,
        max_request_body_size_bytes: 1024,
        ..Options::default()
    };
    let mut tb = Testbed::start(&opts);
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    warm_up(&tb, &obs, &apps);
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();

    // Latency: 200 requests per slow app from 8 clients; the client measures each. (Its p99
    // is then the 198th: one scheduling hiccup at the client does not move it.)
    let per_app = 200;
    let mut latency_reqs = Vec::new();
    for i in 0..per_app {
        for (id, _) in &slow {
            latency_reqs.push((id.to_string(), Request::get(&format!("/{id}/l{i}"))));
        }
    }
    let reqs: Vec<Request> = latency_reqs.iter().map(|(_, r)| r.clone()).collect();
    let answers = load_requests(tb.http, &reqs, 8);
    // Every outcome: failures, no route, a body too large, alongside plain traffic.
    let mut mixed = Vec::new();
    for i in 0..40 {
        mixed.push(Request::get(&format!("/crashes/c{i}")));
        mixed.push(Request::get(&format!("/throws/t{i}")));
        mixed.push(Request::get(&format!("/plain/p{i}")));
        if i % 4 == 0 {
            mixed.push(Request::get(&format!("/lost/n{i}")));
            mixed.push(Request::get(&format!("/no-such-app/x{i}")));
            mixed.push(Request {
                body: vec![b'x'; 4096],
                ..Request::get(&format!("/plain/big{i}"))
            });
        }
    }
    load_requests(tb.http, &mixed, 6);
    // A runtime that disappears: its instances' fetches fail, the proxy drops the runtime and
    // retries elsewhere; spawns sent to it fail.
    tb.kill_runtime(0);
    let after_kill: Vec<Request> = (0..60)
        .map(|i| Request::get(&format!("/{}/k{i}", ["plain", "lat-5", "throws"][i % 3])))
        .collect();
    load_requests(tb.http, &after_kill, 3);
    // No runtime left: the proxy fails the fetches on its pooled instances, drops the runtime,
    // then has no instance to offer.
    tb.kill_runtime(1);
    std::thread::sleep(Duration::from_millis(1000));
    let none: Vec<Request> = (0..8)
        .map(|i| Request::get(&format!("/plain/z{i}")))
        .collect();
    load_requests(tb.http, &none, 1);
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m1 = obs.scrape();
    obs.lint();

    // Per app (and app="" for requests that never reached one), every outcome counter equals
    // the proxy's count, cold and warm starts too, and the histogram counts every request.
    let mut names: Vec<String> = apps.iter().map(|a| a.id.clone()).collect();
    names.push(String::new());
    let outcomes = observer::requests::OUTCOMES;
    let mut checked = 0;
    let mut seen = BTreeMap::new();
    let mut no_instance = (0, 0);
    for app in &names {
        let mut requests = 0;
        for o in outcomes {
            let want = truth_delta(&t1, &t0, app, &["outcomes", o]);
            let got = delta(
                &m1,
                &m0,
                &format!("rusty_workers_app_responses_total{{app=\"{app}\",outcome=\"{o}\"}}"),
            );
            *seen.entry(*o).or_insert(0) += want;
            if *o == "no_instance" {
                // A request that finds no runtime at all sends no RPC: nothing on the wire
                // names its app, and the observer counts it under app="". Per app the
                // observer sees at most the truth; the totals are equal.
                assert!(
                    app.is_empty() || got <= want,
                    "app {app:?} no_instance: {got} > {want}"
                );
                no_instance.0 += got;
                no_instance.1 += want;
                requests += got;
                continue;
            }
            assert_eq!(
                got,
                want,
                "app {app:?} outcome {o}: observer {got}, ground truth {want}\n{}\n{}\n{}",
                t1["apps"][app.as_str()],
                m1.iter()
                    .filter(|(k, _)| k.starts_with("rusty_workers_app_responses_total"))
                    .map(|(k, v)| format!("{k} {v}\n"))
                    .collect::<String>(),
                observer_self(&m1)
            );
            requests += want;
            checked += 1;
        }
        let count = delta(
            &m1,
            &m0,
            &format!("rusty_workers_app_request_duration_seconds_count{{app=\"{app}\"}}"),
        );
        assert_eq!(count, requests, "histogram count of app {app:?}");
        if !app.is_empty() {
            for start in ["cold", "warm"] {
                let want = truth_delta(&t1, &t0, app, &[start]);
                let got = delta(
                    &m1,
                    &m0,
                    &format!(
                        "rusty_workers_app_request_starts_total{{app=\"{app}\",start=\"{start}\"}}"
                    ),
                );
                assert_eq!(got, want, "app {app:?} {start} starts");
                checked += 1;
            }
        }
    }
    assert_eq!(no_instance.0, no_instance.1, "no_instance, all apps");
    // Instances: failed fetches make the proxy let workers go; the observer follows them.
    let mut discarded = 0;
    for a in &apps {
        let want = truth_delta(&t1, &t0, &a.id, &["discarded"]);
        let got = delta(
            &m1,
            &m0,
            &format!(
                "rusty_workers_app_instances_discarded_total{{app=\"{}\"}}",
                a.id
            ),
        );
        assert_eq!(got, want, "{}: instances discarded", a.id);
        let alive = truth_u64(&t1, &["apps", &a.id, "instances_alive"]) as f64;
        let got = m1[&format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id)];
        assert_eq!(got, alive, "{}: instances", a.id);
        discarded += want;
        checked += 2;
    }
    assert!(discarded > 0, "the scenario must discard instances");
    // The same instances by the runtime that spawned them (every spawn was after the attach).
    let alive: f64 = apps
        .iter()
        .map(|a| truth_u64(&t1, &["apps", &a.id, "instances_alive"]) as f64)
        .sum();
    let on_runtimes: f64 = m1
        .iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_runtime_instances{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(on_runtimes, alive, "instances by runtime");
    assert!(alive > 0.0, "the scenario must leave instances pooled");
    // Every outcome but the catch-all.
    for o in outcomes.iter().filter(|o| **o != "internal_error") {
        assert!(
            seen[*o] > 0,
            "the scenario must produce outcome {o}: {seen:?}"
        );
    }

    // Latency: the observer's p50 and p99 fall between the bucket of the injected delay (no
    // request is shorter) and the bucket of the client's quantile (the observer times a part of
    // what the client waits: the client adds its connect and the scheduling of a busy machine,
    // which at p99 can push it past a bucket bound, as 5 ms + 5.8 ms once did).
    for (id, ms) in &slow {
        let lat: Vec<Duration> = latency_reqs
            .iter()
            .zip(&answers)
            .filter(|((app, _), (status, _))| app == id && *status == 200)
            .map(|(_, (_, d))| *d)
            .collect();
        assert_eq!(lat.len(), per_app, "{id}: every latency request succeeds");
        for q in [0.5, 0.99] {
            let client = client_quantile(lat.clone(), q);
            let want = bucket_of(client);
            let floor = bucket_of(*ms as f64 / 1e3 + 1e-4);
            let got = bucket_of_quantile(&m1, &m0, id, q);
            eprintln!(
                "e2e: {id}: client p{} {:.1} ms, observer's in bucket {got} (le {})",
                q * 100.0,
                client * 1e3,
                observer::expo::LATENCY_BUCKETS
                    .get(got)
                    .map_or("+Inf".to_string(), |b| b.to_string())
            );
            let mut slowest = lat.clone();
            slowest.sort();
            slowest.reverse();
            slowest.truncate(5);
            assert!(
                (floor..=want).contains(&got),
                "{id} ({ms} ms injected, bucket {floor}): observer p{} in bucket {got}, client's {client:.4} s in bucket {want}; slowest at the client: {slowest:?}",
                q * 100.0
            );
        }
    }

    // Per runtime: every fetch is either answered (timed) or failed without an answer.
    let by_method = |m: &BTreeMap<String, f64>, name: &str, method: &str| -> u64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(name) && k.contains(&format!("method=\"{method}\"")))
            .map(|(_, v)| *v as u64)
            .sum()
    };
    for method in ["fetch", "spawn_worker"] {
        let answered = by_method(
            &m1,
            "rusty_workers_runtime_rpc_duration_seconds_count",
            method,
        ) - by_method(
            &m0,
            "rusty_workers_runtime_rpc_duration_seconds_count",
            method,
        );
        let unanswered = ["connection_reset", "no_answer"]
            .iter()
            .map(|r| {
                let f = |m: &BTreeMap<String, f64>| -> u64 {
                    m.iter()
                        .filter(|(k, _)| {
                            k.starts_with("rusty_workers_runtime_rpc_failures_total")
                                && k.contains(&format!("method=\"{method}\""))
                                && k.contains(&format!("reason=\"{r}\""))
                        })
                        .map(|(_, v)| *v as u64)
                        .sum()
                };
                f(&m1) - f(&m0)
            })
            .sum::<u64>();
        let want = truth_u64(&t1, &["rpc_calls", method]) - truth_u64(&t0, &["rpc_calls", method]);
        assert_eq!(
            answered + unanswered,
            want,
            "{method} RPCs: answered + unanswered"
        );
        checked += 1;
    }
    let errors: u64 = m1
        .iter()
        .filter(|(k, _)| {
            k.starts_with("rusty_workers_runtime_rpc_failures_total")
                && k.contains("reason=\"error_answer\"")
                && k.contains("method=\"fetch\"")
        })
        .map(|(_, v)| *v as u64)
        .sum();
    assert!(errors > 0, "execution errors are failed fetches");
    let dead: u64 = m1
        .iter()
        .filter(|(k, _)| {
            k.starts_with("rusty_workers_runtime_rpc_failures_total")
                && (k.contains("reason=\"connection_reset\"") || k.contains("reason=\"no_answer\""))
        })
        .map(|(_, v)| *v as u64)
        .sum();
    assert!(dead > 0, "the killed runtime's calls fail on the transport");
    assert!(
        m1.keys().all(|k| !k.contains("runtime=\"unknown\"")),
        "every runtime is named:\n{}",
        m1.keys()
            .filter(|k| k.contains("runtime=\"unknown\""))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Spawn latency per app: one observation per spawn (of the apps that never met the
    // killed runtime, whose spawns all got an answer).
    for id in ["lat-50", "lat-200", "crashes"] {
        let spawns = truth_delta(&t1, &t0, id, &["spawns"]);
        let got = delta(
            &m1,
            &m0,
            &format!("rusty_workers_app_spawn_duration_seconds_count{{app=\"{id}\"}}"),
        );
        assert!(spawns > 0, "{id} spawns");
        assert_eq!(got, spawns, "{id}: spawn durations");
    }
    for c in [
        "rusty_workers_observer_unmatched_rpc_calls_total",
        "rusty_workers_observer_unmatched_responses_total",
        "rusty_workers_observer_unattributed_calls_total",
    ] {
        assert_eq!(delta(&m1, &m0, c), 0, "{c}\n{}", observer_self(&m1));
    }
    assert_eq!(m1["rusty_workers_observer_events_lost_total"], 0.0);
    eprintln!("e2e: {checked} request series equal ground truth; outcomes {seen:?}");
    obs.stop(2);
}

/// A process series of the observer: `rusty_workers_process_<name>{<labels>,role,instance}`
/// with the labels in the exposition's (sorted) order.
fn proc_series(name: &str, role: &str, instance: &str, extra: Option<(&str, &str)>) -> String {
    let mut labels = vec![("process", instance), ("role", role)];
    if let Some(kv) = extra {
        labels.push(kv);
    }
    labels.sort();
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("rusty_workers_process_{name}{{{}}}", l.join(","))
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// The runtime's own byte counts (its RPC connections) and the observer's, both as deltas
/// over a phase, must agree within 1%.
fn assert_bytes_agree(what: &str, own: (f64, f64), seen: (f64, f64)) {
    for (dir, own, seen) in [("received", own.0, seen.0), ("sent", own.1, seen.1)] {
        assert!(
            own > 1000.0,
            "{what}: the runtime counted only {own} bytes {dir}"
        );
        let err = (seen - own).abs() / own;
        eprintln!(
            "e2e: {what}: {dir} {seen} bytes seen, {own} counted by the runtime ({:.3}%)",
            err * 100.0
        );
        assert!(
            err <= 0.01,
            "{what}: {dir}: observer {seen} bytes, runtime {own}"
        );
    }
}

fn runtime_bytes(tb: &Testbed, i: usize) -> (f64, f64) {
    let s = tb.runtime_stats(i);
    (
        s["bytes_read"].as_f64().unwrap_or(0.0),
        s["bytes_written"].as_f64().unwrap_or(0.0),
    )
}

fn observed_bytes(m: &BTreeMap<String, f64>, instance: &str) -> (f64, f64) {
    let b = |dir| {
        get(
            m,
            &proc_series(
                "network_bytes_total",
                "runtime",
                instance,
                Some(("direction", dir)),
            ),
        )
    };
    (b("received"), b("sent"))
}

fn minus(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 - b.0, a.1 - b.1)
}

/// Waits for the runtimes' own counts to stop moving (their stats files are written every
/// 50 ms), then gives the observer's procfs look (every 500 ms) time to pass.
fn quiesce(tb: &Testbed, runtimes: usize) {
    let snap = || {
        (0..runtimes)
            .map(|i| tb.runtime_stats(i)["fetches"].clone())
            .collect::<Vec<_>>()
    };
    let mut last = snap();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = snap();
        if now == last {
            break;
        }
        last = now;
    }
    tb.settled_truth();
    std::thread::sleep(Duration::from_millis(1200));
}

/// Time from `t0` until `f` holds on a scrape (polled every 20 ms), at most `secs`.
fn time_until(
    obs: &Observer,
    t0: Instant,
    secs: u64,
    what: &str,
    f: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> Duration {
    let deadline = t0 + Duration::from_secs(secs);
    loop {
        if let Ok(m) = obs.try_scrape() {
            if f(&m) {
                return t0.elapsed();
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            obs.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn processes_network_and_restarts() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Every fetch spins 3 ms of CPU in the runtime that serves it.
    let apps: Vec<App> = (1..=3)
        .map(|i| App {
            bundle_id: "v1;spin_ms=3".into(),
            ..App::new(&format!("spin-{i}"))
        })
        .collect();
    let opts = Options {
        apps: apps.clone(),
        // The proxy queries its runtimes and finds lost ones again every 200 ms.
        load_interval_ms: 200,
        ready_instance_expiration_ms: 60_000,
        // No instance is pooled: every request spawns one on a runtime drawn at random, so
        // both runtimes get about half of the load.
        dropout_rate: 1.0,
        ..Options::default()
    };
    let mut tb = Testbed::start(&opts);
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let rts: Vec<String> = tb.runtime_addrs.iter().map(|a| a.to_string()).collect();
    let proxy = "rusty-workers-proxy";
    time_until(&obs, Instant::now(), 10, "every process watched", |m| {
        get(m, &proc_series("up", "proxy", proxy, None)) == 1.0
            && rts
                .iter()
                .all(|r| get(m, &proc_series("up", "runtime", r, None)) == 1.0)
    });
    let paths = |tag: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("{}/{tag}{i}", apps[i % apps.len()].prefix))
            .collect()
    };

    // Phase 1: load; CPU follows each runtime's fetches, bytes equal its own counts.
    quiesce(&tb, 2);
    let truth0 = tb.truth();
    let m0 = obs.scrape();
    let own0: Vec<_> = (0..2)
        .map(|i| (tb.runtime_stats(i), runtime_bytes(&tb, i)))
        .collect();
    all_ok(&load(tb.http, &paths("a", 600), 4), 600);
    quiesce(&tb, 2);
    let m1 = obs.scrape();
    // terminate_worker returns a byte (its future is the first argument of its poll function,
    // unlike the others'): the runtimes together served what the proxy sent.
    let terminations = |m: &BTreeMap<String, f64>| -> f64 {
        rts.iter()
            .map(|rt| get(m, &format!("rusty_workers_runtime_server_call_duration_seconds_count{{method=\"terminate_worker\",runtime=\"{rt}\"}}")))
            .sum()
    };
    let sent = truth_u64(&tb.truth(), &["rpc_calls", "terminate_worker"])
        - truth_u64(&truth0, &["rpc_calls", "terminate_worker"]);
    assert_eq!(
        terminations(&m1) - terminations(&m0),
        sent as f64,
        "terminate_worker calls the runtimes served"
    );
    assert!(sent > 0);
    for (i, rt) in rts.iter().enumerate() {
        let fetches = tb.runtime_stats(i)["fetches"].as_f64().unwrap()
            - own0[i].0["fetches"].as_f64().unwrap();
        let cpu = |m: &BTreeMap<String, f64>| {
            ["user", "system"]
                .iter()
                .map(|mode| {
                    get(
                        m,
                        &proc_series("cpu_seconds_total", "runtime", rt, Some(("mode", mode))),
                    )
                })
                .sum::<f64>()
        };
        let used = cpu(&m1) - cpu(&m0);
        let spun = fetches * 0.003;
        eprintln!("e2e: runtime {rt}: {fetches} fetches, {spun:.2} s spun, CPU seen {used:.2} s");
        assert!(fetches > 50.0, "runtime {rt} served only {fetches} fetches");
        assert!(
            used >= spun * 0.9 && used <= spun * 1.5 + 0.3,
            "runtime {rt}: {used} s CPU for {fetches} fetches of 3 ms"
        );
        assert_bytes_agree(
            rt,
            minus(runtime_bytes(&tb, i), own0[i].1),
            minus(observed_bytes(&m1, rt), observed_bytes(&m0, rt)),
        );
        // The runtime probes: one call per fetch served, however often it was polled.
        let served = |m: &BTreeMap<String, f64>, what: &str| {
            get(
                m,
                &format!("rusty_workers_runtime_server_call_duration_seconds_{what}{{method=\"fetch\",runtime=\"{rt}\"}}"),
            )
        };
        let calls = served(&m1, "count") - served(&m0, "count");
        let secs = served(&m1, "sum") - served(&m0, "sum");
        eprintln!(
            "e2e: runtime {rt}: {calls} fetch calls seen in the runtime, {secs:.2} s in them"
        );
        assert_eq!(calls, fetches, "fetch calls the runtime probes saw in {rt}");
        assert!(secs >= spun, "{secs} s in {fetches} fetches of 3 ms CPU");
        for g in [
            "resident_memory_bytes",
            "threads",
            "open_fds",
            "start_time_seconds",
        ] {
            assert!(
                get(&m1, &proc_series(g, "runtime", rt, None)) > 0.0,
                "{g} of {rt}"
            );
        }
    }
    // The kernel splits a process's CPU time between user and system by where its clock ticks
    // fell (kernel/sched/cputime.c, cputime_adjust): a proxy that spends its time in socket
    // syscalls can show all of it as system. CI once saw user = 0.
    let proxy_cpu = ["user", "system"].map(|mode| {
        get(
            &m1,
            &proc_series("cpu_seconds_total", "proxy", proxy, Some(("mode", mode))),
        )
    });
    eprintln!(
        "e2e: proxy CPU since its start: user {:.2} s, system {:.2} s",
        proxy_cpu[0], proxy_cpu[1]
    );
    assert!(
        proxy_cpu[0] + proxy_cpu[1] > 0.0,
        "no CPU seen for the proxy:\n{}",
        m1.iter()
            .filter(|(k, _)| k.contains("role=\"proxy\""))
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(m1
        .keys()
        .any(|k| k.starts_with("rusty_workers_netns_network_bytes_total{device=\"lo\"")));

    // Phase 2: a runtime killed and started again at its address.
    let own_before = runtime_bytes(&tb, 0);
    let m_before = obs.scrape();
    let own_at_kill = runtime_bytes(&tb, 0);
    let t_kill = Instant::now();
    tb.kill_runtime(0);
    let exit_seen = time_until(&obs, t_kill, 2, "the runtime's exit", |m| {
        get(m, &proc_series("up", "runtime", &rts[0], None)) == 0.0
    });
    let t_start = Instant::now();
    tb.restart_runtime(0);
    let back = time_until(&obs, t_start, 2, "the runtime's return", |m| {
        get(m, &proc_series("starts_total", "runtime", &rts[0], None)) == 2.0
            && get(m, &proc_series("up", "runtime", &rts[0], None)) == 1.0
    });
    let at_back = observed_bytes(&obs.scrape(), &rts[0]);
    let first_bytes = time_until(&obs, t_start, 5, "the new runtime's first bytes", |m| {
        observed_bytes(m, &rts[0]).0 > at_back.0
    });
    eprintln!(
        "e2e: runtime restart timeline: killed at 0; exit seen +{:.3} s; restarted, re-attached +{:.3} s after the start; first bytes counted +{:.3} s (the proxy reconnects every 200 ms)",
        exit_seen.as_secs_f64(),
        back.as_secs_f64(),
        first_bytes.as_secs_f64()
    );
    all_ok(&load(tb.http, &paths("b", 600), 4), 600);
    quiesce(&tb, 2);
    let m2 = obs.scrape();
    assert_eq!(
        get(
            &m2,
            "rusty_workers_observer_reattaches_total{role=\"runtime\"}"
        ),
        1.0
    );
    // Counters never go backwards over the restart.
    for (k, v) in &m_before {
        if k.starts_with("rusty_workers_process_") && k.contains("_total{") {
            assert!(
                m2.get(k).is_some_and(|now| now >= v),
                "{k} went from {v} to {:?}",
                m2.get(k)
            );
        }
    }
    // The old process's bytes until its death (load queries, written to its stats file up to
    // 50 ms late), plus the new one's, as the runtimes counted them.
    let own_old = minus(own_at_kill, own_before);
    let own_new = runtime_bytes(&tb, 0);
    assert_bytes_agree(
        "restarted runtime",
        (own_old.0 + own_new.0, own_old.1 + own_new.1),
        minus(
            observed_bytes(&m2, &rts[0]),
            observed_bytes(&m_before, &rts[0]),
        ),
    );

    // Phase 3: the proxy killed and started again: detached, re-attached, counting again.
    let t_kill = Instant::now();
    tb.kill_proxy();
    let exit_seen = time_until(&obs, t_kill, 2, "the proxy's exit", |m| {
        m["rusty_workers_observer_target_up"] == 0.0
            && m.get("rusty_workers_observer_probe_attached{probe=\"runtime_rpc\",reason=\"target_down\"}") == Some(&0.0)
    });
    let t_start = Instant::now();
    tb.restart_proxy();
    let back = time_until(&obs, t_start, 2, "the proxy's re-attach", |m| {
        m["rusty_workers_observer_reattaches_total{role=\"proxy\"}"] == 1.0
            && SPINE_PROBES.iter().chain(REQUEST_PROBES).all(|p| {
                m.get(&format!(
                    "rusty_workers_observer_probe_attached{{probe=\"{p}\",reason=\"\"}}"
                )) == Some(&1.0)
            })
    });
    let t0 = tb.settled_truth();
    let m3 = obs.scrape();
    assert_eq!(
        m3["rusty_workers_apps_loaded"], 0.0,
        "the new proxy has loaded nothing yet"
    );
    let events = m3["rusty_workers_observer_events_total"];
    let t_load = Instant::now();
    let loader = {
        let (http, p) = (tb.http, paths("c", 600));
        std::thread::spawn(move || load(http, &p, 4))
    };
    let first_event = time_until(&obs, t_load, 5, "the first event from the new proxy", |m| {
        m["rusty_workers_observer_events_total"] > events
    });
    all_ok(&loader.join().unwrap(), 600);
    eprintln!(
        "e2e: proxy restart timeline: killed at 0; exit seen +{:.3} s; restarted, re-attached +{:.3} s after the start; first event +{:.3} s after load began",
        exit_seen.as_secs_f64(),
        back.as_secs_f64(),
        first_event.as_secs_f64()
    );
    let truth = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m4 = obs.scrape();
    // The new proxy's ground truth counts from its start; the observer's counters continue,
    // so their growth since the re-attach must equal it.
    for a in &apps {
        let t = &truth["apps"][a.id.as_str()];
        for (metric, field) in [
            ("app_loads_total", "loads"),
            ("app_instance_spawns_total", "spawns"),
            ("app_requests_total", "requests"),
        ] {
            let series = format!("rusty_workers_{metric}{{app=\"{}\"}}", a.id);
            let grew = get(&m4, &series) - get(&m3, &series);
            let want = t[field].as_u64().unwrap_or(0) as f64
                - truth_u64(&t0, &["apps", &a.id, field]) as f64;
            assert_eq!(
                grew,
                want,
                "{series} after the proxy's restart\n{}",
                observer_self(&m4)
            );
        }
        let series = format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id);
        assert_eq!(
            get(&m4, &series),
            t["instances_alive"].as_u64().unwrap() as f64,
            "{series}"
        );
    }
    assert_eq!(
        m4["rusty_workers_apps_loaded"],
        truth["apps_loaded"].as_u64().unwrap() as f64
    );
    assert_eq!(
        get(&m4, &proc_series("starts_total", "proxy", proxy, None)),
        2.0
    );
    obs.lint();
}

#[test]
fn a_target_in_its_own_mount_and_pid_namespace() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (1..=3).map(|i| App::new(&format!("ct-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        ready_instance_expiration_ms: 60_000,
        dropout_rate: 0.0,
        ..Options::default()
    };
    let tb = Testbed::start_contained(&opts);
    let pid = tb.proxy_pid();
    // What the host sees of it: a path that is not there, and another PID inside.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the proxy's exe link");
    assert!(
        !exe.exists(),
        "{} is visible on the host: not a private mount",
        exe.display()
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid: Vec<&str> = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid")
        .split_whitespace()
        .collect();
    assert_eq!(nspid.len(), 2, "in a PID namespace of its own: {nspid:?}");
    assert_ne!(nspid[1], pid.to_string());
    eprintln!(
        "e2e: contained proxy: host PID {pid}, PID {} inside, executable {} (not on the host)",
        nspid[1],
        exe.display()
    );

    let obs = Observer::start(pid, &tb.dir, false);
    let rts: Vec<String> = tb.runtime_addrs.iter().map(|a| a.to_string()).collect();
    time_until(&obs, Instant::now(), 10, "the contained runtimes", |m| {
        rts.iter()
            .all(|r| get(m, &proc_series("up", "runtime", r, None)) == 1.0)
            && m.get("rusty_workers_observer_probe_attached{probe=\"server_fetch\",reason=\"\"}")
                == Some(&1.0)
    });
    quiesce(&tb, 2);
    let m0 = obs.scrape();
    let own0: Vec<_> = (0..2).map(|i| runtime_bytes(&tb, i)).collect();
    let paths: Vec<String> = (0..300)
        .map(|i| format!("{}/c{i}", apps[i % apps.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 4), 300);
    quiesce(&tb, 2);
    let truth = tb.settled_truth();
    let m1 = obs.scrape();
    for a in &apps {
        let series = format!("rusty_workers_app_requests_total{{app=\"{}\"}}", a.id);
        assert_eq!(
            get(&m1, &series),
            truth_u64(&truth, &["apps", &a.id, "requests"]) as f64,
            "{series}\n{}",
            observer_self(&m1)
        );
    }
    let mut fetches = 0.0;
    for (i, rt) in rts.iter().enumerate() {
        assert_bytes_agree(
            &format!("contained {rt}"),
            minus(runtime_bytes(&tb, i), own0[i]),
            minus(observed_bytes(&m1, rt), observed_bytes(&m0, rt)),
        );
        fetches += get(
            &m1,
            &format!("rusty_workers_runtime_server_call_duration_seconds_count{{method=\"fetch\",runtime=\"{rt}\"}}"),
        );
    }
    assert_eq!(
        fetches,
        truth_u64(&truth, &["rpc_calls", "fetch"]) as f64,
        "fetches the contained runtimes served"
    );
    obs.lint();
}

// Faults (issue 7): the observer or the target killed mid-load, the scrape endpoint hammered,
// the ring buffer overrun.

fn app_paths(app: &App, tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{}/{tag}{i}", app.prefix)).collect()
}

#[test]
fn the_observer_killed_mid_load_leaves_nothing_behind_and_the_target_unharmed() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let app = App::new("plain");
    let tb = Testbed::start(&Options {
        apps: vec![app.clone()],
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let t0 = tb.settled_truth();
    let n = 3000;
    let loader = {
        let (http, p) = (tb.http, app_paths(&app, "k", n));
        std::thread::spawn(move || load(http, &p, 4))
    };
    wait_until("events from the load", 10, || {
        obs.try_scrape()
            .is_ok_and(|m| m["rusty_workers_observer_events_total"] > 100.0)
    });
    let (ours, gone) = obs.kill9();
    let statuses = loader.join().unwrap();
    eprintln!(
        "e2e: observer SIGKILLed mid-load with {} programs and {} links in the kernel; all gone {:.3} s later; the load: {statuses:?}",
        ours.programs.len(),
        ours.links.len(),
        gone.as_secs_f64()
    );
    // Every request of the load, before and after the kill, was served.
    all_ok(&statuses, n);
    let t1 = tb.settled_truth();
    assert_eq!(
        truth_u64(&t1, &["apps", "plain", "requests"])
            - truth_u64(&t0, &["apps", "plain", "requests"]),
        n as u64,
        "the proxy's own count of the requests it served"
    );
}

#[test]
fn the_proxy_killed_mid_load_is_marked_down_and_taken_up_again() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let app = App::new("plain");
    let mut tb = Testbed::start(&Options {
        apps: vec![app.clone()],
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let loader = {
        let (http, p) = (tb.http, app_paths(&app, "k", 100_000));
        std::thread::spawn(move || load(http, &p, 4))
    };
    wait_until("events from the load", 10, || {
        obs.try_scrape()
            .is_ok_and(|m| m["rusty_workers_observer_events_total"] > 100.0)
    });
    let t_kill = Instant::now();
    tb.kill_proxy();
    let proxy_up = proc_series("up", "proxy", "rusty-workers-proxy", None);
    let down = time_until(&obs, t_kill, 2, "the proxy marked down", |m| {
        m["rusty_workers_observer_target_up"] == 0.0 && m.get(&proxy_up) == Some(&0.0)
    });
    // While it is down the observer keeps serving.
    let mut scrapes = 0;
    while t_kill.elapsed() < Duration::from_secs(2) {
        let m = obs
            .try_scrape()
            .expect("the observer serves while its target is down");
        assert_eq!(m[&proxy_up], 0.0);
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let failed_load = loader.join().unwrap();
    let t_start = Instant::now();
    tb.restart_proxy();
    let back = time_until(&obs, t_start, 2, "the proxy taken up again", |m| {
        m["rusty_workers_observer_reattaches_total{role=\"proxy\"}"] == 1.0
            && m.get(&proxy_up) == Some(&1.0)
            && SPINE_PROBES.iter().chain(REQUEST_PROBES).all(|p| {
                m.get(&format!(
                    "rusty_workers_observer_probe_attached{{probe=\"{p}\",reason=\"\"}}"
                )) == Some(&1.0)
            })
    });
    eprintln!(
        "e2e: proxy SIGKILLed mid-load (the load: {failed_load:?}): marked down +{:.3} s, {scrapes} scrapes served while down, taken up again +{:.3} s after its restart",
        down.as_secs_f64(),
        back.as_secs_f64()
    );
    // Counting again, from the new process: its requests equal its own ground truth.
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    let n = 400;
    all_ok(&load(tb.http, &app_paths(&app, "again", n), 4), n);
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m1 = obs.scrape();
    let series = "rusty_workers_app_requests_total{app=\"plain\"}";
    assert_eq!(
        get(&m1, series) - get(&m0, series),
        (truth_u64(&t1, &["apps", "plain", "requests"])
            - truth_u64(&t0, &["apps", "plain", "requests"])) as f64,
        "{series} after the restart"
    );
    obs.lint();
}

#[test]
fn scrapes_hammered_while_events_flow() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (0..20).map(|i| App::new(&format!("app-{i}"))).collect();
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    warm_up(&tb, &obs, &apps);
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    let n_per_app = 150;
    let paths: Vec<String> = (0..n_per_app)
        .flat_map(|i| apps.iter().map(move |a| format!("{}/h{i}", a.prefix)))
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..8)
        .map(|_| {
            let (addr, done) = (obs.addr, done.clone());
            std::thread::spawn(move || {
                let mut times = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let (status, body) =
                        http_get(addr, "localhost", "/metrics").expect("a scrape under load");
                    assert_eq!(status, 200);
                    assert!(body.contains("rusty_workers_observer_events_total"));
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    let statuses = load(tb.http, &paths, 8);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut times: Vec<Duration> = scrapers
        .into_iter()
        .flat_map(|s| s.join().expect("a scraper failed"))
        .collect();
    times.sort();
    all_ok(&statuses, paths.len());
    eprintln!(
        "e2e: {} scrapes by 8 threads during {} requests: p50 {:.1} ms, max {:.1} ms",
        times.len(),
        paths.len(),
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    assert!(times.len() >= 50, "only {} scrapes", times.len());
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m1 = obs.scrape();
    assert_eq!(m1["rusty_workers_observer_events_lost_total"], 0.0);
    for a in &apps {
        for (metric, field) in [
            ("app_requests_total", "requests"),
            ("app_loads_total", "loads"),
        ] {
            let series = format!("rusty_workers_{metric}{{app=\"{}\"}}", a.id);
            let want =
                truth_u64(&t1, &["apps", &a.id, field]) - truth_u64(&t0, &["apps", &a.id, field]);
            assert_eq!(
                get(&m1, &series) - get(&m0, &series),
                want as f64,
                "{series}"
            );
        }
        let series = format!(
            "rusty_workers_app_responses_total{{app=\"{}\",outcome=\"ok\"}}",
            a.id
        );
        assert_eq!(
            get(&m1, &series) - get(&m0, &series),
            n_per_app as f64,
            "{series}"
        );
    }
    obs.lint();
}

#[test]
fn a_ring_buffer_overrun_is_counted_and_kernel_counts_stay_exact() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let app = App::new("plain");
    let tb = Testbed::start(&Options {
        apps: vec![app.clone()],
        ..Options::default()
    });
    // 64 KiB hold about 290 events; drained every second, a burst of requests overruns it.
    let obs = Observer::start_with(
        tb.proxy_pid(),
        &tb.dir,
        false,
        &["--ring-bytes", "65536", "--drain-interval-ms", "1000"],
    );
    let rts: Vec<String> = tb.runtime_addrs.iter().map(|a| a.to_string()).collect();
    wait_until("the runtimes watched", 10, || {
        obs.try_scrape().is_ok_and(|m| {
            rts.iter()
                .all(|r| m.get(&proc_series("up", "runtime", r, None)) == Some(&1.0))
        })
    });
    quiesce(&tb, rts.len());
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    let own0: Vec<(f64, f64)> = (0..rts.len()).map(|i| runtime_bytes(&tb, i)).collect();
    let n = 3000;
    all_ok(&load(tb.http, &app_paths(&app, "burst", n), 8), n);
    quiesce(&tb, rts.len());
    std::thread::sleep(Duration::from_millis(1200));
    let t1 = tb.settled_truth();
    let m1 = obs.scrape();
    let lost = get(&m1, "rusty_workers_observer_events_lost_total")
        - get(&m0, "rusty_workers_observer_events_lost_total");
    let received = get(&m1, "rusty_workers_observer_events_total")
        - get(&m0, "rusty_workers_observer_events_total");
    eprintln!("e2e: overrun: {received} events received, {lost} lost and counted");
    assert!(
        lost > 0.0,
        "a 64 KiB ring drained every second was not overrun"
    );
    // What the kernel counts itself is exact whatever the ring loses: RPCs by method, and
    // every process's socket bytes.
    for method in &method::NAMES[..method::UNKNOWN as usize] {
        let series = format!("rusty_workers_runtime_rpcs_total{{method=\"{method}\"}}");
        let want = truth_u64(&t1, &["rpc_calls", method]) - truth_u64(&t0, &["rpc_calls", method]);
        assert_eq!(
            get(&m1, &series) - get(&m0, &series),
            want as f64,
            "{series}"
        );
    }
    for (i, rt) in rts.iter().enumerate() {
        assert_bytes_agree(
            &format!("overrun, runtime {rt}"),
            minus(runtime_bytes(&tb, i), own0[i]),
            minus(observed_bytes(&m1, rt), observed_bytes(&m0, rt)),
        );
    }
    assert_eq!(m1["rusty_workers_observer_decode_errors_total"], 0.0);
    obs.lint();
}

// Hostile or odd data from the target (issue 7).

#[test]
fn hostile_app_ids_never_become_labels_and_are_counted_under_other() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let long = "x".repeat(5000);
    let cut_mid_char = "é".repeat(40);
    let hostile: Vec<(&str, &str)> = vec![
        ("quo\"te", "bad_char"),
        ("new\nline", "bad_char"),
        ("back\\slash", "bad_char"),
        ("app\"} 1\nrusty_workers_forged_total{a=\"", "bad_char"),
        ("sp ace", "bad_char"),
        ("ünïcödé", "bad_char"),
        (&long, "too_long"),
        // 80 bytes cut at 64 in the kernel (MAX_STR): too long before it could be half a char.
        (&cut_mid_char, "too_long"),
    ];
    let mut apps: Vec<App> = hostile
        .iter()
        .enumerate()
        .map(|(i, (id, _))| App {
            id: id.to_string(),
            bundle_id: "v1".into(),
            prefix: format!("/h{i}"),
        })
        .collect();
    apps.push(App::new("fine"));
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    for a in &apps {
        all_ok(&load(tb.http, &app_paths(a, "r", 20), 2), 20);
    }
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = http_get(obs.addr, "localhost", "/metrics").expect("scrape");
    let labels: std::collections::BTreeSet<&str> = body
        .split("app=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(
        labels.iter().all(|l| ["fine", "other", ""].contains(l)),
        "app labels {labels:?}: a hostile id reached the exposition"
    );
    assert!(
        !body.contains("forged"),
        "a forged series in the exposition"
    );
    let m1 = parse_metrics(&body);
    let grew = |series: &str| get(&m1, series) - get(&m0, series);
    // Every hostile app's loads, spawns and requests are counted, under app="other".
    for (metric, field) in [
        ("app_loads_total", "loads"),
        ("app_instance_spawns_total", "spawns"),
        ("app_requests_total", "requests"),
    ] {
        let want: u64 = hostile
            .iter()
            .map(|(id, _)| {
                truth_u64(&t1, &["apps", id, field]) - truth_u64(&t0, &["apps", id, field])
            })
            .sum();
        assert!(want > 0, "{metric}: the hostile apps did nothing");
        let series = format!("rusty_workers_{metric}{{app=\"other\"}}");
        assert_eq!(grew(&series), want as f64, "{series}");
        let fine = format!("rusty_workers_{metric}{{app=\"fine\"}}");
        let want =
            truth_u64(&t1, &["apps", "fine", field]) - truth_u64(&t0, &["apps", "fine", field]);
        assert_eq!(grew(&fine), want as f64, "{fine}");
    }
    for reason in ["bad_char", "too_long"] {
        let series = format!("rusty_workers_observer_label_refused_total{{reason=\"{reason}\"}}");
        assert!(grew(&series) > 0.0, "{series} did not grow");
    }
    eprintln!(
        "e2e: hostile app ids: refused bad_char {}, too_long {}; under app=\"other\": {} loads, {} requests",
        grew("rusty_workers_observer_label_refused_total{reason=\"bad_char\"}"),
        grew("rusty_workers_observer_label_refused_total{reason=\"too_long\"}"),
        grew("rusty_workers_app_loads_total{app=\"other\"}"),
        grew("rusty_workers_app_requests_total{app=\"other\"}"),
    );
    obs.lint();
}

/// About six minutes on these VMs: the test target cold-starts about 300 apps a second.
#[test]
fn a_hundred_thousand_app_ids_keep_the_label_cap_and_memory_bounded() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 100_000;
    let apps: Vec<App> = (0..n).map(|i| App::new(&format!("a{i:06}"))).collect();
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        // The proxy holds 1,000 apps; instances expire in a second: the target stays small
        // while every app passes through it.
        app_cache_size: 1000,
        ready_instance_expiration_ms: 1000,
        max_ready_instances_per_app: 1,
        dropout_rate: 0.0,
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let rss_start = rss_mib(obs.child.id());
    let t0 = Instant::now();
    let paths: Vec<String> = apps.iter().map(|a| format!("{}/once", a.prefix)).collect();
    let mut rss_each = Vec::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for chunk in paths.chunks(10_000) {
        for (status, count) in load(tb.http, chunk, 16) {
            *statuses.entry(status).or_default() += count;
        }
        rss_each.push(format!("{:.1}", rss_mib(obs.child.id())));
    }
    let took = t0.elapsed();
    let truth = tb.settled_truth();
    // Every request is answered 200, except those whose app the proxy lost before reading it
    // (502 "no route"): with a full app cache upstream's apps gc can make the app loaded last
    // the next one evicted (testbed `truth::Truth::apps_evicted_before_use`). Ground truth
    // counts each of them where it happens; the observer must count them as the proxy did.
    let lost = truth["apps_evicted_before_use"]
        .as_u64()
        .expect("ground truth counts apps evicted before use") as usize;
    let mut want_statuses = BTreeMap::from([(200, n - lost)]);
    if lost > 0 {
        want_statuses.insert(502, lost);
    }
    assert_eq!(
        statuses, want_statuses,
        "every request succeeds but those whose app the proxy evicted before use"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = http_get(obs.addr, "localhost", "/metrics").expect("scrape");
    let rss_end = rss_mib(obs.child.id());
    let m = parse_metrics(&body);
    let series = |metric: &str| -> Vec<f64> {
        m.iter()
            .filter(|(k, _)| k.starts_with(&format!("rusty_workers_{metric}{{app=")))
            .map(|(_, v)| *v)
            .collect()
    };
    let loads = series("app_loads_total");
    eprintln!(
        "e2e: {n} apps loaded once each in {:.0} s ({lost} requests found their app evicted before use): {} app label values, exposition {} KiB; observer RSS {rss_start:.1} MiB at start, after each 10,000 apps {}, {rss_end:.1} MiB at the end",
        took.as_secs_f64(),
        loads.len(),
        body.len() / 1024,
        rss_each.join(", ")
    );
    // The cap: 1,000 app labels (the default --max-apps) and "other".
    assert_eq!(loads.len(), 1001, "app label values");
    assert!(m["rusty_workers_observer_label_overflow_total"] > 0.0);
    // Nothing lost: summed over the labels, every load and request is there.
    let want = |field: &str| -> f64 {
        truth["apps"]
            .as_object()
            .unwrap()
            .values()
            .map(|a| a[field].as_u64().unwrap_or(0) as f64)
            .sum()
    };
    assert_eq!(loads.iter().sum::<f64>(), want("loads"), "loads summed");
    assert_eq!(
        series("app_requests_total").iter().sum::<f64>(),
        want("requests"),
        "requests summed"
    );
    let answered = |outcome: &str| -> (f64, f64) {
        let got = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with("rusty_workers_app_responses_total{")
                    && k.contains(&format!("outcome=\"{outcome}\""))
            })
            .map(|(_, v)| *v)
            .sum();
        let want = truth["apps"]
            .as_object()
            .unwrap()
            .values()
            .map(|a| a["outcomes"][outcome].as_u64().unwrap_or(0) as f64)
            .sum();
        (got, want)
    };
    // Responses: 16 clients from the first request on, so the observer answers for none of
    // the first few while it learns where the target keeps a request's key (those it counts
    // as unmatched, never under a wrong outcome); every other one is there, by its outcome.
    let mut short = 0.0;
    for outcome in ["ok", "no_route"] {
        let (got, want) = answered(outcome);
        assert!(
            got <= want,
            "responses with outcome {outcome} summed: observer {got} > ground truth {want}"
        );
        short += want - got;
    }
    // Every response head is either counted under its outcome or counted as unmatched.
    assert_eq!(m["rusty_workers_observer_events_lost_total"], 0.0);
    let unmatched = m["rusty_workers_observer_unmatched_responses_total"];
    eprintln!("e2e: responses the observer could not join while it learnt: {short}");
    assert_eq!(
        short, unmatched,
        "every response missing from the outcomes is counted as unmatched"
    );
    assert!(
        short < 100.0,
        "the observer learns within the first requests: {short} responses unmatched"
    );
    // Memory bounded: what the observer keeps per app id past the cap is nothing; it grows
    // with the live workers and the joins in flight, which the target bounds.
    assert!(
        rss_end < 80.0,
        "observer RSS {rss_end:.1} MiB after {n} app ids (at start {rss_start:.1} MiB)"
    );
    obs.lint();
}

/// The probes whose functions a build of the test target lacks (inlined away), as the
/// observer's own resolver finds them in the binary.
fn unresolved_probes(profile: &str) -> Vec<String> {
    let bin = testbed_harness::binary_of(profile, "rusty-workers-proxy");
    let table = observer::symbols::SymbolTable::from_elf_file(&bin)
        .unwrap_or_else(|e| panic!("reading the symbols of {}: {e:#}", bin.display()));
    let catalog = observer::catalog::Catalog::builtin_proxy();
    observer::resolve::resolve(&catalog, &table)
        .iter()
        .filter(|r| matches!(r.outcome, observer::resolve::Outcome::Unresolved(_)))
        .map(|r| r.probe.name.clone())
        .collect()
}

/// Whether a scrape has any sample of `family` (its `_bucket`, `_sum` and `_count` too).
fn has_family(m: &BTreeMap<String, f64>, family: &str) -> bool {
    let name = format!("rusty_workers_{family}");
    m.keys().any(|k| {
        k.strip_prefix(&name).is_some_and(|rest| {
            rest.is_empty()
                || rest.starts_with('{')
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| rest.starts_with(s))
        })
    })
}

/// The test target built with `profile` (harness `PROFILES`): the observer attaches what
/// resolves, withholds every family whose probe is missing (and says so), and every per-app
/// series it does export EQUALS ground truth.
fn a_release_profile_exports_only_exact_series(profile: &'static str) {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let missing = unresolved_probes(profile);
    let lost_to_probes: Vec<&str> =
        observer::coverage::unavailable(missing.iter().map(|p| (p.as_str(), "unresolved")))
            .into_iter()
            .map(|u| u.family)
            // Read from the proxy's memory instead (issue 14), whatever probes are missing.
            .filter(|f| !observer::coverage::FROM_SNAPSHOT.contains(f))
            .collect();
    let mut apps: Vec<App> = (1..=3)
        .map(|i| App::new(&format!("{profile}-{i}")))
        .collect();
    apps.push(App::slow(&format!("{profile}-slow"), 20));
    apps.push(App::failing(&format!("{profile}-throws"), "script"));
    let opts = Options {
        apps: apps.clone(),
        load_interval_ms: 0,
        max_request_body_size_bytes: 1024,
        profile,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);
    let obs = Observer::start_missing(tb.proxy_pid(), &tb.dir, false, &[], &missing);
    // A build whose request joins cannot be learnt has its request families withheld (below).
    let learnt = try_warm_up(&tb, &obs, &apps, Duration::from_secs(20));
    assert!(
        learnt || profile != testbed_harness::RELEASE,
        "rusty-workers' own profile must learn its joins:\n{}",
        obs.log_text()
    );
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();

    // Mixed load from 6 clients: cold and warm starts, a failing script, no route, a body too
    // large; then an app change (an eviction) and expiry (terminations).
    let mut reqs = Vec::new();
    for i in 0..300 {
        reqs.push(Request::get(&format!(
            "{}/r{i}",
            apps[i % apps.len()].prefix
        )));
        if i % 25 == 0 {
            reqs.push(Request::get(&format!("/no-such-app/x{i}")));
            reqs.push(Request {
                body: vec![b'x'; 4096],
                ..Request::get(&format!("{}/big{i}", apps[0].prefix))
            });
        }
    }
    load_requests(tb.http, &reqs, 6);
    let mut changed = apps.clone();
    changed[1].bundle_id = "v2".into();
    tb.set_apps(&changed);
    wait_until("the eviction of the changed app", 15, || {
        truth_u64(&tb.truth(), &["apps", &apps[1].id, "evictions"]) > 0
    });
    std::thread::sleep(Duration::from_millis(
        opts.ready_instance_expiration_ms + 500,
    ));
    let touch: Vec<Request> = apps
        .iter()
        .map(|a| Request::get(&format!("{}/t", a.prefix)))
        .collect();
    load_requests(tb.http, &touch, 1);
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m1 = obs.scrape();
    obs.lint();

    // What is withheld is absent, and said to be: every family a missing probe makes, and
    // those whose relation was not learnt.
    let marker = "rusty_workers_observer_metric_unavailable{metric=\"rusty_workers_";
    let lost: Vec<&str> = observer::coverage::NEEDS
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| m1.keys().any(|k| k.starts_with(&format!("{marker}{f}\","))))
        .collect();
    for family in &lost_to_probes {
        assert!(
            lost.contains(family),
            "{profile}: {family} is made from a missing probe ({missing:?}) but not withheld"
        );
    }
    if !learnt {
        assert!(
            lost.contains(&"app_request_duration_seconds"),
            "{profile}: the joins are not learnt but the request families are exported"
        );
    }
    for family in &lost {
        assert!(
            !has_family(&m1, family),
            "{profile}: {family} is exported although a probe it needs is missing ({missing:?})"
        );
    }
    // What is exported equals ground truth.
    let kept = |family: &str| !lost.contains(&family);
    let mut compared: Vec<(String, u64, u64)> = Vec::new();
    let mut compare = |series: String, got: u64, want: u64, app: &str| {
        // A zero is not written for every pair of labels, but a count is.
        assert!(
            want == 0 || m1.contains_key(&series),
            "{profile}: {series} is not exported, though nothing it needs is missing"
        );
        assert_eq!(
            got,
            want,
            "{profile}: {series}: observer {got}, ground truth {want}\n{}\n{}",
            t1["apps"][app],
            observer_self(&m1)
        );
        compared.push((series, got, want));
    };
    for a in &apps {
        for (metric, field) in APP_COUNTERS {
            let family = metric.split('{').next().unwrap();
            if !kept(family) {
                continue;
            }
            let series = format!("rusty_workers_{}", metric.replace("{}", &a.id));
            compare(
                series.clone(),
                delta(&m1, &m0, &series),
                truth_delta(&t1, &t0, &a.id, &[field]),
                &a.id,
            );
        }
        if kept("app_instances") {
            let series = format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id);
            let got = m1.get(&series).copied().unwrap_or(0.0) as u64;
            compare(
                series,
                got,
                truth_u64(&t1, &["apps", &a.id, "instances_alive"]),
                &a.id,
            );
        }
        let mut answered = 0;
        for o in observer::requests::OUTCOMES {
            answered += truth_delta(&t1, &t0, &a.id, &["outcomes", o]);
            if kept("app_responses_total") {
                let series = format!(
                    "rusty_workers_app_responses_total{{app=\"{}\",outcome=\"{o}\"}}",
                    a.id
                );
                let got = delta(&m1, &m0, &series);
                compare(
                    series,
                    got,
                    truth_delta(&t1, &t0, &a.id, &["outcomes", o]),
                    &a.id,
                );
            }
        }
        if kept("app_request_duration_seconds") {
            let series = format!(
                "rusty_workers_app_request_duration_seconds_count{{app=\"{}\"}}",
                a.id
            );
            compare(series.clone(), delta(&m1, &m0, &series), answered, &a.id);
        }
        if kept("app_request_starts_total") {
            for start in ["cold", "warm"] {
                let series = format!(
                    "rusty_workers_app_request_starts_total{{app=\"{}\",start=\"{start}\"}}",
                    a.id
                );
                let got = delta(&m1, &m0, &series);
                compare(series, got, truth_delta(&t1, &t0, &a.id, &[start]), &a.id);
            }
        }
    }
    if kept("apps_loaded") {
        let got = m1["rusty_workers_apps_loaded"] as u64;
        let want = truth_u64(&t1, &["apps_loaded"]);
        compare("rusty_workers_apps_loaded".into(), got, want, "");
    }
    for method in &method::NAMES[..method::UNKNOWN as usize] {
        let series = format!("rusty_workers_runtime_rpcs_total{{method=\"{method}\"}}");
        let want = truth_u64(&t1, &["rpc_calls", method]) - truth_u64(&t0, &["rpc_calls", method]);
        compare(series.clone(), delta(&m1, &m0, &series), want, "");
    }
    assert_eq!(
        m1["rusty_workers_observer_unattributed_requests_total"], 0.0,
        "{profile}: every fetch is tied to its app"
    );
    assert!(
        truth_u64(&t1, &["apps", &apps[1].id, "evictions"]) > 0
            && apps
                .iter()
                .map(|a| truth_delta(&t1, &t0, &a.id, &["terminations"]))
                .sum::<u64>()
                > 0,
        "{profile}: the scenario must evict and terminate: {t1}"
    );
    // Growth since the warm-up beside ground truth's, for the record (README's profile table).
    for (series, got, want) in &compared {
        eprintln!("e2e profile {profile}: {series} observer {got} ground truth {want}");
    }
    eprintln!(
        "e2e profile {profile}: probes unresolved {missing:?}; joins learnt: {learnt}; {} families withheld {lost:?}; {} series equal ground truth",
        lost.len(),
        compared.len()
    );
    obs.stop(15);
}

#[test]
fn the_release_profile_exports_only_exact_series() {
    a_release_profile_exports_only_exact_series("release");
}

#[test]
fn the_fat_lto_profile_exports_only_exact_series() {
    a_release_profile_exports_only_exact_series("release-fat-lto");
}

#[test]
fn the_size_profile_exports_only_exact_series() {
    a_release_profile_exports_only_exact_series("release-size");
}

// ---- The proxy's state read from its memory: attaching late ----------------------------

/// A series' value, or `None` when not exported.
fn opt(m: &BTreeMap<String, f64>, series: &str) -> Option<f64> {
    m.get(series).copied()
}

/// The ground truth of the scheduler's state (apps cached, each app's pool), for comparing
/// truths read before and after a scrape.
fn state_of(t: &Value, apps: &[App]) -> (u64, Vec<Option<u64>>, Vec<u64>) {
    (
        truth_u64(t, &["apps_cached"]),
        apps.iter()
            .map(|a| t["apps"][a.id.as_str()]["pooled"].as_u64())
            .collect(),
        apps.iter()
            .map(|a| truth_u64(t, &["apps", &a.id, "instances_alive"]))
            .collect(),
    )
}

/// Sums the series of a family whose labels include `app=""` (requests that never named an
/// app).
fn unnamed(m: &BTreeMap<String, f64>, family: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(family) && k.contains("app=\"\""))
        .map(|(_, v)| v)
        .sum()
}

/// Apps loaded, instances pooled by concurrent traffic and requests in flight, THEN the
/// observer attaches: its first scrape's apps_loaded and ready instances equal the proxy's own
/// (read under its locks, as the 2021 exporter read them), and every later per-app counter
/// grows exactly as ground truth's, with nothing of an app under `app=""`.
fn attached_late_the_state_is_exact(profile: &'static str) {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let missing = unresolved_probes(profile);
    let delay_ms = 8000;
    let mut apps: Vec<App> = (1..=5)
        .map(|i| App::new(&format!("late-{profile}-{i}")))
        .collect();
    apps.push(App::slow(&format!("late-{profile}-slow"), delay_ms));
    let slow = apps.len() - 1;
    let opts = Options {
        apps: apps.clone(),
        load_interval_ms: 0,
        // Pools stay as the traffic left them: nothing expires or drops out meanwhile.
        ready_instance_expiration_ms: 600_000,
        dropout_rate: 0.0,
        max_ready_instances_per_app: 8,
        profile,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);

    // Before the attach: 600 requests from 8 clients over the five fast apps.
    let fast = &apps[..slow];
    let paths: Vec<String> = (0..600)
        .map(|i| format!("{}/before{i}", fast[(i * 7 + i / 3) % fast.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 8), paths.len());
    // And three requests in flight on the slow app (its script holds each for 8 s).
    let http = tb.http;
    let slow_paths: Vec<String> = (0..3)
        .map(|i| format!("{}/inflight{i}", apps[slow].prefix))
        .collect();
    let inflight = std::thread::spawn(move || load(http, &slow_paths, 3));
    wait_until("three fetches in flight on the slow app", 10, || {
        truth_u64(&tb.truth(), &["apps", &apps[slow].id, "requests"]) == 3
    });

    // THEN the attach, and its first scrape, between two readings of ground truth.
    let before = tb.truth();
    let obs = Observer::start_missing(tb.proxy_pid(), &tb.dir, false, &[], &missing);
    let first = obs.scrape();
    let after = tb.truth();
    assert!(
        !inflight.is_finished(),
        "the slow requests must still be in flight at the first scrape (the attach took too long)"
    );
    let (cached, pooled, alive) = state_of(&after, &apps);
    assert_eq!(
        state_of(&before, &apps),
        (cached, pooled.clone(), alive.clone()),
        "the proxy's state is still while the observer attaches and scrapes"
    );
    let mut table = vec![format!(
        "first scrape ({profile}): apps_loaded {:?}, ground truth apps.len() {cached}",
        opt(&first, "rusty_workers_apps_loaded")
    )];
    assert_eq!(
        opt(&first, "rusty_workers_apps_loaded"),
        Some(cached as f64),
        "apps_loaded at the first scrape\n{}",
        observer_self(&first)
    );
    assert_eq!(cached, apps.len() as u64, "every app is in the app cache");
    let instances_exported = has_family(&first, "app_instances");
    for (i, a) in apps.iter().enumerate() {
        let ready = opt(
            &first,
            &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id),
        );
        let held = opt(
            &first,
            &format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id),
        );
        table.push(format!(
            "  {}: ready_instances {ready:?} (truth pooled {:?}), instances {held:?} (truth alive {})",
            a.id, pooled[i], alive[i]
        ));
        assert_eq!(
            ready,
            pooled[i].map(|p| p as f64),
            "{}: ready instances\n{}",
            a.id,
            observer_self(&first)
        );
        if instances_exported {
            // The instances held by the requests in flight at the attach are in no pool: they
            // are counted when they come back to it (below).
            let in_use = if i == slow { 3 } else { 0 };
            assert_eq!(
                held,
                Some((alive[i] - in_use) as f64),
                "{}: instances",
                a.id
            );
        }
    }
    assert!(
        pooled[..slow].iter().all(|p| p.unwrap_or(0) > 0),
        "pools filled: {pooled:?}"
    );
    // The pools by runtime, by its RuntimeId.
    let by_runtime = after["pooled_by_runtime"]
        .as_object()
        .expect("pooled by runtime");
    for (rt, n) in by_runtime {
        let series = format!("rusty_workers_runtime_ready_instances{{runtime_id=\"{rt}\"}}");
        assert_eq!(opt(&first, &series), n.as_f64(), "{series}");
    }
    let first_lines = table.len() + by_runtime.len();
    for (rt, n) in by_runtime {
        let series = format!("rusty_workers_runtime_ready_instances{{runtime_id=\"{rt}\"}}");
        table.push(format!(
            "  {series}: {:?} (truth {n})",
            opt(&first, &series)
        ));
    }
    eprintln!("{}", table.join("\n"));

    // The requests in flight end; their instances go back to the pool and are adopted.
    all_ok(&inflight.join().expect("in-flight requests"), 3);
    let t0 = tb.settled_truth();
    wait_until("the slow app's instances back in a snapshot", 5, || {
        opt(
            &obs.scrape(),
            &format!(
                "rusty_workers_app_ready_instances{{app=\"{}\"}}",
                apps[slow].id
            ),
        ) == Some(3.0)
    });
    let m0 = obs.scrape();

    // N more requests over every app (the slow one's three concurrently, the rest from 8
    // clients, then 16 at once on one app: cold starts past its pool), after one app changed
    // (the proxy evicts it, the next request loads it again): every per-app counter grows as
    // ground truth's.
    let mut changed = apps.clone();
    changed[0].bundle_id = "v2".into();
    tb.set_apps(&changed);
    wait_until("the changed app's eviction", 15, || {
        truth_u64(&tb.truth(), &["apps", &apps[0].id, "evictions"]) == 1
    });
    let http = tb.http;
    let slow_paths: Vec<String> = (0..3)
        .map(|i| format!("{}/after{i}", apps[slow].prefix))
        .collect();
    let slow_load = std::thread::spawn(move || load(http, &slow_paths, 3));
    let paths: Vec<String> = (0..500)
        .map(|i| format!("{}/after{i}", fast[(i * 3 + i / 5) % fast.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 8), paths.len());
    let burst: Vec<String> = (0..64)
        .map(|i| format!("{}/burst{i}", fast[1].prefix))
        .collect();
    all_ok(&load(tb.http, &burst, 16), burst.len());
    all_ok(&slow_load.join().expect("slow requests"), 3);
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(1200));
    let m1 = obs.scrape();
    let mut compared = 0;
    for a in &apps {
        for (metric, field) in APP_COUNTERS {
            let series = format!("rusty_workers_{}", metric.replace("{}", &a.id));
            let family = metric.split('{').next().unwrap();
            if !has_family(&m1, family) {
                assert!(
                    !missing.is_empty(),
                    "{family} is withheld on the release build\n{}",
                    observer_self(&m1)
                );
                continue;
            }
            let got = delta(&m1, &m0, &series);
            let want = truth_delta(&t1, &t0, &a.id, &[field]);
            assert_eq!(
                got,
                want,
                "{series} grew by {got}, ground truth by {want}\n{}",
                observer_self(&m1)
            );
            if want > 0 {
                table.push(format!("  {series}: +{got} (ground truth +{want})"));
            }
            compared += 1;
        }
        let (cached, pooled, alive) = state_of(&t1, std::slice::from_ref(a));
        assert_eq!(cached, apps.len() as u64);
        assert_eq!(
            opt(
                &m1,
                &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id)
            ),
            pooled[0].map(|p| p as f64),
            "{}: ready instances after the requests",
            a.id
        );
        if instances_exported {
            assert_eq!(
                opt(
                    &m1,
                    &format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id)
                ),
                Some(alive[0] as f64),
                "{}: instances after the requests\n{}",
                a.id,
                observer_self(&m1)
            );
        }
    }
    for family in [
        "rusty_workers_app_responses_total",
        "rusty_workers_app_request_duration_seconds_count",
        "rusty_workers_app_requests_total",
    ] {
        let grew = unnamed(&m1, family) - unnamed(&m0, family);
        assert_eq!(
            grew, 0.0,
            "{family}{{app=\"\"}} grew by {grew}: a request of an app went unnamed"
        );
    }
    assert_eq!(
        delta(
            &m1,
            &m0,
            "rusty_workers_observer_unattributed_requests_total"
        ),
        0,
        "every request attributed\n{}",
        observer_self(&m1)
    );
    eprintln!("{}", table[first_lines..].join("\n"));
    let adopted = opt(
        &m1,
        "rusty_workers_observer_state_corrections_total{kind=\"instance_adopted\"}",
    );
    eprintln!(
        "attach late ({profile}): {compared} per-app counters grew as ground truth's over {} requests; snapshot: {:?} s, {:?} bytes, {adopted:?} instances adopted",
        truth_u64(&t1, &["rpc_calls", "fetch"]) - truth_u64(&t0, &["rpc_calls", "fetch"]),
        opt(&m1, "rusty_workers_observer_state_snapshot_duration_seconds"),
        opt(&m1, "rusty_workers_observer_state_snapshot_bytes"),
    );
    assert!(compared > 0, "some counters compared");
    obs.lint();
}

#[test]
fn attached_late_the_state_is_exact_from_the_first_scrape() {
    attached_late_the_state_is_exact(testbed_harness::RELEASE);
}

#[test]
fn attached_late_to_the_fat_lto_build_the_state_is_exact() {
    attached_late_the_state_is_exact("release-fat-lto");
}

/// Snapshots every 50 ms race 16 clients and apps changing under them (each change evicts an
/// app and loads it again): no scrape ever shows an impossible state (more apps than exist, a
/// pool larger than the app's spawns), failed walks are counted, and once the load stops the
/// gauges equal the proxy's own state again.
#[test]
fn snapshots_racing_heavy_load_and_app_changes_never_export_a_wrong_state() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (1..=8).map(|i| App::new(&format!("race-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        load_interval_ms: 0,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);
    let obs = Observer::start_with(
        tb.proxy_pid(),
        &tb.dir,
        true,
        &["--state-interval-ms", "50"],
    );
    let http = tb.http;
    let paths: Vec<String> = (0..6000)
        .map(|i| format!("{}/race{i}", apps[(i * 5 + i / 7) % apps.len()].prefix))
        .collect();
    let loader = std::thread::spawn(move || load(http, &paths, 16));
    let mut changed = apps.clone();
    let mut scrapes = 0;
    let mut changes = 0;
    while !loader.is_finished() {
        if scrapes % 5 == 0 {
            let i = changes % changed.len();
            changed[i].bundle_id = format!("v{}", changes + 2);
            tb.set_apps(&changed);
            changes += 1;
        }
        let m = obs.scrape();
        let t = tb.truth();
        scrapes += 1;
        if let Some(n) = opt(&m, "rusty_workers_apps_loaded") {
            assert!(n <= apps.len() as f64, "{n} apps loaded of {}", apps.len());
        }
        for a in &apps {
            let ready = opt(
                &m,
                &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id),
            );
            let spawns = truth_u64(&t, &["apps", &a.id, "spawns"]) as f64;
            assert!(
                ready.unwrap_or(0.0) <= spawns,
                "{}: {ready:?} ready instances, {spawns} ever spawned",
                a.id
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let statuses = loader.join().expect("load");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 5000,
        "{statuses:?}"
    );
    // Quiet now (the proxy's gc evicts an app changed after its last request within a cycle
    // over the cached apps, about a second): the state read equals the proxy's own.
    std::thread::sleep(Duration::from_millis(2500));
    let t = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m = obs.scrape();
    let after = tb.truth();
    let (cached, pooled, _) = state_of(&after, &apps);
    assert_eq!(state_of(&t, &apps).1, pooled, "the pools are still");
    assert_eq!(
        opt(&m, "rusty_workers_apps_loaded"),
        Some(cached as f64),
        "apps loaded"
    );
    for (i, a) in apps.iter().enumerate() {
        assert_eq!(
            opt(
                &m,
                &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id)
            ),
            pooled[i].map(|p| p as f64),
            "{}: ready instances\n{}",
            a.id,
            observer_self(&m)
        );
    }
    let failed: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_observer_state_snapshot_failures_total"))
        .map(|(_, v)| v)
        .sum();
    let good = m["rusty_workers_observer_state_snapshots_total"];
    eprintln!(
        "racing snapshots: {scrapes} scrapes during the load, {changes} app changes, {good} good snapshots, {failed} failed walks (retried or counted)"
    );
    assert!(good > scrapes as f64, "snapshots kept being taken: {good}");
}
