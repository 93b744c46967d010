//! Renders the Prometheus exposition from the tracker, the kernel's counters and the probes.
//!
//! Built fresh on every scrape from the current state (as ebpf_exporter does), so a series
//! never outlives what it describes and counters come straight from their source.

mod apps;
mod netns;
mod observer;
mod processes;
mod requests;
mod rpcs;
mod runtime_server;
mod state;

use crate::expo::{Writer, PREFIX};
use crate::kernel::{Counters, ProbeStatus, ProgramStats};
use crate::model::Model;
use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::time::Instant;

pub(crate) const NO_LABELS: &[&str] = &[];

/// Everything a scrape reads.
pub struct Inputs<'a> {
    /// The model the event loop keeps.
    pub model: &'a Model,
    pub counters: &'a Counters,
    pub probes: &'a [ProbeStatus],
    /// Each program's run time, while the kernel keeps BPF statistics (`--bpf-stats`).
    pub programs: Option<&'a [ProgramStats]>,
    /// The latest good snapshot of the proxy's state, with when its walk began.
    pub latest: Option<&'a (crate::snapshot::Snapshot, u64)>,
    /// A snapshot older than this is not exported.
    pub state_max_age_ns: u64,
    pub now_ns: u64,
}

pub(crate) struct Reg(Registry);

impl Reg {
    pub(crate) fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }
    /// A counter of seconds (a float).
    pub(crate) fn seconds(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        let c = CounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }
    pub(crate) fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(g.clone())).expect("unique metric");
        g
    }
    /// An unlabelled counter, set to `value`.
    pub(crate) fn total(&self, name: &str, help: &str, value: u64) {
        self.counter(name, help, NO_LABELS)
            .with_label_values(NO_LABELS)
            .inc_by(value);
    }
    /// An unlabelled integer gauge, set to `value`.
    pub(crate) fn level(&self, name: &str, help: &str, value: i64) {
        self.int_gauge(name, help, NO_LABELS)
            .with_label_values(NO_LABELS)
            .set(value);
    }
    pub(crate) fn int_gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
            .expect("valid metric");
        self.0.register(Box::new(g.clone())).expect("unique metric");
        g
    }
}

/// One concern's metrics, timed and reported like node_exporter's collectors.
type Collector = fn(&Reg, &mut Writer, &Inputs) -> anyhow::Result<()>;

/// Every collector, by the name its self-metrics carry; one file each.
const COLLECTORS: &[(&str, Collector)] = &[
    ("apps", apps::collect),
    ("rpcs", rpcs::collect),
    ("requests", requests::collect),
    ("processes", processes::collect),
    ("server", runtime_server::collect),
    ("netns", netns::collect),
    ("observer", observer::collect),
    ("state", state::collect),
];

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
