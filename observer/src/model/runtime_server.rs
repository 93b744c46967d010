//! The runtimes' side of the RPCs: calls of the tarpc server methods, from the runtime probes
//! (`observer-ebpf/src/server.rs`).

use crate::expo::{LATENCY_BUCKETS, PREFIX};
use observer_common::method;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Persistent (histograms cannot be rebuilt per scrape).
pub struct ServerMetrics {
    pub duration: HistogramVec,
    pub polls: IntCounterVec,
    /// Calls from a process that is not a watched runtime (it ended meanwhile).
    pub unattributed: u64,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        let labels = &["runtime", "method"];
        ServerMetrics {
            duration: HistogramVec::new(
                HistogramOpts::new(
                    format!("{PREFIX}_runtime_server_call_duration_seconds"),
                    "Calls the runtime served, by method: from the first poll of the method's future to its drop (the runtime probes; a call counts once however often it is polled).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric"),
            polls: IntCounterVec::new(
                Opts::new(
                    format!("{PREFIX}_runtime_server_polls_total"),
                    "Polls of the method futures of the calls counted (a poll per wake-up: an await that had to wait adds one).",
                ),
                labels,
            )
            .expect("valid metric"),
            unattributed: 0,
        }
    }

    /// A call ended in the runtime named `runtime` (None: not a watched runtime).
    pub fn observe(&mut self, runtime: Option<&str>, m: u32, duration_ns: u64, polls: u64) {
        let Some(runtime) = runtime else {
            self.unattributed += 1;
            return;
        };
        let name = method::NAMES[(m.min(method::UNKNOWN)) as usize];
        self.duration
            .with_label_values(&[runtime, name])
            .observe(duration_ns as f64 / 1e9);
        self.polls.with_label_values(&[runtime, name]).inc_by(polls);
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.duration.clone()),
            Box::new(self.polls.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_count_once_with_their_polls() {
        let mut m = ServerMetrics::new();
        m.observe(Some("127.0.0.1:1"), method::FETCH, 3_000_000, 2);
        m.observe(Some("127.0.0.1:1"), method::FETCH, 1_000_000, 1);
        m.observe(None, method::FETCH, 1, 1);
        m.observe(Some("127.0.0.1:1"), 99, 1, 1);
        let h = m.duration.with_label_values(&["127.0.0.1:1", "fetch"]);
        assert_eq!(h.get_sample_count(), 2);
        assert!((h.get_sample_sum() - 0.004).abs() < 1e-9);
        assert_eq!(
            m.polls.with_label_values(&["127.0.0.1:1", "fetch"]).get(),
            3
        );
        assert_eq!(m.unattributed, 1);
        assert_eq!(
            m.duration
                .with_label_values(&["127.0.0.1:1", "unknown"])
                .get_sample_count(),
            1
        );
    }
}
