//! What the joins count: per app (written directly, `expo`) and per runtime.

use super::OUTCOMES;
use crate::expo::{Hist, Kind, Writer, LATENCY_BUCKETS, PREFIX};
use crate::model::labelled::RuntimeMethodHistograms;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use std::collections::BTreeMap;

/// What the joins count per app (`expo` writes it: with 1,000 apps these are most of a
/// scrape).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppRequests {
    /// From hyper handing the request to the proxy to its response head.
    pub duration: Hist,
    /// Answered `spawn_worker` RPCs.
    pub spawn: Hist,
    /// Responses by outcome (`OUTCOMES`' order).
    pub responses: [u64; OUTCOMES.len()],
    /// Requests by start (`STARTS`' order).
    pub starts: [u64; STARTS.len()],
}

pub const STARTS: &[&str] = &["cold", "warm"];

/// The metrics this module keeps (persistent: histograms cannot be rebuilt per scrape).
pub struct Metrics {
    pub apps: BTreeMap<String, AppRequests>,
    pub rpc_duration: RuntimeMethodHistograms,
    pub rpc_failures: IntCounterVec,
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(format!("{PREFIX}_{name}"), help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels).expect("valid counter")
}

impl Metrics {
    pub(super) fn new() -> Self {
        Metrics {
            apps: BTreeMap::new(),
            rpc_duration: RuntimeMethodHistograms::new(histogram(
                "runtime_rpc_duration_seconds",
                "Runtime RPCs answered, by runtime (its address) and method, from the call to the answer.",
                &["runtime", "method"],
            )),
            rpc_failures: counter(
                "runtime_rpc_failures_total",
                "Runtime RPCs that failed, by runtime, method and reason: error_answer (the method's own error), server_error (tarpc's), connection_reset (the connection ended while waiting), no_answer (given up without an answer: deadline, connection already gone, or the caller went away).",
                &["runtime", "method", "reason"],
            ),
        }
    }

    /// The per-runtime families (few series: through the prometheus crate).
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.rpc_duration.vec().clone()),
            Box::new(self.rpc_failures.clone()),
        ]
    }

    pub(super) fn app(&mut self, app: &str) -> &mut AppRequests {
        if !self.apps.contains_key(app) {
            self.apps.insert(app.to_string(), AppRequests::default());
        }
        self.apps.get_mut(app).expect("just inserted")
    }

    /// Writes the per-app families.
    pub fn write(&self, w: &mut Writer) {
        w.family(
            "app_request_duration_seconds",
            Kind::Histogram,
            "Requests by app, from hyper handing the request to the proxy to its response head (app=\"\": no app, e.g. no route).",
        );
        for (app, a) in &self.apps {
            if a.duration.count() > 0 {
                w.histogram(&[("app", app)], &a.duration);
            }
        }
        w.family(
            "app_responses_total",
            Kind::Counter,
            "Requests answered, by app and outcome: ok, execution_error, no_route, no_instance, retries_exhausted, body_too_large, internal_error.",
        );
        for (app, a) in &self.apps {
            for (o, n) in OUTCOMES.iter().zip(a.responses) {
                if n > 0 {
                    w.int(&[("app", app), ("outcome", o)], n);
                }
            }
        }
        w.family(
            "app_request_starts_total",
            Kind::Counter,
            "Requests by app that had to spawn an instance (start=cold) or were served by a ready one (start=warm); a request that got no instance is neither.",
        );
        for (app, a) in &self.apps {
            for (st, n) in STARTS.iter().zip(a.starts) {
                if n > 0 {
                    w.int(&[("app", app), ("start", st)], n);
                }
            }
        }
        w.family(
            "app_spawn_duration_seconds",
            Kind::Histogram,
            "spawn_worker RPCs answered, by app: the instance cold-start cost.",
        );
        for (app, a) in &self.apps {
            if a.spawn.count() > 0 {
                w.histogram(&[("app", app)], &a.spawn);
            }
        }
    }
}
