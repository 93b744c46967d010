//! The runtimes' side of the RPCs: the calls each runtime served, from the tarpc frames on its
//! connections (`observer-ebpf/src/wire.rs`, followed in the runtime's socket tracepoints): a
//! request received opens a call, its response sent closes it. With `--runtime-polls`, the
//! poll uprobes (`observer-ebpf/src/server.rs`) also count each call's polls.

use crate::expo::{LATENCY_BUCKETS, PREFIX};
use crate::model::labelled::RuntimeMethodHistograms;
use crate::model::requests::wire::{decode_answer, decode_sent, Sent};
use foldhash::{HashMap, HashMapExt};
use observer_common::{method, wire};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Requests received and not yet answered, past which the oldest go: a runtime answers every
/// call it does not see cancelled, and a connection's end drops its calls, so only a frame
/// lost to a resync leaves one behind.
const MAX_OPEN: usize = 65_536;

/// A request a runtime received, until its response goes out.
#[derive(Debug, Clone, Copy)]
struct Open {
    method: u32,
    received_ns: u64,
}

/// Persistent (histograms cannot be rebuilt per scrape).
pub struct ServerMetrics {
    pub duration: RuntimeMethodHistograms,
    pub polls: IntCounterVec,
    /// Calls from a process that is not a watched runtime (it ended meanwhile).
    pub unattributed: u64,
    /// Frames on a runtime's connection whose head did not decode as tarpc's.
    pub undecoded_frames: u64,
    /// Responses to no request seen: received before the attach, or cancelled.
    pub unmatched_responses: u64,
    /// (connection in the runtime, request id) -> the call.
    open: HashMap<(u64, u64), Open>,
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
            duration: RuntimeMethodHistograms::new(
                HistogramVec::new(
                HistogramOpts::new(
                    format!("{PREFIX}_runtime_server_call_duration_seconds"),
                    "Calls the runtime answered, by method: from its request's arrival on the runtime's connection to its response's sending (the runtime's socket tracepoints; a cancelled call has no response and is not counted).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric"),
            ),
            polls: IntCounterVec::new(
                Opts::new(
                    format!("{PREFIX}_runtime_server_polls_total"),
                    "Polls of the method futures of the calls the runtime served, answered or cancelled (a poll per wake-up: an await that had to wait adds one). Only with --runtime-polls.",
                ),
                labels,
            )
            .expect("valid metric"),
            unattributed: 0,
            undecoded_frames: 0,
            unmatched_responses: 0,
            open: HashMap::new(),
        }
    }

    /// A tarpc frame on a connection of the runtime named `runtime` (None: not a watched
    /// runtime), `direction` from the runtime's side: a request received opens a call, a
    /// cancel drops it, a response sent closes it.
    pub fn frame(
        &mut self,
        runtime: Option<&str>,
        sock: u64,
        direction: u32,
        head: &[u8],
        ktime_ns: u64,
    ) {
        if direction == wire::RECEIVED {
            match decode_sent(head) {
                Some(Sent::Request {
                    request_id, method, ..
                }) => {
                    if self.open.len() >= MAX_OPEN {
                        self.drop_oldest();
                    }
                    self.open.insert(
                        (sock, request_id),
                        Open {
                            method,
                            received_ns: ktime_ns,
                        },
                    );
                }
                Some(Sent::Cancel { request_id, .. }) => {
                    self.open.remove(&(sock, request_id));
                }
                None => self.undecoded_frames += 1,
            }
            return;
        }
        let Some(answer) = decode_answer(head) else {
            self.undecoded_frames += 1;
            return;
        };
        let Some(open) = self.open.remove(&(sock, answer.request_id)) else {
            self.unmatched_responses += 1;
            return;
        };
        let Some(runtime) = runtime else {
            self.unattributed += 1;
            return;
        };
        self.duration.observe(
            runtime,
            open.method,
            ktime_ns.saturating_sub(open.received_ns) as f64 / 1e9,
        );
    }

    /// The runtime's connection `sock` ended: its unanswered calls will not be answered.
    pub fn connection_ended(&mut self, sock: u64) {
        self.open.retain(|(s, _), _| *s != sock);
    }

    /// A call's future was dropped after `polls` polls (`--runtime-polls`).
    pub fn polled(&mut self, runtime: Option<&str>, m: u32, polls: u64) {
        let Some(runtime) = runtime else {
            self.unattributed += 1;
            return;
        };
        self.polls
            .with_label_values(&[runtime, method::name(m)])
            .inc_by(polls);
    }

    fn drop_oldest(&mut self) {
        let mut ages: Vec<u64> = self.open.values().map(|o| o.received_ns).collect();
        let half = ages.len() / 2;
        let (_, cut, _) = ages.select_nth_unstable(half);
        let cut = *cut;
        self.open.retain(|_, o| o.received_ns > cut);
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.duration.vec().clone()),
            Box::new(self.polls.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::requests::wire::encode;

    const RT: Option<&str> = Some("127.0.0.1:1");

    fn count(m: &ServerMetrics, method: &str) -> u64 {
        m.duration
            .vec()
            .with_label_values(&["127.0.0.1:1", method])
            .get_sample_count()
    }

    #[test]
    fn a_request_received_and_its_response_sent_are_one_call() {
        let mut m = ServerMetrics::new();
        let fetch = encode::request(7, 1, method::FETCH, None);
        m.frame(RT, 0xa, wire::RECEIVED, &fetch, 1_000_000);
        m.frame(
            RT,
            0xa,
            wire::SENT,
            &encode::answer(1, method::FETCH, &[0, 1, 2]),
            4_000_000,
        );
        let h = m
            .duration
            .vec()
            .with_label_values(&["127.0.0.1:1", "fetch"]);
        assert_eq!(h.get_sample_count(), 1, "one fetch served");
        assert!(
            (h.get_sample_sum() - 0.003).abs() < 1e-9,
            "3 ms from request to response: {}",
            h.get_sample_sum()
        );
        // The same request id on another connection is another call.
        m.frame(
            RT,
            0xb,
            wire::SENT,
            &encode::answer(1, method::FETCH, &[0, 1, 2]),
            5_000_000,
        );
        assert_eq!(count(&m, "fetch"), 1, "a response to no request seen");
        assert_eq!(m.unmatched_responses, 1);
        assert!(m.open.is_empty());
    }

    #[test]
    fn cancelled_unattributed_and_ended_calls_are_not_counted() {
        let mut m = ServerMetrics::new();
        let req = |id| encode::request(9, id, method::FETCH, Some(3));
        let ok = |id| encode::answer(id, method::FETCH, &[0, 1, 2]);
        m.frame(RT, 0xa, wire::RECEIVED, &req(1), 10);
        m.frame(RT, 0xa, wire::RECEIVED, &encode::cancel(9, 1), 20);
        m.frame(RT, 0xa, wire::SENT, &ok(1), 30);
        assert_eq!(count(&m, "fetch"), 0, "a cancelled call has no response");
        m.frame(RT, 0xa, wire::RECEIVED, &req(2), 40);
        m.connection_ended(0xa);
        m.frame(RT, 0xa, wire::SENT, &ok(2), 50);
        assert_eq!(count(&m, "fetch"), 0, "its connection ended first");
        m.frame(None, 0xc, wire::RECEIVED, &req(3), 60);
        m.frame(None, 0xc, wire::SENT, &ok(3), 70);
        assert_eq!(m.unattributed, 1);
        assert_eq!(
            m.unmatched_responses, 2,
            "the cancelled call's and the ended one's"
        );
        m.frame(RT, 0xc, wire::RECEIVED, b"GET / HTTP/1.1", 80);
        assert_eq!(m.undecoded_frames, 1);
    }

    #[test]
    fn unanswered_requests_stay_bounded() {
        let mut m = ServerMetrics::new();
        for id in 0..(MAX_OPEN as u64 + 10) {
            let req = encode::request(1, id, method::ID, None);
            m.frame(RT, 0xa, wire::RECEIVED, &req, id);
        }
        assert!(m.open.len() <= MAX_OPEN, "{} open", m.open.len());
        let last = MAX_OPEN as u64 + 9;
        m.frame(
            RT,
            0xa,
            wire::SENT,
            &encode::answer(last, method::ID, &encode::string(b"rt")),
            last + 5,
        );
        assert_eq!(count(&m, "id"), 1, "the newest request is kept");
    }

    #[test]
    fn polls_count_per_method() {
        let mut m = ServerMetrics::new();
        m.polled(RT, method::FETCH, 2);
        m.polled(RT, method::FETCH, 1);
        m.polled(None, method::FETCH, 1);
        m.polled(RT, 99, 1);
        assert_eq!(
            m.polls.with_label_values(&["127.0.0.1:1", "fetch"]).get(),
            3
        );
        assert_eq!(
            m.polls.with_label_values(&["127.0.0.1:1", "unknown"]).get(),
            1
        );
        assert_eq!(m.unattributed, 1);
    }
}
