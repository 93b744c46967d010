//! The `apps` collector.

use super::{Inputs, Reg};
use crate::expo::{Kind, Writer};
use crate::model::tracker::AppStats;
use std::collections::BTreeMap;

/// The app cache and instances, a series per app: written directly (`expo`).
pub(super) fn collect(r: &Reg, w: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
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
