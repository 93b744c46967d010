//! What the observer knows, in one place: the model the event loop updates and every scrape
//! reads (`metrics::Inputs` borrows it whole). `Model::apply` routes each event to the app
//! tracker (`tracker`: apps, workers, labels), the request joins (`requests`: the proxy's
//! side) or the runtimes' served calls (`runtime_server`: their side of the same wire).

pub mod labelled;
pub mod requests;
pub mod runtime_server;
pub mod tracker;

use crate::{decode, procs, snapshots};
use observer_common::{netstat, role, Kind};
use std::collections::HashMap;

/// The daemon's model, behind one lock.
pub struct Model {
    pub tracker: tracker::Tracker,
    pub requests: Option<requests::Requests>,
    pub events_received: u64,
    pub decode_errors: u64,
    pub watcher: procs::Watcher,
    /// Kernel socket counters of a slot when its instance took it (a retired instance's slot
    /// is reused).
    pub net_base: HashMap<u32, [u64; netstat::COUNT as usize]>,
    /// Time of one watcher tick (the procfs collector).
    pub procs_seconds: f64,
    pub server: runtime_server::ServerMetrics,
    /// How long the last attach to a proxy and to a runtime took (symbols read and resolved,
    /// uprobes attached).
    pub attach_seconds: std::collections::BTreeMap<&'static str, f64>,
    /// Snapshots of the proxy's state: their cost, failures and the latest.
    pub state: snapshots::Stats,
}

impl Model {
    /// An empty model: `requests` is `None` with `--no-request-metrics`.
    pub fn new(
        tracker: tracker::Tracker,
        requests: Option<requests::Requests>,
        watcher: procs::Watcher,
    ) -> Self {
        Model {
            tracker,
            requests,
            events_received: 0,
            decode_errors: 0,
            watcher,
            net_base: HashMap::new(),
            procs_seconds: 0.0,
            server: runtime_server::ServerMetrics::new(),
            attach_seconds: Default::default(),
            state: Default::default(),
        }
    }

    /// Applies one ring buffer record: decoded once, then handed to the part of the model it
    /// concerns (the runtimes' served calls, the app tracker, the request joins). `now_ns`
    /// stands for when a worker the joins let go was let go (not in the event; see
    /// `Tracker::discard`). An undecodable record is counted and dropped.
    pub fn apply(&mut self, rec: &[u8], now_ns: u64) {
        self.events_received += 1;
        let r = match decode::record(rec) {
            Ok(r) => r,
            Err(e) => {
                self.decode_errors += 1;
                log::debug!("undecodable event: {e}");
                return;
            }
        };
        match &r {
            decode::Record::ServerCall(c) => {
                let runtime = self.watcher.instance_of(c.tgid).map(|i| i.name.as_str());
                self.server.polled(runtime, c.method, c.polls);
                return;
            }
            // A runtime's end of its connections: the calls it served.
            decode::Record::Wire(kind, w) if w.role == role::RUNTIME => {
                if *kind == Kind::WireEnd {
                    self.server.connection_ended(w.sock);
                } else {
                    let runtime = self.watcher.instance_of(w.tgid).map(|i| i.name.as_str());
                    let head = &w.head[..(w.head_len as usize).min(w.head.len())];
                    self.server
                        .frame(runtime, w.sock, w.direction, head, w.header.ktime_ns);
                }
                return;
            }
            _ => {}
        }
        if let Some(d) = decode::decode_event(&r) {
            if let (decode::Decoded::Terminate { handle, .. }, Some(q)) =
                (&d, self.requests.as_mut())
            {
                q.forget_worker(handle);
            }
            self.tracker.apply(d);
            // Workers whose fetches waited name the requests on them now.
            let late = self.tracker.take_paired_late();
            if let Some(q) = self.requests.as_mut() {
                for (worker, app) in &late {
                    q.paired_late(worker, app);
                }
            }
        }
        if let Some(q) = self.requests.as_mut() {
            let Some(ev) = decode::request_event(&r) else {
                return;
            };
            q.apply(ev, &self.tracker);
            for h in q.take_discarded() {
                self.tracker.discard(&h, now_ns);
            }
        }
    }
}
