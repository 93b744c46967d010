//! Renders the Prometheus exposition from the tracker, the kernel's counters and the probes.
//!
//! Built fresh on every scrape from the current state (as ebpf_exporter does), so a series
//! never outlives what it describes and counters come straight from their source.

use crate::expo::{Kind, Writer, PREFIX};
use crate::kernel::{Counters, ProbeStatus, ProgramStats};
use crate::model::Model;
use crate::procs::Role;
use crate::tracker::AppStats;
use observer_common::{method, netstat};
use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::collections::BTreeMap;
use std::time::Instant;

const NO_LABELS: &[&str] = &[];

/// Everything a scrape reads.
pub struct Inputs<'a> {
    /// The model the event loop keeps.
    pub model: &'a Model,
    pub counters: &'a Counters,
    pub probes: &'a [ProbeStatus],
    pub programs: &'a [ProgramStats],
    /// The latest good snapshot of the proxy's state, with when its walk began.
    pub latest: Option<&'a (crate::snapshot::Snapshot, u64)>,
    /// A snapshot older than this is not exported.
    pub state_max_age_ns: u64,
    pub now_ns: u64,
}

struct Reg(Registry);

impl Reg {
    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }
    /// A counter of seconds (a float).
    fn seconds(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        let c = CounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(g.clone())).expect("unique metric");
        g
    }
    /// An unlabelled counter, set to `value`.
    fn total(&self, name: &str, help: &str, value: u64) {
        self.counter(name, help, NO_LABELS)
            .with_label_values(NO_LABELS)
            .inc_by(value);
    }
    /// An unlabelled integer gauge, set to `value`.
    fn level(&self, name: &str, help: &str, value: i64) {
        self.int_gauge(name, help, NO_LABELS)
            .with_label_values(NO_LABELS)
            .set(value);
    }
    fn int_gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(g.clone())).expect("unique metric");
        g
    }
}

/// One concern's metrics, timed and reported like node_exporter's collectors.
type Collector = fn(&Reg, &mut Writer, &Inputs) -> anyhow::Result<()>;

/// The app cache and instances, a series per app: written directly (`expo`).
fn apps(r: &Reg, w: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let apps = &i.model.tracker.apps;
    // Read before anything is written: a failed read leaves no half-written family.
    let requests = apps
        .values()
        .map(|a| Ok(a.requests_user + i.counters.app_requests(a.slot)?))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    // From the proxy's memory when it is read (exact whatever ran before the attach), else
    // from the events (exact for what happened since). A stale snapshot withholds it
    // (`unavailable`).
    let snap = crate::snapshots::fresh(i.latest, i.now_ns, i.state_max_age_ns);
    let loaded = match snap {
        Some(s) => Some(s.apps.len()),
        None if !i.model.state.reading => Some(apps.values().filter(|a| a.loaded).count()),
        None => None,
    };
    if let Some(n) = loaded {
        r.level(
            "apps_loaded",
            "Apps in the proxy's app cache now (2021: APP_NUM).",
            n as i64,
        );
    }
    if let Some(s) = snap.filter(|s| s.ready_total().is_some()) {
        let mut ready: BTreeMap<String, u64> = BTreeMap::new();
        for a in &s.apps {
            if let Some(label) = i.model.tracker.label_now(&crate::decode::Bytes::new(&a.id)) {
                *ready.entry(label).or_default() += a.ready.unwrap_or(0);
            }
        }
        w.family(
            "app_ready_instances",
            Kind::Gauge,
            "Instances waiting in the app's ready pool now, read from the proxy's memory (2021: READY_INSTANCE, per app).",
        );
        for (app, n) in &ready {
            w.sample(&[("app", app)], *n as f64);
        }
        // By the runtime's own id (the address, the `runtime` label elsewhere, is only known
        // from an `id` answer, which a late attach has not seen; `runtime_info` joins the two).
        if s.instances_complete {
            w.family(
                "runtime_ready_instances",
                Kind::Gauge,
                "Instances waiting in ready pools on each runtime now, by RuntimeId, read from the proxy's memory (join runtime_info on runtime_id for its address).",
            );
            let by_rt = crate::snapshot::pooled_by_runtime(s);
            for rt in s.runtimes.iter().flatten() {
                let n = by_rt.get(rt.as_str()).copied().unwrap_or(0);
                w.sample(&[("runtime_id", rt)], n as f64);
            }
            for (rt, n) in by_rt
                .iter()
                .filter(|(rt, _)| !s.runtimes.iter().flatten().any(|x| x.as_str() == **rt))
            {
                w.sample(&[("runtime_id", rt)], *n as f64);
            }
        }
    }
    w.family(
        "app_loaded_seconds",
        Kind::Gauge,
        "Seconds since the app was loaded into the app cache (2021: APP_LAST_TIME, per app).",
    );
    // An app loaded before the attach has no load time (the proxy keeps none): no series.
    for (app, a) in apps.iter().filter(|(_, a)| a.loaded && a.loaded_at_ns != 0) {
        let age = i.now_ns.saturating_sub(a.loaded_at_ns) as f64 / 1e9;
        w.sample(&[("app", app)], age);
    }
    type Field = fn(&AppStats) -> u64;
    let per_app: [(&str, Kind, &str, Field); 7] = [
        (
            "app_instances",
            Kind::Gauge,
            "Instances the proxy holds for the app: spawned, not terminated, not dropped (2021: READY_INSTANCE, per app).",
            |a| a.alive,
        ),
        (
            "app_loads_total",
            Kind::Counter,
            "App loads into the proxy's app cache.",
            |a| a.loads,
        ),
        (
            "app_instance_spawns_total",
            Kind::Counter,
            "spawn_worker RPCs sent for the app (instance cold starts).",
            |a| a.spawns,
        ),
        (
            "app_instance_terminations_total",
            Kind::Counter,
            "terminate_worker RPCs sent for the app's instances (expiry, dropout, pool overflow).",
            |a| a.terminations,
        ),
        (
            "app_instances_dropped_total",
            Kind::Counter,
            "Instances that left with their evicted app state (counted then; see app_instances_dropped_ended_total).",
            |a| a.dropped,
        ),
        (
            "app_instances_dropped_ended_total",
            Kind::Counter,
            "Dropped instances that ended after all: terminated, or discarded after a failed fetch. Dropped less this is the instances lost in their runtime.",
            |a| a.dropped_ended,
        ),
        (
            "app_instances_discarded_total",
            Kind::Counter,
            "Instances the proxy let go after a failed fetch (lost by the runtime, ended by an execution error, or on a failed connection): neither pooled nor terminated. Seen with request metrics only.",
            |a| a.discarded,
        ),
    ];
    for (name, kind, help, field) in per_app {
        w.family(name, kind, help);
        for (app, a) in apps {
            w.int(&[("app", app)], field(a));
        }
    }
    w.family(
        "app_evictions_total",
        Kind::Counter,
        "App evictions from the app cache; reason: changed (the app changed or was deleted) or capacity (least recently used, the cache was full).",
    );
    for (app, a) in apps {
        w.int(&[("app", app), ("reason", "changed")], a.evictions);
        w.int(
            &[("app", app), ("reason", "capacity")],
            a.capacity_evictions,
        );
    }
    w.family(
        "app_requests_total",
        Kind::Counter,
        "Requests the proxy routed to an instance of the app (fetch RPCs; a retried request counts each attempt).",
    );
    for (app, n) in apps.keys().zip(requests) {
        w.int(&[("app", app)], n);
    }
    Ok(())
}

fn rpcs(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let c = r.counter(
        "runtime_rpcs_total",
        "RPCs the proxy sent to runtimes, by RuntimeService method.",
        &["method"],
    );
    for (m, n) in i.counters.rpc_calls()?.into_iter().enumerate() {
        c.with_label_values(&[method::NAMES[m]]).inc_by(n);
    }
    Ok(())
}

fn observer(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    r.int_gauge(
        "observer_build_info",
        "The observer's version.",
        &["version"],
    )
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1);
    r.level(
        "observer_target_up",
        "1 while the watched proxy process exists.",
        i.model.watcher.proxy().is_some() as i64,
    );
    let re = r.counter(
        "observer_reattaches_total",
        "Processes watched again under a name that had one before (a restart or an in-place upgrade; for the proxy, its uprobes re-attached).",
        &["role"],
    );
    for role in [Role::Proxy, Role::Runtime] {
        re.with_label_values(&[role.as_str()])
            .inc_by(i.model.watcher.reattaches.get(&role).copied().unwrap_or(0));
    }
    let attach = r.gauge(
        "observer_attach_duration_seconds",
        "How long the last attach to a process of the role took: its executable's symbols read and resolved, its uprobes attached.",
        &["role"],
    );
    for (role, secs) in &i.model.attach_seconds {
        attach.with_label_values(&[role]).set(*secs);
    }
    r.total(
        "observer_unwatched_processes_total",
        "Runtimes found but not watched: every kernel counter slot was taken.",
        i.model.watcher.slots_exhausted,
    );
    r.0.register(Box::new({
        let g = prometheus::Gauge::new(
            format!("{PREFIX}_observer_procfs_tick_seconds"),
            "Time the last look at the processes took (discovery and procfs readings, every 500 ms).",
        )
        .expect("valid metric");
        g.set(i.model.procs_seconds);
        g
    }))
    .expect("unique metric");
    let attached = r.int_gauge(
        "observer_probe_attached",
        "1 if every site of the probe is attached; reason says why not (unresolved, load_failed, attach_failed, target_down).",
        &["probe", "reason"],
    );
    let sites = r.int_gauge(
        "observer_probe_sites",
        "Function starts the probe is attached at.",
        &["probe"],
    );
    for p in i.probes {
        attached
            .with_label_values(&[&p.name, p.reason])
            .set((p.reason.is_empty() && p.attached > 0) as i64);
        sites.with_label_values(&[&p.name]).set(p.attached as i64);
    }
    r.total(
        "observer_events_total",
        "Events received from the probes.",
        i.model.events_received,
    );
    r.total(
        "observer_events_lost_total",
        "Events dropped in the kernel because the ring buffer was full.",
        i.counters.events_lost()?,
    );
    r.total(
        "observer_target_read_errors_total",
        "Reads of the target's memory that failed in a probe.",
        i.counters.read_errors()?,
    );
    r.total(
        "observer_hook_errors_total",
        "eBPF program runs that ended on an error (a failed read, a full ring buffer or map); the first of each CPU and every power of two are logged.",
        i.counters.hook_errors()?,
    );
    r.total(
        "observer_decode_errors_total",
        "Events that did not decode.",
        i.model.decode_errors,
    );
    let c = &i.model.tracker.counters;
    r.total(
        "observer_label_overflow_total",
        "App ids counted under app=\"other\" because the label cap was reached.",
        c.label_overflow,
    );
    let refused = r.counter(
        "observer_label_refused_total",
        "App ids read from the target and refused as label values, counted under app=\"other\".",
        &["reason"],
    );
    for reason in ["empty", "too_long", "not_utf8", "bad_char"] {
        refused
            .with_label_values(&[reason])
            .inc_by(c.label_refused.get(reason).copied().unwrap_or(0));
    }
    r.total("observer_unattributed_requests_total", "Fetches on a worker handle the observer could not pair with an app (instances spawned before it attached).", c.unattributed_requests);
    r.total(
        "observer_unattributed_terminations_total",
        "terminate_worker RPCs on a handle with no known app.",
        c.unattributed_terminations,
    );
    r.total("observer_capacity_evictions_unnamed_total", "App cache capacity evictions past the first of one insert, whose app the probe does not read.", c.unnamed_capacity_evictions);
    r.total(
        "observer_app_removes_not_cached_total",
        "App cache removes of an app that was no longer cached (evicted for capacity while the proxy checked it for changes): not counted as evictions.",
        c.removes_not_cached,
    );
    r.total(
        "observer_handle_pairings_total",
        "New worker handles paired with the app of their spawn.",
        c.pairings,
    );
    r.level(
        "observer_pending_spawns",
        "spawn_worker RPCs whose worker has not been seen in a fetch yet.",
        i.model.tracker.pending_spawns() as i64,
    );
    let runs = r.counter(
        "observer_bpf_program_runs_total",
        "Runs of each eBPF program (kernel BPF stats).",
        &["program"],
    );
    let secs = r.seconds(
        "observer_bpf_program_run_seconds_total",
        "Time spent in each eBPF program (kernel BPF stats; the uprobe trap itself is not included).",
        &["program"],
    );
    for p in i.programs {
        runs.with_label_values(&[&p.program]).inc_by(p.runs);
        secs.with_label_values(&[&p.program]).inc_by(p.run_seconds);
    }
    Ok(())
}

fn requests(r: &Reg, w: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let Some(q) = i.model.requests.as_ref() else {
        return Ok(());
    };
    for c in q.metrics.collectors() {
        r.0.register(c)?;
    }
    q.metrics.write(w);
    let info = r.int_gauge(
        "runtime_info",
        "Runtimes that answered an id RPC: their address and RuntimeId.",
        &["runtime", "runtime_id"],
    );
    for (rt, id) in &q.runtime_ids {
        info.with_label_values(&[rt.as_str(), id.as_str()]).set(1);
    }
    let inst = r.int_gauge(
        "runtime_instances",
        "Instances the proxy holds on each runtime: spawned there since the attach, not terminated, discarded or dropped.",
        &["runtime"],
    );
    for (rt, n) in q.instances_by_runtime(&i.model.tracker) {
        inst.with_label_values(&[&rt]).set(n as i64);
    }
    let c = &q.counters;
    r.total(
        "observer_unmatched_rpc_calls_total",
        "RPC ends whose call was not seen (in flight at attach) or not matched.",
        c.unmatched_calls,
    );
    r.total(
        "observer_unmatched_responses_total",
        "HTTP response heads whose request start was not seen (in flight at attach) or not keyed.",
        c.unmatched_responses,
    );
    r.total(
        "observer_unattributed_calls_total",
        "fetch and spawn_worker RPCs not tied to a request (while the call distance was being learnt).",
        c.unattributed_calls,
    );
    r.total(
        "observer_abandoned_requests_total",
        "Requests whose response was never seen.",
        c.abandoned_requests,
    );
    r.level(
        "observer_open_requests",
        "Requests started and not answered yet.",
        q.open_requests() as i64,
    );
    r.level(
        "observer_open_rpc_calls",
        "RPC calls not ended yet.",
        q.open_calls() as i64,
    );
    let learnt = r.int_gauge(
        "observer_layout_learnt",
        "1 once the observer has learnt a relation of the target's memory it joins events by.",
        &["relation"],
    );
    for (name, known) in q.learnt() {
        learnt.with_label_values(&[name]).set(known as i64);
    }
    Ok(())
}

const COLLECTORS: &[(&str, Collector)] = &[
    ("apps", apps),
    ("rpcs", rpcs),
    ("requests", requests),
    ("processes", processes),
    ("server", server),
    ("netns", netns),
    ("observer", observer),
    ("state", state),
];

/// Snapshots of the proxy's state read from its memory: their cost, failures, what they
/// corrected in the event-built model and which of the proxy's own fields were found.
fn state(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let st = &i.model.state;
    r.level(
        "observer_state_readable",
        "1 if the proxy's state is read from its memory (its static symbol found); 0: apps_loaded and instances come from events only.",
        st.reading as i64,
    );
    r.total(
        "observer_state_snapshots_total",
        "Good snapshots of the proxy's state (every walk validated end to end).",
        st.snapshots,
    );
    let f = r.counter(
        "observer_state_snapshot_failures_total",
        "Snapshot walks that failed, by reason (torn/invalid/fault: the proxy changed what was read, retried; budget: the byte budget was spent; not_found: a field was not found).",
        &["reason"],
    );
    for reason in crate::snapshot::REASONS {
        f.with_label_values(&[reason])
            .inc_by(st.failures.get(reason).copied().unwrap_or(0));
    }
    r.gauge(
        "observer_state_snapshot_duration_seconds",
        "Time the last snapshot took (all its walks).",
        &[],
    )
    .with_label_values::<&str>(&[])
    .set(st.last_duration.as_secs_f64());
    r.level(
        "observer_state_snapshot_bytes",
        "Bytes of the proxy's memory the last snapshot read.",
        st.last_bytes as i64,
    );
    if let Some((_, t)) = i.latest {
        r.gauge(
            "observer_state_snapshot_age_seconds",
            "Age of the latest good snapshot.",
            &[],
        )
        .with_label_values::<&str>(&[])
        .set(i.now_ns.saturating_sub(*t) as f64 / 1e9);
    }
    let c = r.counter(
        "observer_state_corrections_total",
        "Differences between the event-built model and a snapshot, by kind (the snapshot wins): app_loaded/app_not_loaded (an app's presence in the app cache), instance_adopted (a pooled instance the events had not shown, e.g. spawned before the attach), instance_app_changed.",
        &["kind"],
    );
    let corr = &i.model.tracker.counters.snapshot_corrections;
    for kind in crate::tracker::CORRECTIONS {
        c.with_label_values(&[kind])
            .inc_by(corr.get(kind).copied().unwrap_or(0));
    }
    let l = &st.learnt;
    let learnt = r.int_gauge(
        "observer_state_layout_learnt",
        "1 for each of the proxy's own fields the snapshot walk has found (or the catalog gave).",
        &["field"],
    );
    for (field, v) in [
        ("scheduler_apps", l.sched_apps),
        ("scheduler_clients", l.sched_clients),
        ("app_id", l.app_id),
        ("app_ready_instances", l.app_ready),
        ("instance_handle", l.instance_handle),
        ("instance_runtime_id", l.instance_rtid),
        ("instance_size", l.instance_size),
    ] {
        learnt.with_label_values(&[field]).set(v.is_some() as i64);
    }
    Ok(())
}

/// The runtimes' served calls (runtime probes).
fn server(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    for c in i.model.server.collectors() {
        r.0.register(c)?;
    }
    r.total(
        "observer_unattributed_server_calls_total",
        "Calls served by a process that is no longer a watched runtime when its event arrived.",
        i.model.server.unattributed,
    );
    Ok(())
}

/// procfs readings and kernel socket counters of the proxy and the runtimes.
fn processes(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let l = &["role", "process"];
    let up = r.int_gauge("process_up", "1 while a process holds this instance name; 0 after it ended (kept 5 minutes, then retired).", l);
    let starts = r.counter(
        "process_starts_total",
        "Processes that held this instance name (1 + restarts seen).",
        l,
    );
    let cpu = r.seconds(
        "process_cpu_seconds_total",
        "CPU time by mode (/proc/<pid>/stat utime, stime), over every process of the instance.",
        &["role", "process", "mode"],
    );
    let switches = r.counter(
        "process_context_switches_total",
        "Context switches (/proc/<pid>/status), voluntary (waits) and involuntary (preempted).",
        &["role", "process", "kind"],
    );
    let rss = r.gauge("process_resident_memory_bytes", "Resident memory.", l);
    let vm = r.gauge("process_virtual_memory_bytes", "Virtual memory size.", l);
    let threads = r.gauge("process_threads", "Threads.", l);
    let fds = r.gauge("process_open_fds", "Open file descriptors.", l);
    let start = r.gauge(
        "process_start_time_seconds",
        "When the current process started (Unix time).",
        l,
    );
    let bytes = r.counter(
        "process_network_bytes_total",
        "TCP and UDP payload bytes the process sent and received on IPv4/IPv6 sockets, counted in the kernel (sock:sock_send_length, sock:sock_recv_length).",
        &["role", "process", "direction"],
    );
    let messages = r.counter(
        "process_network_messages_total",
        "Socket sends and receives that moved bytes (one read or write call each).",
        &["role", "process", "direction"],
    );
    for inst in i.model.watcher.instances() {
        let (role, name) = (inst.role.as_str(), inst.name.as_str());
        let lv = &[role, name];
        up.with_label_values(lv).set(inst.up() as i64);
        starts.with_label_values(lv).inc_by(inst.starts);
        let t = inst.totals();
        cpu.with_label_values(&[role, name, "user"])
            .inc_by(t.cpu_user_seconds);
        cpu.with_label_values(&[role, name, "system"])
            .inc_by(t.cpu_system_seconds);
        switches
            .with_label_values(&[role, name, "voluntary"])
            .inc_by(t.voluntary_switches);
        switches
            .with_label_values(&[role, name, "involuntary"])
            .inc_by(t.involuntary_switches);
        if let Some(s) = inst.current() {
            rss.with_label_values(lv).set(s.resident_bytes as f64);
            vm.with_label_values(lv).set(s.virtual_bytes as f64);
            threads.with_label_values(lv).set(s.threads as f64);
            fds.with_label_values(lv).set(s.open_fds as f64);
            start.with_label_values(lv).set(s.start_time_seconds);
        }
        let now = i.counters.proc_net(inst.slot)?;
        let base = i
            .model
            .net_base
            .get(&inst.slot)
            .copied()
            .unwrap_or_default();
        let v = |k: u32| now[k as usize].saturating_sub(base[k as usize]);
        bytes
            .with_label_values(&[role, name, "sent"])
            .inc_by(v(netstat::BYTES_SENT));
        bytes
            .with_label_values(&[role, name, "received"])
            .inc_by(v(netstat::BYTES_RECEIVED));
        messages
            .with_label_values(&[role, name, "sent"])
            .inc_by(v(netstat::MESSAGES_SENT));
        messages
            .with_label_values(&[role, name, "received"])
            .inc_by(v(netstat::MESSAGES_RECEIVED));
    }
    Ok(())
}

/// The network namespaces of the watched processes, whole (`/proc/<pid>/net/dev`): every
/// process in them counts here, not only the watched ones.
fn netns(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let mut spaces: BTreeMap<u64, u32> = BTreeMap::new();
    for inst in i.model.watcher.instances() {
        if let (Some(s), Some(pid)) = (inst.current(), inst.pid()) {
            spaces.entry(s.netns).or_insert(pid);
        }
    }
    let l = &["netns", "device", "direction"];
    let bytes = r.counter(
        "netns_network_bytes_total",
        "Bytes through each device of a watched process's network namespace (/proc/<pid>/net/dev: the whole namespace, every process in it).",
        l,
    );
    let packets = r.counter(
        "netns_network_packets_total",
        "Packets through each device of a watched process's network namespace (/proc/<pid>/net/dev).",
        l,
    );
    for (ns, pid) in spaces {
        let Ok(devs) = procfs::process::Process::new(pid as i32).and_then(|p| p.dev_status())
        else {
            continue;
        };
        let ns = ns.to_string();
        for (name, d) in devs {
            for (dir, b, p) in [
                ("received", d.recv_bytes, d.recv_packets),
                ("sent", d.sent_bytes, d.sent_packets),
            ] {
                bytes.with_label_values(&[&ns, &name, dir]).inc_by(b);
                packets.with_label_values(&[&ns, &name, dir]).inc_by(p);
            }
        }
    }
    Ok(())
}

/// Families withheld for want of a probe (`coverage`), each with the probe and its reason.
fn unavailable(i: &Inputs) -> Vec<crate::coverage::Unavailable> {
    use crate::coverage::Unavailable;
    let mut lost = probes_unavailable(i);
    let st = &i.model.state;
    let fresh = crate::snapshots::fresh(i.latest, i.now_ns, i.state_max_age_ns);
    let lose = |lost: &mut Vec<Unavailable>, family: &'static str, needs: &str, reason: String| {
        lost.retain(|u| u.family != family);
        lost.push(Unavailable {
            family,
            needs: needs.to_string(),
            reason,
        });
    };
    match (st.reading, fresh) {
        // The snapshot makes these, whatever probes are missing.
        (true, Some(s)) => {
            lost.retain(|u| !crate::coverage::FROM_SNAPSHOT.contains(&u.family));
            if s.ready_total().is_none() {
                lose(
                    &mut lost,
                    "app_ready_instances",
                    "state_layout",
                    crate::coverage::NOT_LEARNT.to_string(),
                );
            }
            if s.ready_total().is_none() || !s.instances_complete {
                lose(
                    &mut lost,
                    "runtime_ready_instances",
                    "state_layout",
                    crate::coverage::NOT_LEARNT.to_string(),
                );
            }
        }
        (true, None) => {
            let why = format!(
                "no good snapshot of the proxy's state in the last {} s",
                i.state_max_age_ns / 1_000_000_000
            );
            for family in crate::coverage::FROM_SNAPSHOT {
                lose(&mut lost, family, "state_snapshot", why.clone());
            }
        }
        // apps_loaded then comes from the events; the pools cannot be seen.
        (false, _) => {
            let why = st
                .unavailable
                .clone()
                .unwrap_or_else(|| "no proxy".to_string());
            for family in &crate::coverage::FROM_SNAPSHOT[1..] {
                lose(&mut lost, family, "state_snapshot", why.clone());
            }
        }
    }
    lost
}

/// Families withheld for want of a probe or a learnt relation.
fn probes_unavailable(i: &Inputs) -> Vec<crate::coverage::Unavailable> {
    let relations = i
        .model
        .requests
        .as_ref()
        .map(|q| q.learnt())
        .unwrap_or_default();
    let relations = relations.iter().map(|(name, learnt)| {
        let reason = if *learnt {
            ""
        } else {
            crate::coverage::NOT_LEARNT
        };
        (*name, reason)
    });
    crate::coverage::unavailable(
        i.probes
            .iter()
            .map(|p| (p.name.as_str(), p.reason))
            .chain(relations),
    )
}

pub fn render(i: &Inputs) -> String {
    let reg = Reg(Registry::new());
    let mut w = Writer::new();
    let lost = unavailable(i);
    w.withhold(lost.iter().map(|u| u.family).collect());
    let gone = reg.int_gauge(
        "observer_metric_unavailable",
        "1 for each metric family not exported because a probe it is made from is missing on this build, or a relation of the target's memory it needs is not learnt yet (needs: the first such; see rusty_workers_observer_probe_attached and _layout_learnt).",
        &["metric", "needs"],
    );
    for u in &lost {
        gone.with_label_values(&[&format!("{PREFIX}_{}", u.family), &u.needs])
            .set(1);
    }
    let ok = reg.int_gauge(
        "observer_collector_success",
        "1 if the collector's last scrape succeeded.",
        &["collector"],
    );
    let dur = reg.gauge(
        "observer_collector_duration_seconds",
        "Time the collector's last scrape took.",
        &["collector"],
    );
    for (name, collect) in COLLECTORS {
        let start = Instant::now();
        let res = collect(&reg, &mut w, i);
        if let Err(e) = &res {
            log::warn!("collector {name} failed: {e:#}");
        }
        ok.with_label_values(&[name]).set(res.is_ok() as i64);
        dur.with_label_values(&[name])
            .set(start.elapsed().as_secs_f64());
    }
    let mut out = w.finish();
    let withheld: Vec<String> = lost
        .iter()
        .map(|u| format!("{PREFIX}_{}", u.family))
        .collect();
    let mut families = reg.0.gather();
    families.retain(|f| !withheld.iter().any(|n| n == f.name()));
    TextEncoder::new()
        .encode_utf8(&families, &mut out)
        .expect("text encoding into a String cannot fail");
    out
}
