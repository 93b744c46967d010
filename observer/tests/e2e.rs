//! End to end, for real: the test target runs, the observer attaches its uprobes to the test
//! proxy, load flows, and every metric must EQUAL the proxy's own ground truth.
//!
//! Needs root (eBPF) and the release build of the test target (`cargo xtask test`).

use observer_common::method;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testbed_harness::{free_port, http_get, load, parse_metrics, App, Options, Testbed};

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
    fn start(pid: u32, dir: &std::path::Path) -> Observer {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("observer.log");
        let child = Command::new(env!("CARGO_BIN_EXE_observer"))
            .args(["--pid", &pid.to_string(), "--listen", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the observer");
        let o = Observer {
            child,
            addr,
            log,
            stopped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(m) = o.try_scrape() {
                let attached = ["app_cache_insert", "app_cache_remove", "runtime_rpc"]
                    .iter()
                    .all(|p| {
                        m.get(&format!(
                            "rusty_workers_observer_probe_attached{{probe=\"{p}\",reason=\"\"}}"
                        )) == Some(&1.0)
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

    /// SIGINT (an operator's Ctrl-C, 2) or SIGTERM (systemd, 15): must detach and exit 0.
    fn stop(mut self, signal: i32) -> String {
        self.stopped = true;
        // SAFETY: kill(2) on our own child.
        unsafe { libc_kill(self.child.id() as i32, signal) };
        let status = self.child.wait().expect("observer exit");
        let log = self.log_text();
        assert!(status.success(), "observer exited with {status}:\n{log}");
        assert!(log.contains("detached"), "no detach message:\n{log}");
        // Nothing stays in the kernel: no program of ours (the kernel frees them shortly after
        // their last file descriptor closes), no uprobe.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let Ok(out) = Command::new("bpftool").args(["prog", "show"]).output() else {
                break;
            };
            let progs = String::from_utf8_lossy(&out.stdout).to_string();
            let left: Vec<&str> = ["rpc_call", "lru_insert", "lru_remove"]
                .into_iter()
                .filter(|n| progs.contains(&format!("name {n} ")))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{left:?} still loaded 5 s after exit:\n{progs}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let events =
            std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
        assert!(
            !events.contains("rusty-workers"),
            "uprobe left behind: {events}"
        );
        log
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn truth_u64(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64().unwrap_or(0)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the proxy's terminate queue has drained (ground truth stops moving).
fn settle(tb: &Testbed) -> Value {
    let mut last = tb.truth();
    loop {
        std::thread::sleep(Duration::from_millis(400));
        let now = tb.truth();
        if now == last {
            return now;
        }
        last = now;
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
        for (metric, field) in [
            ("app_loads_total{app=\"{}\"}", "loads"),
            (
                "app_evictions_total{app=\"{}\",reason=\"changed\"}",
                "evictions",
            ),
            (
                "app_evictions_total{app=\"{}\",reason=\"capacity\"}",
                "capacity_evictions",
            ),
            ("app_instance_spawns_total{app=\"{}\"}", "spawns"),
            (
                "app_instance_terminations_total{app=\"{}\"}",
                "terminations",
            ),
            ("app_instances_dropped_total{app=\"{}\"}", "dropped"),
            ("app_requests_total{app=\"{}\"}", "requests"),
            ("app_instances{app=\"{}\"}", "instances_alive"),
        ] {
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
fn bpf_runs_per_request(m: &BTreeMap<String, f64>, truth: &Value) -> f64 {
    let runs: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_observer_bpf_program_runs_total"))
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
    let obs = Observer::start(tb.proxy_pid(), &tb.dir);
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
    let truth = settle(&tb);
    std::thread::sleep(Duration::from_millis(300));
    let m = obs.scrape();

    let checked = assert_metrics_equal_truth(&m, &truth, &t0, &apps);
    obs.lint();
    // At most 2 runs per request in steady state: the fetch is one; spawns, terminations and
    // loads are the rest.
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
    let obs = Observer::start(tb.proxy_pid(), &tb.dir);
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
    let truth = settle(&tb);
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
