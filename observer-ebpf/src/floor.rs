//! The floor of the observer's cost, for `cargo xtask bench`: programs that do nothing,
//! attached where the real ones are (`observer --floor`). What they cost is the uprobe trap and
//! the tracepoint's call alone, which no program can go below.

use aya_ebpf::{
    macros::{btf_tracepoint, uprobe},
    programs::{BtfTracePointContext, ProbeContext},
};

#[uprobe]
pub fn floor_uprobe(_ctx: ProbeContext) -> u32 {
    0
}

/// A BTF tracepoint program is verified for one event: one floor program per socket event.
#[btf_tracepoint(function = "sock_send_length")]
pub fn floor_sock_send(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn floor_sock_recv(_ctx: BtfTracePointContext) -> i32 {
    0
}
