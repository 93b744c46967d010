//! End to end, for real: the test target runs, the observer attaches its uprobes to the test
//! proxy, load flows, and every metric must EQUAL the proxy's own ground truth.
//!
//! Needs root (eBPF) and the release build of the test target (`cargo xtask test`).

mod apps;
mod builds;
mod faults;
mod fixture;
mod labels;
mod processes;
mod requests;
mod state;
