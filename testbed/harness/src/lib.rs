//! Runs the project's test target: runtime processes and a proxy on loopback ports, apps from
//! a file, HTTP load from threads, and the proxy's own ground truth. Used by the end-to-end
//! tests and by `cargo xtask demo`.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where cargo put the release binaries of the workspace.
pub fn release_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TESTBED_BIN_DIR") {
        return PathBuf::from(d);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release")
}

pub fn binary(name: &str) -> PathBuf {
    binary_of(RELEASE, name)
}

/// The cargo profile of rusty-workers' own release build (thin LTO).
pub const RELEASE: &str = "release";

/// The release profiles the test target is built and tested under (the workspace Cargo.toml):
/// rusty-workers' own, fat LTO in one codegen unit, and optimised for size.
pub const PROFILES: &[&str] = &[RELEASE, "release-fat-lto", "release-size"];

/// Where cargo put the binaries of `profile`.
pub fn profile_dir(profile: &str) -> PathBuf {
    if profile == RELEASE {
        return release_dir();
    }
    release_dir().with_file_name(profile)
}

/// A test target binary built with `profile`.
pub fn binary_of(profile: &str, name: &str) -> PathBuf {
    let p = profile_dir(profile).join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the test target with `cargo build --profile {profile} -p testbed-proxy -p testbed-runtime` first (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// A free loopback port (bound, read, released), below Linux's ephemeral range (32768-60999 by
/// default, net.ipv4.ip_local_port_range): a port the kernel hands out to the tests' own client
/// connections could be taken again before the server that is given it binds it (seen under
/// the bench's load: "binding admin ...: address in use").
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread over the range by PID, so that test binaries running one after another (or a
    // demo beside them) do not walk the same ports.
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % 12_000) as u16,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..12_000 {
        let port = 20_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999")
}

#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    pub bundle_id: String,
    /// Path prefix routed to this app on host `localhost`.
    pub prefix: String,
}

impl App {
    pub fn new(id: &str) -> Self {
        App {
            id: id.into(),
            bundle_id: "v1".into(),
            prefix: format!("/{id}"),
        }
    }

    /// An app whose script (its bundle) waits `delay_ms` on every request.
    pub fn slow(id: &str, delay_ms: u64) -> Self {
        App {
            bundle_id: format!("v1;delay_ms={delay_ms}"),
            ..App::new(id)
        }
    }

    /// An app whose script fails every request with `kind` (the runtime's `x-fail` kinds:
    /// no_such_worker, runtime_throws, time_limit, memory_limit, io_timeout; anything else
    /// throws a script exception).
    pub fn failing(id: &str, kind: &str) -> Self {
        App {
            bundle_id: format!("v1;fail={kind}"),
            ..App::new(id)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub runtimes: usize,
    pub apps: Vec<App>,
    pub max_ready_instances_per_app: usize,
    pub ready_instance_expiration_ms: u64,
    pub dropout_rate: f32,
    pub app_cache_size: usize,
    /// 0: the proxy never sends `load` RPCs.
    pub load_interval_ms: u64,
    /// Larger request bodies are refused with RequestBodyTooLarge.
    pub max_request_body_size_bytes: u64,
    /// The cargo profile whose build of the test target runs (`PROFILES`).
    pub profile: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            runtimes: 2,
            apps: (1..=3).map(|i| App::new(&format!("app-{i}"))).collect(),
            max_ready_instances_per_app: 4,
            ready_instance_expiration_ms: 1500,
            dropout_rate: 0.05,
            app_cache_size: 100,
            load_interval_ms: 1000,
            max_request_body_size_bytes: 1 << 20,
            profile: RELEASE,
        }
    }
}

/// The running test target. Dropping it kills its processes.
pub struct Testbed {
    pub dir: PathBuf,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// Where each runtime listens (the proxy reaches it there).
    pub runtime_addrs: Vec<SocketAddr>,
    apps_file: PathBuf,
    config_file: PathBuf,
    runtimes: Vec<Child>,
    proxy: Child,
    /// Contained: the proxy's PID on the host (`proxy` is then the namespace's `unshare`).
    proxy_host_pid: Option<u32>,
    /// The cargo profile of its binaries.
    profile: &'static str,
}

/// Files and ports of a test target, before its processes start.
struct Prepared {
    dir: PathBuf,
    apps_file: PathBuf,
    config_file: PathBuf,
    runtime_addrs: Vec<SocketAddr>,
    http: SocketAddr,
    admin: SocketAddr,
}

impl Prepared {
    fn new(opts: &Options) -> Prepared {
        let dir =
            std::env::temp_dir().join(format!("rw-testbed-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("testbed dir");
        let apps_file = dir.join("apps.json");
        write_apps(&apps_file, &opts.apps);
        let runtime_addrs: Vec<SocketAddr> = (0..opts.runtimes)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = json!({
            "http_listen": http, "admin_listen": admin, "runtimes": runtime_addrs,
            "apps_file": apps_file, "load_interval_ms": opts.load_interval_ms,
            "local": {
                "max_ready_instances_per_app": opts.max_ready_instances_per_app,
                "ready_instance_expiration_ms": opts.ready_instance_expiration_ms,
                "request_timeout_ms": 10000,
                "max_request_body_size_bytes": opts.max_request_body_size_bytes,
                "dropout_rate": opts.dropout_rate,
                "route_cache_size": 1000,
                "app_cache_size": opts.app_cache_size,
            }
        });
        let config_file = dir.join("proxy.json");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        Prepared {
            dir,
            apps_file,
            config_file,
            runtime_addrs,
            http,
            admin,
        }
    }

    fn into_testbed(
        self,
        runtimes: Vec<Child>,
        proxy: Child,
        proxy_host_pid: Option<u32>,
        profile: &'static str,
    ) -> Testbed {
        Testbed {
            dir: self.dir,
            http: self.http,
            admin: self.admin,
            runtime_addrs: self.runtime_addrs,
            apps_file: self.apps_file,
            config_file: self.config_file,
            runtimes,
            proxy,
            proxy_host_pid,
            profile,
        }
    }
}

/// The host PID of a descendant of `root` whose executable's file name is `name`.
fn host_pid_named(root: u32, name: &str) -> Option<u32> {
    let ppid = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let descends = |mut pid: u32| {
        for _ in 0..8 {
            match ppid(pid) {
                Some(p) if p == root => return true,
                Some(p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|e| e.file_name().is_some_and(|n| n == name))
                && descends(pid)
        })
}

fn spawn_runtime(profile: &str, dir: &Path, i: usize, addr: SocketAddr) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("runtime{i}.log")))
        .unwrap();
    let child = Command::new(binary_of(profile, "rusty-workers-runtime"))
        .process_group(0)
        .args(["--listen", &addr.to_string()])
        .arg("--stats")
        .arg(dir.join(format!("runtime{i}.stats.json")))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting the runtime");
    wait_for(addr, "runtime");
    child
}

fn spawn_proxy(
    profile: &str,
    dir: &Path,
    config_file: &Path,
    http: SocketAddr,
    admin: SocketAddr,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("proxy.log"))
        .unwrap();
    let proxy = Command::new(binary_of(profile, "rusty-workers-proxy"))
        .process_group(0)
        .arg("--config")
        .arg(config_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting the proxy");
    wait_for(http, "proxy");
    wait_for(admin, "proxy admin");
    proxy
}

fn write_apps(path: &Path, apps: &[App]) {
    let apps: Vec<Value> = apps
        .iter()
        .map(|a| {
            json!({"id": a.id, "bundle_id": a.bundle_id,
                   "routes": [{"domain": "localhost", "path_prefix": a.prefix}]})
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&json!({ "apps": apps })).unwrap(),
    )
    .expect("writing the apps file");
    // Atomic replace: the proxy re-reads the file concurrently.
    std::fs::rename(&tmp, path).expect("replacing the apps file");
}

fn wait_for(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Testbed {
    pub fn start(opts: &Options) -> Testbed {
        let p = Prepared::new(opts);
        let runtimes: Vec<Child> = p
            .runtime_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| spawn_runtime(opts.profile, &p.dir, i, *a))
            .collect();
        let proxy = spawn_proxy(opts.profile, &p.dir, &p.config_file, p.http, p.admin);
        p.into_testbed(runtimes, proxy, None, opts.profile)
    }

    /// The same test target in a container of its own: one new mount and PID namespace
    /// (`unshare`), its binaries copied into a tmpfs mounted only there, so that the host sees
    /// neither their path nor their PIDs as the processes do. The host's network namespace is
    /// kept (the tests reach it on loopback). Dropping the testbed ends the namespace.
    pub fn start_contained(opts: &Options) -> Testbed {
        let p = Prepared::new(opts);
        let bin = p.dir.join("ct-bin");
        std::fs::create_dir_all(&bin).expect("mount point");
        let mut script = format!(
            "set -e\nmount -t tmpfs tmpfs {bin}\ncp {rt} {proxy} {bin}/\n",
            bin = bin.display(),
            rt = binary_of(opts.profile, "rusty-workers-runtime").display(),
            proxy = binary_of(opts.profile, "rusty-workers-proxy").display(),
        );
        for (i, a) in p.runtime_addrs.iter().enumerate() {
            script.push_str(&format!(
                "{bin}/rusty-workers-runtime --listen {a} --stats {d}/runtime{i}.stats.json 2>>{d}/runtime{i}.log &\n",
                bin = bin.display(),
                d = p.dir.display()
            ));
        }
        // The runtimes listen before the proxy connects to them.
        script.push_str("sleep 0.5\n");
        script.push_str(&format!(
            "{bin}/rusty-workers-proxy --config {c} 2>>{d}/proxy.log &\nwait\n",
            bin = bin.display(),
            c = p.config_file.display(),
            d = p.dir.display()
        ));
        std::fs::write(p.dir.join("start.sh"), script).expect("container script");
        let ns = Command::new("unshare")
            .process_group(0)
            // The shell is the namespace's init: when unshare dies, it is killed, and with it
            // every process of the namespace.
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--propagation",
                "private",
            ])
            .arg("--mount-proc")
            .arg("sh")
            .arg(p.dir.join("start.sh"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(p.dir.join("container.log")).unwrap())
            .spawn()
            .expect("starting unshare (util-linux)");
        for a in &p.runtime_addrs {
            wait_for(*a, "contained runtime");
        }
        wait_for(p.http, "contained proxy");
        wait_for(p.admin, "contained proxy admin");
        let proxy_pid =
            host_pid_named(ns.id(), "rusty-workers-proxy").expect("the contained proxy's host PID");
        p.into_testbed(Vec::new(), ns, Some(proxy_pid), opts.profile)
    }

    pub fn proxy_pid(&self) -> u32 {
        self.proxy_host_pid.unwrap_or_else(|| self.proxy.id())
    }

    pub fn runtime_pid(&self, i: usize) -> u32 {
        self.runtimes[i].id()
    }

    /// Starts runtime `i` again, at its address (after `kill_runtime`); the proxy finds it
    /// again on its next discovery round (every `load_interval_ms`).
    pub fn restart_runtime(&mut self, i: usize) {
        self.kill_runtime(i);
        self.runtimes[i] = spawn_runtime(self.profile, &self.dir, i, self.runtime_addrs[i]);
    }

    /// Kills the proxy (SIGKILL) and starts a new one with the same configuration.
    pub fn restart_proxy(&mut self) {
        assert!(
            self.proxy_host_pid.is_none(),
            "a contained test target is started once"
        );
        self.kill_proxy();
        self.proxy = spawn_proxy(
            self.profile,
            &self.dir,
            &self.config_file,
            self.http,
            self.admin,
        );
    }

    /// Kills the proxy (SIGKILL).
    pub fn kill_proxy(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
    }

    /// Runtime `i`'s own counts (`fetches`, `bytes_read`, `bytes_written` of its RPC
    /// connections), as it last wrote them (every 50 ms when they change).
    pub fn runtime_stats(&self, i: usize) -> Value {
        let path = self.dir.join(format!("runtime{i}.stats.json"));
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).expect("runtime stats are JSON"),
            Err(_) => json!({"fetches": 0, "bytes_read": 0, "bytes_written": 0}),
        }
    }

    /// Kills runtime `i` (SIGKILL): the proxy's connection to it breaks.
    pub fn kill_runtime(&mut self, i: usize) {
        let r = &mut self.runtimes[i];
        let _ = r.kill();
        let _ = r.wait();
    }

    pub fn set_apps(&self, apps: &[App]) {
        write_apps(&self.apps_file, apps);
    }

    /// Ground truth once it stops moving: the terminate queue drained, the work in flight done
    /// (the proxy's periodic `load` queries aside). Panics if it still moves after 60 s.
    pub fn settled_truth(&self) -> Value {
        let still = |mut v: Value| {
            v["rpc_calls"]["load"] = Value::Null;
            v
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = still(self.truth());
        loop {
            std::thread::sleep(Duration::from_millis(400));
            let now = self.truth();
            if still(now.clone()) == last {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "ground truth still moving after 60 s: {now}"
            );
            last = still(now);
        }
    }

    /// The proxy's ground truth (`GET /truth` on its admin port).
    pub fn truth(&self) -> Value {
        let body = http_get(self.admin, "localhost", "/truth")
            .expect("reading the proxy's ground truth")
            .1;
        serde_json::from_str(&body).expect("ground truth is JSON")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
        for r in &mut self.runtimes {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

/// One HTTP request to the proxy.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub host: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Sent with POST when not empty.
    pub body: Vec<u8>,
}

impl Request {
    pub fn get(path: &str) -> Self {
        Request {
            host: "localhost".into(),
            path: path.into(),
            ..Default::default()
        }
    }
}

/// One HTTP/1.1 GET on a fresh connection: (status, body).
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(
        addr,
        &Request {
            host: host.into(),
            ..Request::get(path)
        },
    )
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
pub fn http_request(addr: SocketAddr, r: &Request) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let method = if r.body.is_empty() { "GET" } else { "POST" };
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        r.path, r.host
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !r.body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", r.body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    // The proxy may answer (413) before reading all of a large body: a write error then is
    // not the request's failure.
    let _ = s.write_all(&r.body);
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {buf:?}")))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

/// Sends `paths` (on host `localhost`) from `concurrency` threads; returns status counts.
pub fn load(addr: SocketAddr, paths: &[String], concurrency: usize) -> BTreeMap<u16, usize> {
    let requests: Vec<Request> = paths.iter().map(|p| Request::get(p)).collect();
    let mut total = BTreeMap::new();
    for (status, _) in load_requests(addr, &requests, concurrency) {
        *total.entry(status).or_insert(0) += 1;
    }
    total
}

/// Sends `requests` from `concurrency` threads, each on a fresh connection; returns, per
/// request in order, its status (0: no answer) and the latency the client measured.
pub fn load_requests(
    addr: SocketAddr,
    requests: &[Request],
    concurrency: usize,
) -> Vec<(u16, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(requests.to_vec());
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, requests) = (next.clone(), requests.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = requests.get(i) else { break };
                    let start = Instant::now();
                    let status = http_request(addr, r).map(|r| r.0).unwrap_or(0);
                    seen.push((i, status, start.elapsed()));
                }
                seen
            })
        })
        .collect();
    let mut all: Vec<(usize, u16, Duration)> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("load thread"))
        .collect();
    all.sort_by_key(|x| x.0);
    all.into_iter().map(|(_, s, d)| (s, d)).collect()
}

/// A process's resident memory (`VmRSS` of `/proc/<pid>/status`), in MiB; NaN if unreadable.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS")
}

/// A memory field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, ...), in MiB; NaN if unreadable.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The observer's per-app counters (`{}` stands for the app id) and the field of an app's
/// ground truth each must equal.
pub const APP_COUNTERS: &[(&str, &str)] = &[
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
    ("app_requests_total{app=\"{}\"}", "requests"),
];

/// Whether a parsed scrape says every relation the request joins need is learnt.
pub fn joins_learnt(m: &BTreeMap<String, f64>) -> bool {
    ["fetch_call", "spawn_call"].iter().all(|r| {
        m.get(&format!(
            "rusty_workers_observer_layout_learnt{{relation=\"{r}\"}}"
        )) == Some(&1.0)
    })
}

/// The instances of `app` the observer counts as lost in a parsed scrape: dropped less dropped
/// and ended after all. That difference must equal the ground truth's `dropped`; each of the
/// two on its own depends on how an eviction and a termination racing it interleave as the
/// probes see them (a worker terminated as its app is evicted counts in both, or in neither).
pub fn lost_instances(m: &BTreeMap<String, f64>, app: &str) -> f64 {
    let get = |family: &str| {
        m.get(&format!("rusty_workers_{family}{{app=\"{app}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    get("app_instances_dropped_total") - get("app_instances_dropped_ended_total")
}

/// The number at `path` in a ground truth document (0 if absent).
pub fn truth_u64(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// Prometheus text format -> `name{labels}` -> value (labels as exposed, in order).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}
