//! What every end-to-end test shares: the observer as a child process (`Observer`), the
//! kernel objects and breakpoints it must leave behind, the comparisons with ground truth.

use observer_common::method;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testbed_harness::{
    free_port, http_get, joins_learnt, load_requests, lost_instances, parse_metrics, truth_u64,
    App, Request, Testbed, APP_COUNTERS,
};

/// Probes without request metrics (`--no-request-metrics`), and those request metrics add.
pub(crate) const BASE_PROBES: &[&str] = &[
    "app_cache_insert",
    "app_cache_remove",
    "runtime_rpc",
    "net_send",
    "net_recv",
];
pub(crate) const REQUEST_PROBES: &[&str] = &["http_request", "sched_error", "net_close"];

pub(crate) fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc_geteuid() },
        0,
        "the end-to-end tests load eBPF programs: run them as root (CI does)"
    );
}

extern "C" {
    #[link_name = "geteuid"]
    pub(crate) fn libc_geteuid() -> u32;
}

pub(crate) struct Observer {
    pub(crate) child: Child,
    /// The proxy it was started on.
    pub(crate) target: u32,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) log: std::path::PathBuf,
    pub(crate) stopped: bool,
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
    pub(crate) fn start(pid: u32, dir: &std::path::Path, no_request_metrics: bool) -> Observer {
        Observer::start_with(pid, dir, no_request_metrics, &[])
    }

    /// As `start`, with more command line options.
    pub(crate) fn start_with(
        pid: u32,
        dir: &std::path::Path,
        no_request_metrics: bool,
        extra: &[&str],
    ) -> Observer {
        Observer::start_missing(pid, dir, no_request_metrics, extra, &[])
    }

    /// As `start_with`, on a build that lacks the functions of the probes `missing`: those
    /// must be reported `unresolved`, every other one attached.
    pub(crate) fn start_missing(
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
                let attached = BASE_PROBES.iter().chain(extra).all(|p| {
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

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn try_scrape(&self) -> std::io::Result<BTreeMap<String, f64>> {
        let (status, body) = http_get(self.addr, "localhost", "/metrics")?;
        if status != 200 {
            return Err(std::io::Error::other(format!("status {status}")));
        }
        Ok(parse_metrics(&body))
    }

    /// The exposition must pass `promtool check metrics` (Prometheus' own linter), when installed.
    pub(crate) fn lint(&self) {
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

    pub(crate) fn scrape(&self) -> BTreeMap<String, f64> {
        self.try_scrape().expect("scraping the observer")
    }

    /// The uprobe breakpoints in the proxy's code now: there must be some (else the check after
    /// the observer's exit could not fail).
    pub(crate) fn breakpoints_while_attached(&self) -> usize {
        let sites = breakpoints_in(self.target);
        assert!(
            sites > 0,
            "no uprobe breakpoint in the proxy's code while attached"
        );
        sites
    }

    /// SIGINT (an operator's Ctrl-C, 2) or SIGTERM (systemd, 15): must detach and exit 0.
    pub(crate) fn stop(mut self, signal: i32) -> String {
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
    pub(crate) fn kill9(mut self) -> (KernelObjects, Duration) {
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
pub(crate) struct KernelObjects {
    pub(crate) programs: Vec<u64>,
    pub(crate) links: Vec<u64>,
}

pub(crate) const OUR_PROGRAMS: &[&str] = &[
    "rpc_call",
    "lru_insert",
    "lru_remove",
    "http_request",
    "sched_error",
    "sock_recv",
    "sock_send",
    "sock_close",
    "server_poll",
    "server_poll_sret",
    "server_drop",
];

pub(crate) fn bpftool_json(what: &str) -> Vec<Value> {
    bpftool(&[what, "show"])
}

/// `bpftool -j <args>`, whose answer must be a JSON list.
fn bpftool(args: &[&str]) -> Vec<Value> {
    let what = args.join(" ");
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (scripts/bootstrap.sh installs it)");
    assert!(
        out.status.success(),
        "bpftool {what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool {what} printed no JSON list ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The connections the observer's socket programs keep (`CONNS`, observer-ebpf/src/wire.rs),
/// counted by state: 1 followed (tarpc's), 2 not tarpc's, 3 a client's (HTTP). Read through
/// bpftool: the map has no BTF, so the value is bytes, its state the first word.
pub(crate) fn connections_by_state() -> BTreeMap<u32, usize> {
    let entries = bpftool(&["map", "dump", "name", "CONNS"]);
    let mut by_state = BTreeMap::new();
    for e in &entries {
        let byte = |i: usize| -> u32 {
            let b = e["value"][i]
                .as_str()
                .unwrap_or_else(|| panic!("CONNS entry without a byte value: {e}"));
            u32::from_str_radix(b.trim_start_matches("0x"), 16)
                .unwrap_or_else(|err| panic!("CONNS value byte {b:?}: {err}"))
        };
        let state = byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24;
        *by_state.entry(state).or_insert(0) += 1;
    }
    by_state
}

pub(crate) fn ours_in_kernel() -> KernelObjects {
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
pub(crate) fn assert_nothing_left(before: &KernelObjects) -> Duration {
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
pub(crate) fn breakpoints_in(pid: u32) -> usize {
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
pub(crate) fn assert_no_breakpoint_left(pid: u32, had: usize) {
    let left = breakpoints_in(pid);
    assert_eq!(
        left, 0,
        "{left} of the {had} uprobe breakpoints are still in the proxy's code after the observer's exit"
    );
}

extern "C" {
    #[link_name = "kill"]
    pub(crate) fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub(crate) fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// e2e tests attach eBPF programs and check that none is left after: one at a time.
pub(crate) static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A scrape whose state snapshot was taken after `settled` (ground truth's settle point):
/// the snapshot is read every 500 ms, and a walk torn by the proxy's churn keeps the previous
/// good one as the latest, which a scrape a few hundred ms after the load can still show (a
/// suite run once read 0 apps loaded, the attach's snapshot, in a 4-second test).
pub(crate) fn scrape_after_snapshot(
    obs: &Observer,
    settled: std::time::Instant,
) -> BTreeMap<String, f64> {
    let deadline = settled + Duration::from_secs(10);
    loop {
        let m = obs.scrape();
        let age = m
            .get("rusty_workers_observer_state_snapshot_age_seconds")
            .copied();
        if age.is_some_and(|a| a < settled.elapsed().as_secs_f64()) {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot of the proxy's state newer than the settle point in 10 s (age {age:?}):\n{}",
            obs.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every per-app metric and every RPC counter must equal the ground truth; returns the number
/// of series compared.
pub(crate) fn assert_metrics_equal_truth(
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
        "apps loaded\n{}",
        m.iter()
            .filter(|(k, _)| k.starts_with("rusty_workers_observer_state")
                || k.starts_with("rusty_workers_state"))
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect::<String>()
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

/// The request-path budget: BPF program runs per proxied request, counted by the programs
/// over everything the scenario did.
/// Uprobe program runs in the proxy per request (the socket tracepoints, which run on every
/// socket read and write of the host, and the runtime probes are left out).
pub(crate) fn bpf_runs_per_request(m: &BTreeMap<String, f64>, truth: &Value) -> f64 {
    let runs: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_observer_bpf_program_runs_total"))
        .filter(|(k, _)| !k.contains("program=\"sock_") && !k.contains("program=\"server_"))
        .map(|(_, v)| v)
        .sum();
    let requests = truth_u64(truth, &["rpc_calls", "fetch"]) as f64;
    assert!(
        runs > 0.0,
        "the programs count their runs: {}",
        observer_self(m)
    );
    runs / requests
}

pub(crate) fn all_ok(statuses: &BTreeMap<u16, usize>, n: usize) {
    assert_eq!(
        statuses.get(&200),
        Some(&n),
        "all requests succeed: {statuses:?}"
    );
}

pub(crate) fn observer_self(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_observer_") && !k.contains("collector"))
        .map(|(k, v)| format!("{k} {v}\n"))
        .collect()
}

/// A counter's value in `after` minus `before` (0 for a series absent from both).
pub(crate) fn delta(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
    series: &str,
) -> u64 {
    let a = after.get(series).copied().unwrap_or(0.0);
    let b = before.get(series).copied().unwrap_or(0.0);
    (a - b).round() as u64
}

/// Per app, per outcome / start: what the truth counted between two snapshots.
pub(crate) fn truth_delta(after: &Value, before: &Value, app: &str, path: &[&str]) -> u64 {
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
pub(crate) fn bucket_of_quantile(
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

pub(crate) fn bucket_of(seconds: f64) -> usize {
    let bounds = observer::expo::LATENCY_BUCKETS;
    bounds
        .iter()
        .position(|b| seconds <= *b)
        .unwrap_or(bounds.len())
}

pub(crate) fn client_quantile(mut lat: Vec<Duration>, q: f64) -> f64 {
    lat.sort();
    let rank = ((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
    lat[rank - 1].as_secs_f64()
}

/// Until every relation the joins need is learnt (the first requests after attach teach it).
pub(crate) fn warm_up(tb: &Testbed, obs: &Observer, apps: &[App]) {
    if !try_warm_up(tb, obs, apps, Duration::from_secs(60)) {
        panic!(
            "the observer did not learn its joins:\n{}\n{}",
            observer_self(&obs.scrape()),
            obs.log_text()
        );
    }
}

/// As `warm_up`, for at most `wait`: whether the joins were learnt.
pub(crate) fn try_warm_up(tb: &Testbed, obs: &Observer, apps: &[App], wait: Duration) -> bool {
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

pub(crate) fn app_paths(app: &App, tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{}/{tag}{i}", app.prefix)).collect()
}
/// Whether a scrape has any sample of `family` (its `_bucket`, `_sum` and `_count` too).
pub(crate) fn has_family(m: &BTreeMap<String, f64>, family: &str) -> bool {
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

// Process and network figures (the processes and faults tests).

/// A process series of the observer: `rusty_workers_process_<name>{<labels>,role,instance}`
/// with the labels in the exposition's (sorted) order.
pub(crate) fn proc_series(
    name: &str,
    role: &str,
    instance: &str,
    extra: Option<(&str, &str)>,
) -> String {
    let mut labels = vec![("process", instance), ("role", role)];
    if let Some(kv) = extra {
        labels.push(kv);
    }
    labels.sort();
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("rusty_workers_process_{name}{{{}}}", l.join(","))
}

pub(crate) fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// The runtime's own byte counts (its RPC connections) and the observer's, both as deltas
/// over a phase, must agree within 1%.
pub(crate) fn assert_bytes_agree(what: &str, own: (f64, f64), seen: (f64, f64)) {
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

pub(crate) fn runtime_bytes(tb: &Testbed, i: usize) -> (f64, f64) {
    let s = tb.runtime_stats(i);
    (
        s["bytes_read"].as_f64().unwrap_or(0.0),
        s["bytes_written"].as_f64().unwrap_or(0.0),
    )
}

pub(crate) fn observed_bytes(m: &BTreeMap<String, f64>, instance: &str) -> (f64, f64) {
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

pub(crate) fn minus(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 - b.0, a.1 - b.1)
}

/// Waits for the runtimes' own counts to stop moving (their stats files are written every
/// 50 ms), then gives the observer's procfs look (every 500 ms) time to pass.
pub(crate) fn quiesce(tb: &Testbed, runtimes: usize) {
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
pub(crate) fn time_until(
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

/// The probes whose functions a build of the test target lacks (inlined away), as the
/// observer's own resolver finds them in the binary.
pub(crate) fn unresolved_probes(profile: &str) -> Vec<String> {
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
