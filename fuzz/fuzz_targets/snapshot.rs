//! The snapshot walker over random memory: the proxy's state read from a process whose memory
//! is anything at all (freed, torn, hostile). It must end, within its budget, without a panic,
//! and never return what the bytes do not validate as.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::memory::Region;
use observer::snapshot::{Learnt, StateLayout, Target};
use observer_common::Layout;

fuzz_target!(|data: &[u8]| {
    // A region at a fixed base; its first word is where the static's Arc points (so that
    // the walk starts inside it), the rest is the walk's to interpret.
    let base = 0x10_0000u64;
    let mem = Region {
        base,
        bytes: data.to_vec(),
    };
    let mut t = Target::new(base, StateLayout::DEFAULT, Layout::DEFAULT, Learnt::default());
    for _ in 0..2 {
        if let Ok(s) = t.walk(&mem) {
            for a in &s.apps {
                assert!(!a.id.is_empty(), "an app without an id");
                assert!(a.ready.is_none_or(|n| n >= a.instances.len() as u64));
            }
        }
    }
});
