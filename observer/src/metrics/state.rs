//! The `state` collector.

use super::{Inputs, Reg};
use crate::expo::Writer;

/// Snapshots of the proxy's state read from its memory: their cost, failures, what they
/// corrected in the event-built model and which of the proxy's own fields were found.
pub(super) fn collect(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
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
    for kind in crate::model::tracker::CORRECTIONS {
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
