//! A stream of ring buffer records, as a buggy or hostile kernel side could send them, through
//! the whole userspace pipeline: the daemon's `Model::apply` (decoding, the app tracker, the
//! request joins with the memory copies response heads carry, the runtimes' served calls),
//! and the per-app exposition.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::model::{self, requests, tracker};
use observer::{decode, expo, procs};
use observer_common::event;
use std::mem::size_of;

/// The sizes the kernel sends: each record type's.
const SIZES: [usize; 7] = [
    size_of::<event::CacheOp>(),
    size_of::<event::RpcCall>(),
    size_of::<event::HttpRequest>(),
    size_of::<event::HttpResponse>(),
    size_of::<event::SchedError>(),
    size_of::<event::WireFrame>(),
    size_of::<event::ServerCall>(),
];

fuzz_target!(|data: &[u8]| {
    // The daemon's own model, fed the way its drain feeds it (`Model::apply`).
    let mut model = model::Model::new(
        tracker::Tracker::new(tracker::Config {
            max_apps: 8,
            ..Default::default()
        }),
        Some(requests::Requests::new()),
        procs::Watcher::new(procs::Config {
            proxy_pid: None,
            proxy_exe: None,
            runtime_exe: "rusty-workers-runtime".into(),
            runtime_pids: Vec::new(),
            runtime_peers: false,
        }),
    );
    let mut rest = data;
    while !rest.is_empty() {
        // The first byte picks one of the record sizes the kernel sends (the record's own
        // header may name another kind); a short tail is a cut record.
        let size = SIZES[rest[0] as usize % SIZES.len()];
        rest = &rest[1..];
        let (rec, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        let ktime_ns = decode::record(rec).map(|r| r.ktime_ns()).unwrap_or(0);
        model.apply(rec, ktime_ns);
        let m = &mut model;
        let joins = m.requests.as_mut().expect("request metrics on");
        let _ = m.tracker.take_map_ops();
        m.tracker.housekeeping(ktime_ns);
        joins.housekeeping(ktime_ns);
        joins.prune_placed(&m.tracker, ktime_ns);
    }
    let mut w = expo::Writer::new();
    let joins = model.requests.as_ref().expect("request metrics on");
    joins.metrics.write(&mut w);
    let _ = joins.instances_by_runtime(&model.tracker);
    let _ = w.finish();
});
