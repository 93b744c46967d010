//! The `observer` command: `observer --pid PID` serves metrics, `observer probes` checks a target.

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use observer::catalog::Catalog;
use observer::snapshots::{self, Snapshots};
use observer::symbols::SymbolTable;
use observer::target::Target;
use observer::{
    coverage, decode, kernel, metrics, monotonic_ns, procs, requests, resolve, tracker,
};
use observer_common::netstat;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show, for every catalog probe, whether it resolves in the target and where.
    Probes(ProbesArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "binary", "symbols"])))]
struct ProbesArgs {
    /// A running proxy.
    #[arg(long)]
    pid: Option<u32>,
    /// A proxy executable on disk.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// A symbol table dump instead of a binary (tab-separated: address size type mangled
    /// demangled, hex numbers), such as shared/rusty-workers/proxy-release.functions.tsv.
    #[arg(long)]
    symbols: Option<PathBuf>,
    /// With --symbols: file offset = address - this (0x1000 for a Rust PIE's .text).
    #[arg(long, default_value = "0x1000", value_parser = parse_hex)]
    text_bias: u64,
    /// Probe catalog (TOML); default: the built-in rusty-workers proxy catalog.
    #[arg(long)]
    catalog: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// PID of the rusty-workers proxy to observe. When it ends, the observer waits for its
    /// successor (by --exe, or else by the same executable name) and attaches to it.
    #[arg(long)]
    pid: Option<u32>,
    /// Find the proxy by its executable's name instead (a process whose executable's file name
    /// contains NAME, e.g. rusty-workers-proxy); waits for it if none runs yet.
    #[arg(long, value_name = "NAME")]
    exe: Option<String>,
    /// Runtime processes: those whose executable's file name contains NAME.
    #[arg(long, value_name = "NAME", default_value = "rusty-workers-runtime")]
    runtime_exe: String,
    /// Also watch this process as a runtime (repeatable).
    #[arg(long, value_name = "PID")]
    runtime_pid: Vec<u32>,
    /// Runtime probe catalog (TOML); default: the built-in rusty-workers runtime catalog.
    #[arg(long, value_name = "FILE")]
    runtime_catalog: Option<PathBuf>,
    /// No uprobes in the runtimes (their procfs and socket figures stay).
    #[arg(long)]
    no_runtime_probes: bool,
    /// Do not watch, as runtimes, the local processes the proxy holds TCP connections to
    /// (say, when a database runs on the same host).
    #[arg(long)]
    no_runtime_peers: bool,
    /// Address of the Prometheus endpoint (`/metrics`); 9898 is the 2021 exporter's port.
    #[arg(long, default_value = "0.0.0.0:9898")]
    listen: SocketAddr,
    /// Probe catalog (TOML); default: the built-in rusty-workers proxy catalog.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Distinct app labels before further apps are counted under app="other".
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..4096))]
    max_apps: u16,
    /// Leave out the per-request probes: no request latency, outcomes or per-runtime RPC
    /// metrics, but the request path pays 1 uprobe instead of about 5.
    #[arg(long)]
    no_request_metrics: bool,
    /// For `cargo xtask bench`: attach one empty program on the proxy function every request
    /// calls, and nothing else (the floor of a uprobe-based observer's cost); serves no
    /// meaningful metrics.
    #[arg(long, hide = true)]
    floor: bool,
    /// How often the proxy's state is read from its memory (apps loaded, ready instances),
    /// in milliseconds. Its gauges are exported while the last good read is at most a second
    /// old (or two intervals, if longer).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    state_interval_ms: u64,
    /// For `cargo xtask bench`: how often userspace drains the ring buffer (a slow drain
    /// overruns it, to show that the losses are counted).
    #[arg(long, hide = true, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    drain_interval_ms: u64,
    /// Size of the ring buffer that carries events to userspace, in bytes: a power of two, at
    /// least 4096. The default holds about 3,700 requests' events, some 40 drains' worth at
    /// 10,000 requests/s; events past it are lost and counted
    /// (rusty_workers_observer_events_lost_total).
    #[arg(long, default_value_t = 4 << 20, value_parser = ring_bytes)]
    ring_bytes: u32,
}

/// A ring buffer's size: the kernel wants a power of two and a multiple of the page size
/// (kernel/bpf/ringbuf.c, ringbuf_map_alloc).
fn ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count"))?;
    if n < 4096 || !n.is_power_of_two() || n > 1 << 30 {
        return Err(format!(
            "{n} is not a power of two between 4096 and 1073741824 (e.g. 4194304 for 4 MiB)"
        ));
    }
    Ok(n)
}

fn load_catalog(path: Option<&Path>) -> anyhow::Result<Catalog> {
    match path {
        None => Ok(Catalog::builtin_proxy()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading catalog {}", p.display()))?;
            Ok(Catalog::parse(&text, &p.display().to_string())?)
        }
    }
}

fn probes_cmd(a: ProbesArgs) -> anyhow::Result<()> {
    let catalog = load_catalog(a.catalog.as_deref())?;
    let (path, table) = match (a.pid, a.binary, a.symbols) {
        (Some(pid), _, _) => {
            let target = Target::open(pid)?;
            let t = SymbolTable::from_elf_file(&target.exe_link)?;
            (target.exe_path, t)
        }
        (None, Some(b), _) => {
            let t = SymbolTable::from_elf_file(&b)?;
            (b, t)
        }
        (None, None, Some(s)) => {
            let text = std::fs::read_to_string(&s)
                .with_context(|| format!("reading symbol dump {}", s.display()))?;
            let t = SymbolTable::from_tsv(&text, a.text_bias)
                .with_context(|| format!("symbol dump {}", s.display()))?;
            (s, t)
        }
        _ => unreachable!("clap requires one of --pid, --binary, --symbols"),
    };
    let res = resolve::resolve(&catalog, &table);
    let real = std::fs::read_link(&path).unwrap_or(path.clone());
    println!(
        "target: {} ({} function symbols)",
        real.display(),
        table.symbols.len()
    );
    print!("{}", resolve::report(&res));
    let resolved = res.iter().filter(|r| !r.sites().is_empty()).count();
    println!("{resolved}/{} probes resolved", res.len());
    let lost = coverage::unavailable(res.iter().map(|r| {
        let reason = match r.outcome {
            resolve::Outcome::Unresolved(_) => "unresolved",
            _ => "",
        };
        (r.probe.name.as_str(), reason)
    }));
    if lost.is_empty() {
        println!("every metric can be exported");
    }
    for u in &lost {
        println!(
            "metric rusty_workers_{} not exported: probe {} {}",
            u.family, u.needs, u.reason
        );
    }
    if resolved == 0 {
        bail!("none of the catalog's probes resolved: {} is not a rusty-workers proxy (or the catalog is for another build)", path.display());
    }
    Ok(())
}

fn parse_hex(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(digits, 16).map_err(|e| format!("{s:?} is not a hex number: {e}"))
}

fn preflight() -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let missing = observer::target::missing_capabilities(&status);
    if !missing.is_empty() {
        // SAFETY: geteuid has no preconditions.
        let who = if unsafe { libc::geteuid() } == 0 {
            "root, but without"
        } else {
            "not root, and without"
        };
        bail!(
            "the observer is {who} {}: loading eBPF programs takes CAP_BPF, attaching uprobes and reading BPF statistics CAP_PERFMON (CAP_SYS_ADMIN stands in for both), and reading the /proc entries of a target run by another user CAP_SYS_PTRACE; run it as root (sudo), or in a container with --privileged or these capabilities added",
            missing.join(", ")
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): the observer needs a kernel built with CONFIG_DEBUG_INFO_BTF=y");
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        bail!("this kernel has no uprobe perf PMU (/sys/bus/event_source/devices/uprobe): it needs CONFIG_UPROBE_EVENTS=y");
    }
    Ok(())
}

struct Shared {
    tracker: tracker::Tracker,
    requests: Option<requests::Requests>,
    events_received: u64,
    decode_errors: u64,
    watcher: procs::Watcher,
    /// Kernel socket counters of a slot when its instance took it (a retired instance's slot
    /// is reused).
    net_base: HashMap<u32, [u64; netstat::COUNT as usize]>,
    /// Time of one watcher tick (the procfs collector).
    procs_seconds: f64,
    server: observer::runtime_server::ServerMetrics,
    /// How long the last attach to a proxy and to a runtime took (symbols read and resolved,
    /// uprobes attached).
    attach_seconds: std::collections::BTreeMap<&'static str, f64>,
    /// Snapshots of the proxy's state: their cost, failures and the latest.
    state: snapshots::Stats,
}

async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {listen}: port {} is already in use (another observer, or the 2021 in-proxy exporter, which used 9898 too; `ss -ltnp 'sport = :{}'` shows who). Pass --listen ADDR:PORT to use another port",
                listen.port(),
                listen.port()
            )
        } else {
            anyhow::anyhow!("cannot listen on {listen}: {e}")
        }
    })
}

/// Checks a proxy given by `--pid` before anything is loaded: it must exist and be one.
fn check_proxy(pid: u32, catalog: &Catalog) -> anyhow::Result<()> {
    let target = Target::open(pid)?;
    let table = SymbolTable::from_elf_file(&target.exe_link)?;
    let resolutions = resolve::resolve(catalog, &table);
    if resolutions.iter().all(|r| r.sites().is_empty()) {
        bail!(
            "PID {pid} ({}) is not a rusty-workers proxy: none of the catalog's {} probes resolved\n{}",
            target.exe_path.display(),
            resolutions.len(),
            resolve::report(&resolutions)
        );
    }
    for r in &resolutions {
        if let resolve::Outcome::Unresolved(why) = &r.outcome {
            log::warn!("probe {} not attached: {why}", r.probe.name);
        }
    }
    Ok(())
}

/// Everything the lifecycle touches when processes come and go.
struct Lifecycle {
    catalog: Catalog,
    /// None with `--no-runtime-probes`.
    runtime_catalog: Option<Catalog>,
    /// Runtime probe resolutions by executable (device, inode): runtimes share one binary.
    runtime_symbols: HashMap<(u64, u64), Arc<Vec<resolve::Resolution>>>,
    /// Runtime probe failures are logged once, not per runtime.
    runtime_failures_logged: bool,
    kernel: Arc<Mutex<Option<kernel::Kernel>>>,
    watched: aya::maps::HashMap<aya::maps::MapData, u32, observer_common::Watched>,
    counters: Arc<kernel::Counters>,
    started: std::time::Instant,
    snapshots: Snapshots,
}

impl Lifecycle {
    /// One look at the host: processes that ended are let go, new ones watched, and the
    /// proxy's uprobes follow the proxy.
    fn tick(&mut self, shared: &Mutex<Shared>) {
        let t0 = std::time::Instant::now();
        let changes = {
            let mut s = shared.lock().unwrap();
            let changes = s.watcher.tick(&procs::ProcHost, t0);
            s.procs_seconds = t0.elapsed().as_secs_f64();
            changes
        };
        for c in changes {
            self.apply(c, shared);
        }
    }

    fn since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn apply(&mut self, change: procs::Change, shared: &Mutex<Shared>) {
        match change {
            procs::Change::Started {
                role,
                instance,
                pid,
                slot,
                again,
            } => {
                let w = observer_common::Watched {
                    slot,
                    role: role.code(),
                };
                if let Err(e) = self.watched.insert(pid, w, 0) {
                    log::warn!("cannot count the sockets of PID {pid}: {e}");
                }
                if !again {
                    if let Ok(base) = self.counters.proc_net(slot) {
                        shared.lock().unwrap().net_base.insert(slot, base);
                    }
                }
                log::info!(
                    "[{:.3}s] {} {instance} {}: PID {pid}",
                    self.since_start(),
                    role.as_str(),
                    if again { "is back" } else { "found" }
                );
                match role {
                    procs::Role::Proxy => self.attach_proxy(pid, again, shared),
                    procs::Role::Runtime => self.attach_runtime(pid, &instance, shared),
                }
            }
            procs::Change::Ended {
                role,
                instance,
                pid,
                why,
            } => {
                let _ = self.watched.remove(&pid);
                if role == procs::Role::Proxy {
                    self.snapshots.set_reader(None);
                }
                log::warn!(
                    "[{:.3}s] {} {instance} (PID {pid}) {}",
                    self.since_start(),
                    role.as_str(),
                    match why {
                        procs::Ended::Exited => "exited",
                        procs::Ended::Replaced => "was replaced by a new executable",
                    }
                );
                let links = self
                    .kernel
                    .lock()
                    .unwrap()
                    .as_mut()
                    .map(|k| k.detach(pid))
                    .unwrap_or_default();
                self.drop_links(links);
            }
        }
    }

    /// Detaches uprobe links away from the event loop and the scrapes (it takes a while).
    fn drop_links(&self, links: Vec<aya::programs::uprobe::UProbeLink>) {
        if links.is_empty() {
            return;
        }
        let started = self.started;
        std::thread::spawn(move || {
            let n = links.len();
            drop(links);
            log::info!(
                "[{:.3}s] {n} uprobe sites of an ended process detached",
                started.elapsed().as_secs_f64()
            );
        });
    }

    /// The runtime probes, in a runtime process (its symbols resolved once per executable).
    fn attach_runtime(&mut self, pid: u32, instance: &str, shared: &Mutex<Shared>) {
        let t0 = std::time::Instant::now();
        self.attach_runtime_probes(pid, instance);
        shared
            .lock()
            .unwrap()
            .attach_seconds
            .insert("runtime", t0.elapsed().as_secs_f64());
    }

    fn attach_runtime_probes(&mut self, pid: u32, instance: &str) {
        let Some(catalog) = &self.runtime_catalog else {
            return;
        };
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let id = {
            use std::os::unix::fs::MetadataExt as _;
            match std::fs::metadata(&exe) {
                Ok(m) => (m.dev(), m.ino()),
                Err(e) => {
                    log::warn!("runtime {instance} (PID {pid}): {e}; its probes are not attached");
                    return;
                }
            }
        };
        let resolutions = match self.runtime_symbols.get(&id) {
            Some(r) => r.clone(),
            None => match SymbolTable::from_elf_file(&exe) {
                Ok(table) => {
                    let r = Arc::new(resolve::resolve(catalog, &table));
                    self.runtime_symbols.insert(id, r.clone());
                    r
                }
                Err(e) => {
                    log::warn!("runtime {instance} (PID {pid}): {e:#}; its probes are not attached (procfs and socket figures still are)");
                    return;
                }
            },
        };
        let mut k = self.kernel.lock().unwrap();
        let Some(k) = k.as_mut() else { return };
        if let Err(e) = k.attach(&resolutions, &exe, pid, false) {
            log::warn!("attaching to runtime {instance} (PID {pid}): {e:#}");
        }
        if !self.runtime_failures_logged {
            for p in k.probe_statuses() {
                if p.attached == 0 && !p.reason.is_empty() && p.name.starts_with("server_") {
                    log::warn!("probe {} not attached ({}): {}", p.name, p.reason, p.detail);
                    self.runtime_failures_logged = true;
                }
            }
        }
        log::info!(
            "[{:.3}s] runtime {instance} (PID {pid}): {} uprobe sites attached",
            self.since_start(),
            k.uprobes_attached(pid)
        );
    }

    fn attach_proxy(&mut self, pid: u32, again: bool, shared: &Mutex<Shared>) {
        let t0 = std::time::Instant::now();
        let found = (|| -> anyhow::Result<_> {
            let target = Target::open(pid)?;
            let table = SymbolTable::from_elf_file(&target.exe_link)?;
            Ok((target, table))
        })();
        let (target, table) = match found {
            Ok(x) => x,
            Err(e) => {
                log::error!("proxy PID {pid}: {e:#}; its uprobes are not attached");
                return;
            }
        };
        let resolutions = resolve::resolve(&self.catalog, &table);
        if resolutions.iter().all(|r| r.sites().is_empty()) {
            log::error!(
                "PID {pid} ({}) was taken for the proxy but is not a rusty-workers proxy: none of the catalog's probes resolved (a narrower --exe NAME picks the right process)",
                target.exe_path.display()
            );
        }
        let (attached, old, answers) = {
            let mut k = self.kernel.lock().unwrap();
            let Some(k) = k.as_mut() else { return };
            let old = k.detach(pid);
            if let Err(e) = k.attach(&resolutions, &target.exe_link, pid, true) {
                log::error!("attaching to proxy PID {pid}: {e:#}");
            }
            let statuses = k.probe_statuses();
            for p in &statuses {
                if p.attached == 0 && !p.reason.is_empty() && p.reason != "unresolved" {
                    log::warn!("probe {} not attached ({}): {}", p.name, p.reason, p.detail);
                }
            }
            let lost = coverage::unavailable(statuses.iter().map(|p| (p.name.as_str(), p.reason)));
            for u in &lost {
                log::warn!(
                    "metric rusty_workers_{} not exported: probe {} {}",
                    u.family,
                    u.needs,
                    u.reason
                );
            }
            let answers = !statuses.iter().any(|p| {
                coverage::ANSWER_PROBES.contains(&p.name.as_str()) && coverage::is_missing(p.reason)
            });
            (k.uprobes_attached(pid), old, answers)
        };
        self.drop_links(old);
        // The proxy's state, read from its memory: a first snapshot now, merged after the
        // next drain of the events.
        let (reader, unavailable) = match &self.catalog.state {
            None => (
                None,
                Some("not read: the catalog's [state] has enabled = false".to_string()),
            ),
            Some(spec) => match snapshots::Reader::new(&target, &table, spec) {
                Ok(r) => (Some(r), None),
                Err(why) => {
                    log::warn!("proxy PID {pid}: its state cannot be read from memory: {why}; apps_loaded and instances come from events (exact only for what happens after the attach)");
                    (None, Some(why))
                }
            },
        };
        let reading = reader.is_some();
        self.snapshots.set_reader(reader);
        self.snapshots.take_now();
        let mut s = shared.lock().unwrap();
        s.state.reading = reading;
        s.state.unavailable = unavailable;
        s.attach_seconds.insert("proxy", t0.elapsed().as_secs_f64());
        if again {
            s.tracker.target_restarted();
            if let Some(q) = s.requests.as_mut() {
                q.target_restarted();
            }
        }
        if let Some(q) = s.requests.as_mut() {
            q.set_answers_probed(answers);
        }
        log::info!(
            "[{:.3}s] proxy PID {pid} ({}): {attached} uprobe sites attached",
            self.since_start(),
            target.exe_path.display()
        );
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    if a.pid.is_none() && a.exe.is_none() {
        bail!("missing --pid <PID> of the rusty-workers proxy, or --exe NAME to find it by its executable's name (or use `observer probes`); see --help");
    }
    let catalog = load_catalog(a.catalog.as_deref())?;
    let runtime_catalog = if a.no_runtime_probes {
        None
    } else {
        Some(match &a.runtime_catalog {
            None => Catalog::builtin_runtime(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading runtime catalog {}", p.display()))?;
                Catalog::parse(&text, &p.display().to_string())?
            }
        })
    };
    // Privileges first: without them the target's /proc entries cannot be read either, and the
    // message would blame the PID.
    preflight()?;
    if let Some(pid) = a.pid {
        check_proxy(pid, &catalog)?;
    }
    for &pid in &a.runtime_pid {
        Target::open(pid).context("--runtime-pid")?;
    }
    let listener = bind(a.listen).await?;

    let detail = !a.no_request_metrics;
    let mut kernel = kernel::Kernel::load(&catalog.layout, detail, a.floor, a.ring_bytes)?;
    kernel.attach_tracepoints()?;
    let kernel::Maps {
        events,
        handles: mut handle_map,
        mut conn_key,
        watched,
        counters,
        logger,
    } = kernel.take_maps()?;
    drain_ebpf_log(logger)?;
    let counters = Arc::new(counters);
    let kernel = Arc::new(Mutex::new(Some(kernel)));
    let shared = Arc::new(Mutex::new(Shared {
        tracker: tracker::Tracker::new(tracker::Config {
            max_apps: a.max_apps as usize,
            ..Default::default()
        }),
        requests: detail.then(|| requests::Requests::new(catalog.layout)),
        events_received: 0,
        decode_errors: 0,
        watcher: procs::Watcher::new(procs::Config {
            proxy_pid: a.pid,
            proxy_exe: a.exe.clone(),
            runtime_exe: a.runtime_exe.clone(),
            runtime_pids: a.runtime_pid.clone(),
            runtime_peers: !a.no_runtime_peers,
        }),
        net_base: HashMap::new(),
        procs_seconds: 0.0,
        server: observer::runtime_server::ServerMetrics::new(),
        attach_seconds: Default::default(),
        state: Default::default(),
    }));
    let snaps = Snapshots::default();
    let mut life = Lifecycle {
        catalog,
        runtime_catalog,
        runtime_symbols: HashMap::new(),
        runtime_failures_logged: false,
        kernel: kernel.clone(),
        watched,
        counters: counters.clone(),
        started: std::time::Instant::now(),
        snapshots: snaps.clone(),
    };
    life.tick(&shared);
    if let Some(pid) = a.pid {
        let k = kernel.lock().unwrap();
        if k.as_ref().is_some_and(|k| k.uprobes_attached(pid) == 0) {
            bail!("no probe could be attached to PID {pid}");
        }
    } else if shared.lock().unwrap().watcher.proxy().is_none() {
        log::info!(
            "no process named like {:?} yet: waiting for the proxy",
            a.exe.as_deref().unwrap_or_default()
        );
    }

    // Events: decode, update the model, push handle -> app slots back into the kernel.
    let loop_shared = shared.clone();
    // The first snapshot (taken at the attach) is merged before the first scrape can come.
    let mut events = events;
    drain(&mut events, &shared, &mut conn_key, &mut handle_map, &snaps);
    // SAFETY: the AsyncFd owns the RingBuf, which owns the fd: it stays open while registered.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let drain_ms = a.drain_interval_ms;
    snaps
        .spawn(Duration::from_millis(a.state_interval_ms))
        .context("starting the snapshot thread")?;
    let state_max_age_ns = (2 * a.state_interval_ms).max(1000) * 1_000_000;
    let loop_snaps = snaps.clone();
    let event_loop = tokio::spawn(async move {
        let snaps = loop_snaps;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // The probes submit without waking us (one wakeup per event would cost the proxy more
        // than the event): drain in batches.
        let mut drain_tick = tokio::time::interval(Duration::from_millis(drain_ms));
        drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = drain_tick.tick() => {
                    drain(events.get_mut(), &loop_shared, &mut conn_key, &mut handle_map, &snaps);
                }
                guard = events.readable_mut() => {
                    let mut guard = match guard {
                        Ok(g) => g,
                        Err(e) => {
                            // Without events the metrics would silently freeze: stop instead
                            // (exiting closes every link, so nothing stays attached).
                            log::error!("polling the ring buffer failed: {e}; exiting");
                            std::process::exit(1);
                        }
                    };
                    drain(guard.get_inner_mut(), &loop_shared, &mut conn_key, &mut handle_map, &snaps);
                    guard.clear_ready();
                }
                _ = tick.tick() => {
                    // Events of a proxy that just ended belong to its state, not its successor's.
                    drain(events.get_mut(), &loop_shared, &mut conn_key, &mut handle_map, &snaps);
                    life.tick(&loop_shared);
                    let now = monotonic_ns();
                    let mut s = loop_shared.lock().unwrap();
                    s.tracker.housekeeping(now);
                    let s = &mut *s;
                    if let Some(q) = s.requests.as_mut() {
                        q.housekeeping(now);
                        q.prune_placed(&s.tracker, now);
                    }
                }
            }
        }
    });

    let scrape_shared = shared.clone();
    let scrape_kernel = kernel.clone();
    let scrape_snaps = snaps.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let shared = scrape_shared.clone();
                let kernel = scrape_kernel.clone();
                let counters = counters.clone();
                let snaps = scrape_snaps.clone();
                async move {
                    let (programs, probes) = kernel
                        .lock()
                        .unwrap()
                        .as_ref()
                        .map(|k| (k.program_stats(), k.probe_statuses()))
                        .unwrap_or_default();
                    let latest = snaps.latest();
                    let s = shared.lock().unwrap();
                    let body = metrics::render(&metrics::Inputs {
                        tracker: &s.tracker,
                        requests: s.requests.as_ref(),
                        counters: &counters,
                        probes: &probes,
                        programs: &programs,
                        events_received: s.events_received,
                        decode_errors: s.decode_errors,
                        watcher: &s.watcher,
                        net_base: &s.net_base,
                        procs_seconds: s.procs_seconds,
                        server: &s.server,
                        attach_seconds: &s.attach_seconds,
                        state: &s.state,
                        latest: latest.as_ref(),
                        state_max_age_ns,
                        now_ns: monotonic_ns(),
                    });
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        body,
                    )
                }
            }),
        )
        .route(
            "/",
            axum::routing::get(|| async { "rusty-workers observer: metrics at /metrics\n" }),
        );
    log::info!("metrics on http://{}/metrics", a.listen);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving /metrics")?;
    event_loop.abort();
    // Dropping the object closes the links: the kernel removes every uprobe.
    let detached = kernel
        .lock()
        .unwrap()
        .take()
        .map(|k| k.uprobes_attached_total());
    log::info!("detached {} uprobe sites; bye", detached.unwrap_or(0));
    Ok(())
}

/// Writes the programs' aya-log records into the observer's log as they come (their ring buffer
/// wakes the reader; the programs log only rare paths).
fn drain_ebpf_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the logger, which owns the ring buffer's fd: it stays open
    // while registered.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .context("polling the eBPF log ring buffer")?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    log::warn!("the eBPF log ring buffer failed: {e}; its records are lost");
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Applies every event waiting in the ring buffer, then pushes what the model learnt back into
/// the kernel's maps.
fn drain(
    rb: &mut aya::maps::RingBuf<aya::maps::MapData>,
    shared: &Mutex<Shared>,
    conn_key: &mut aya::maps::Array<aya::maps::MapData, observer_common::ConnKey>,
    handle_map: &mut aya::maps::HashMap<aya::maps::MapData, observer_common::HandleKey, u32>,
    snaps: &Snapshots,
) {
    // Snapshots whose walk ended before this drain began: merged after its events, so that
    // every event of what they saw is applied first.
    let outcomes = snaps.take_outcomes();
    // When a worker was let go is not in the event: the drain's start is later, which only
    // keeps a snapshot from bringing it back (see Tracker::merge_snapshot).
    let now = monotonic_ns();
    let (ops, key) = {
        let mut guard_s = shared.lock().unwrap();
        let s = &mut *guard_s;
        while let Some(rec) = rb.next() {
            s.events_received += 1;
            let ev = match decode::event(&rec) {
                Ok(ev) => ev,
                Err(e) => {
                    s.decode_errors += 1;
                    log::debug!("undecodable event: {e}");
                    continue;
                }
            };
            match decode::decode_event(&ev) {
                Ok(decode::Decoded::ServerCall {
                    tgid,
                    method,
                    duration_ns,
                    polls,
                }) => {
                    let runtime = s.watcher.instance_of(tgid).map(|i| i.name.as_str());
                    s.server.observe(runtime, method, duration_ns, polls);
                    continue;
                }
                Ok(d) => {
                    if let (decode::Decoded::Terminate { handle, .. }, Some(q)) =
                        (&d, s.requests.as_mut())
                    {
                        q.forget_worker(handle);
                    }
                    s.tracker.apply(d)
                }
                Err(e) => {
                    s.decode_errors += 1;
                    log::debug!("undecodable event: {e}");
                    continue;
                }
            }
            if let Some(q) = s.requests.as_mut() {
                let snap = decode::snapshot(&rec, &ev);
                let mem: &dyn requests::Memory = match &snap {
                    Some(m) => m,
                    None => &requests::NoMemory,
                };
                q.apply(&ev, &s.tracker, mem);
                for h in q.take_discarded() {
                    s.tracker.discard(&h, now);
                }
            }
        }
        for (o, learnt) in outcomes {
            if let Some((snap, taken_ns)) = s.state.record(o, learnt) {
                s.tracker.merge_snapshot(&snap, taken_ns);
            }
        }
        let key = s.requests.as_mut().and_then(|q| q.take_conn_key());
        (s.tracker.take_map_ops(), key)
    };
    if let Some(k) = key {
        if k.mode == observer_common::conn_key::UNKNOWN {
            log::info!("the kernel no longer keys response heads (learning where hyper keeps the request again)");
        } else {
            log::info!("learnt where hyper's connection keeps the request: {k:?}");
        }
        if let Err(e) = conn_key.set(0, k, 0) {
            log::warn!("setting the connection key in the kernel: {e}");
        }
    }
    for op in ops {
        let res = match op {
            tracker::MapOp::Insert(k, slot) => handle_map.insert(k, slot, 0),
            tracker::MapOp::Remove(k) => handle_map.remove(&k),
        };
        if let Err(e) = res {
            log::debug!("handle map update: {e}");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: detaching"),
        _ = int.recv() => log::info!("SIGINT: detaching"),
    }
}

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
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Probes(a)) => probes_cmd(a),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(cli.run))),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
