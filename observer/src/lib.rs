//! rusty-workers observer: attaches eBPF uprobes to a running, unmodified rusty-workers proxy
//! and serves Prometheus metrics about its apps, instances and runtime RPCs.

pub mod catalog;
pub mod coverage;
pub mod decode;
pub mod expo;
pub mod kernel;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod procs;
pub mod resolve;
pub mod snapshot;
pub mod snapshots;
pub mod sockets;
pub mod symbols;
pub mod target;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which stamps the events.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
