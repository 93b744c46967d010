//! The floor of the observer's cost, for `cargo xtask bench` (`observer --floor`): one empty
//! program on the one proxy function every proxied request calls (`runtime_rpc`, tarpc's
//! `Channel::call`, run by the request's fetch). What it costs is a uprobe trap alone, the least
//! any uprobe-based per-request metric can cost. `observer --floor-probe-set` puts it on both of
//! the default's request-path uprobes instead: what that probe set costs with no work.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};

#[uprobe]
pub fn floor_uprobe(_ctx: ProbeContext) -> u32 {
    0
}
