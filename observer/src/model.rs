//! What the observer knows, in one place: the model the event loop updates and every scrape
//! reads (`metrics::Inputs` borrows it whole).

use crate::{procs, requests, snapshots, tracker};
use observer_common::netstat;
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
    pub server: crate::runtime_server::ServerMetrics,
    /// How long the last attach to a proxy and to a runtime took (symbols read and resolved,
    /// uprobes attached).
    pub attach_seconds: std::collections::BTreeMap<&'static str, f64>,
    /// Snapshots of the proxy's state: their cost, failures and the latest.
    pub state: snapshots::Stats,
}
