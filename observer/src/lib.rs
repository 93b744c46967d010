//! rusty-workers observer: attaches eBPF uprobes to a running, unmodified rusty-workers proxy
//! and serves Prometheus metrics about its apps, instances and runtime RPCs.

pub mod catalog;
pub mod coverage;
pub mod decode;
pub mod expo;
pub mod kernel;
pub mod memory;
pub mod metrics;
pub mod procs;
pub mod requests;
pub mod resolve;
pub mod server;
pub mod symbols;
pub mod target;
pub mod tracker;
