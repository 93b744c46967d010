//! A stream of ring buffer records, as a buggy or hostile kernel side could send them, through
//! the whole userspace pipeline: decoding, the app tracker, the request joins (with the
//! memory copies response heads carry), and the per-app exposition.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::{decode, expo, requests, tracker};
use observer_common::{ConnSnapshot, Event, Layout};

fuzz_target!(|data: &[u8]| {
    let mut tracker = tracker::Tracker::new(tracker::Config {
        max_apps: 8,
        ..Default::default()
    });
    let mut joins = requests::Requests::new(Layout::DEFAULT);
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
        let Ok(ev) = decode::event(rec) else {
            continue;
        };
        let snap = decode::snapshot(rec, &ev);
        if let Ok(d) = decode::decode_event(&ev) {
            tracker.apply(d);
        }
        let mem: &dyn requests::Memory = match &snap {
            Some(s) => s,
            None => &requests::NoMemory,
        };
        joins.apply(&ev, &tracker, mem);
        for h in joins.take_discarded() {
            tracker.discard(&h, 0);
        }
        let _ = joins.take_conn_key();
        let _ = tracker.take_map_ops();
        tracker.housekeeping(ev.ktime_ns);
        joins.housekeeping(ev.ktime_ns);
        joins.prune_placed(&tracker, ev.ktime_ns);
    }
    let mut w = expo::Writer::new();
    joins.metrics.write(&mut w);
    let _ = joins.instances_by_runtime(&tracker);
    let _ = w.finish();
});
