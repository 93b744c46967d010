//! The floor of the observer's cost, for `cargo xtask bench`: programs that do nothing,
//! attached where the real ones are (`observer --floor`). What they cost is the uprobe trap and
//! the tracepoint's call alone, which no program can go below.

use aya_ebpf::{
    macros::{tracepoint, uprobe},
    programs::{ProbeContext, TracePointContext},
};

#[uprobe]
pub fn floor_uprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[tracepoint]
pub fn floor_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}
