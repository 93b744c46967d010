//! The `requests` collector.

use super::{Inputs, Reg};
use crate::expo::Writer;

/// Request metrics (per app: responses by outcome, latency, cold/warm starts; per runtime:
/// RPC latency and failures) and the joins' own counts; absent with `--no-request-metrics`.
pub(super) fn collect(r: &Reg, w: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
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
        "RPC answers and cancels whose call was not seen (in flight at attach) or not matched.",
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
        "observer_undecoded_frames_total",
        "Frames on a runtime connection, in the proxy or the runtime, whose head did not decode as tarpc's.",
        c.undecoded_frames + i.model.server.undecoded_frames,
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
        "observer_parked_responses",
        "Responses answered and not counted yet: their worker's app is known once the app tracker pairs its spawn.",
        q.parked_responses() as i64,
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
