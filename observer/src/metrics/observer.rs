//! The `observer` collector.

use super::{Inputs, Reg};
use crate::expo::{Writer, PREFIX};
use crate::procs::Role;
use observer_common::program;

/// The observer's own health: probes attached (and why not), events received and lost, BPF
/// program runs and time, attach durations, the processes it watches.
pub(super) fn collect(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
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
        "observer_wire_resyncs_total",
        "Socket calls on a tarpc connection to a runtime the kernel could not follow frame by frame (it starts again at the next call).",
        i.counters.wire_resyncs()?,
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
        "Runs of each eBPF program, counted by the program.",
        &["program"],
    );
    for (name, n) in program::NAMES.iter().zip(i.counters.program_runs()?) {
        runs.with_label_values(&[name]).inc_by(n);
    }
    r.level(
        "observer_bpf_stats_enabled",
        "1 while the kernel keeps BPF run-time statistics (--bpf-stats, or kernel.bpf_stats_enabled): observer_bpf_program_run_seconds_total is exported only then.",
        i.programs.is_some() as i64,
    );
    if let Some(programs) = i.programs {
        let secs = r.seconds(
            "observer_bpf_program_run_seconds_total",
            "Time spent in each eBPF program (kernel BPF stats; the uprobe trap itself is not included).",
            &["program"],
        );
        for p in programs {
            secs.with_label_values(&[&p.program]).inc_by(p.run_seconds);
        }
    }
    Ok(())
}
