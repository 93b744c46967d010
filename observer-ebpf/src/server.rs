//! The runtime's side of the RPCs, poll by poll (`--runtime-polls`): rusty-workers' tarpc
//! server methods. A served call's duration comes from the runtime's wire (`wire.rs`), at no
//! trap; these uprobes (two traps per call) only count how often each call's future was polled.
//!
//! With `#[tarpc::server]` each method's body is an async block, boxed as the method's future
//! (`Pin<Box<dyn Future>>`). Its poll function, `<RuntimeServer as RuntimeService>::<method>
//! ::{{closure}}`, runs once per poll, not per call; its drop glue,
//! `drop_in_place::<…::<method>::{{closure}}>`, runs once per call, through the box's vtable
//! (so it is never inlined). A call is the future's life: its first poll opens it, keyed by
//! the future's address, and its drop closes it. Identical drop glue of two methods may be
//! folded into one function by the linker: the method comes from the poll, whose functions
//! are distinct, through the attach cookie (the method's number, `observer_common::method`).

use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    macros::{map, uprobe},
    maps::LruHashMap,
    programs::ProbeContext,
    EbpfContext as _,
};
use observer_common::{event::ServerCall, program, Kind};

use crate::{check, send};

/// An open call: its method (from its first poll) and its polls so far.
#[repr(C)]
#[derive(Clone, Copy)]
struct Open {
    method: u32,
    polls: u32,
}

/// (tgid, future address) -> open call. LRU: a future never dropped (a runtime killed
/// mid-call) ages out instead of filling the map.
#[map]
static SERVER_OPEN: LruHashMap<[u64; 2], Open> = LruHashMap::with_max_entries(16384, 0);

/// A poll function whose future is its first argument (its `Poll<T>` fits in registers).
#[uprobe]
pub fn server_poll(ctx: ProbeContext) -> u32 {
    let r = ctx
        .arg(0)
        .ok_or(1i64)
        .and_then(|fut| try_server_poll(&ctx, fut));
    check(&ctx, program::SERVER_POLL, r);
    0
}

/// A poll function that returns its `Poll<T>` through an sret slot in the first argument: the
/// future is the second.
#[uprobe]
pub fn server_poll_sret(ctx: ProbeContext) -> u32 {
    let r = ctx
        .arg(1)
        .ok_or(1i64)
        .and_then(|fut| try_server_poll(&ctx, fut));
    check(&ctx, program::SERVER_POLL_SRET, r);
    0
}

#[uprobe]
pub fn server_drop(ctx: ProbeContext) -> u32 {
    let r = try_server_drop(&ctx);
    check(&ctx, program::SERVER_DROP, r);
    0
}

fn try_server_poll(ctx: &ProbeContext, fut: u64) -> Result<(), i64> {
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let method = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let key = [bpf_get_current_pid_tgid() >> 32, fut];
    if let Some(open) = SERVER_OPEN.get_ptr_mut(key) {
        // SAFETY: a map value; a racing update only miscounts a poll.
        unsafe { (*open).polls += 1 };
        return Ok(());
    }
    let open = Open {
        method: method as u32,
        polls: 1,
    };
    SERVER_OPEN.insert(key, open, 0)?;
    Ok(())
}

fn try_server_drop(ctx: &ProbeContext) -> Result<(), i64> {
    let fut: u64 = ctx.arg(0).ok_or(1i64)?;
    let tgid = bpf_get_current_pid_tgid() >> 32;
    let key = [tgid, fut];
    // A drop with no poll is some other value whose drop glue was folded with a method's, or
    // a future dropped before it ran: not a call.
    // SAFETY: copied out before the entry is removed.
    let Some(open) = (unsafe { SERVER_OPEN.get(key) }).copied() else {
        return Ok(());
    };
    let _ = SERVER_OPEN.remove(key);
    send(Kind::ServerCall, |rec: &mut ServerCall| {
        rec.tgid = tgid as u32;
        rec.method = open.method;
        rec.polls = open.polls as u64;
        Ok(())
    })
}
