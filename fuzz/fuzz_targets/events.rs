//! A stream of ring buffer records, as a buggy or hostile kernel side could send them, through
//! the whole userspace pipeline: the daemon's `Model::apply` (decoding, the app tracker, the
//! request joins with the memory copies response heads carry, the runtimes' served calls),
//! and the per-app exposition.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::model::{self, requests, tracker};
use observer::{decode, expo, procs};
use observer_common::{ConnSnapshot, Event, Layout};

fuzz_target!(|data: &[u8]| {
    // The daemon's own model, fed the way its drain feeds it (`Model::apply`).
    let mut model = model::Model::new(
        tracker::Tracker::new(tracker::Config {
            max_apps: 8,
            ..Default::default()
        }),
        Some(requests::Requests::new(Layout::DEFAULT)),
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
        // The first byte picks a plain event or one with a snapshot, as the two sizes the
        // kernel sends; a short tail is a cut record.
        let big = rest[0] & 1 == 1;
        rest = &rest[1..];
        let size = if big {
            std::mem::size_of::<ConnSnapshot>()
        } else {
            std::mem::size_of::<Event>()
        };
        let (rec, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        let ktime_ns = decode::event(rec).map(|ev| ev.ktime_ns).unwrap_or(0);
        model.apply(rec, ktime_ns);
        let m = &mut model;
        let joins = m.requests.as_mut().expect("request metrics on");
        let _ = joins.take_conn_key();
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
