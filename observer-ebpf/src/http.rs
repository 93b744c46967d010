//! The proxy's HTTP/1 server (hyper 0.14), from a request's arrival to its response head,
//! and rusty-workers' own errors.
//!
//! - `<hyper::proto::h1::dispatch::Server<S, Body> as Dispatch>::recv_msg`: a parsed request
//!   is handed to the service. Its first argument identifies the request's service future
//!   (on the builds measured it is the box the future is put in: LLVM passes the loaded field;
//!   userspace only needs it to be stable for the request and shared with its RPCs).
//! - `hyper::proto::h1::conn::Conn<I, B, T>::encode_head`: the response head is written
//!   (`encode_head(&mut self, head, body)` returns its value in the sret slot: rdi = sret,
//!   rsi = self). The connection is not the request key: the dispatcher holds both, at an
//!   offset userspace learns, from copies of the connection's memory taken here, and sets in
//!   `CONN_KEY`.
//! - `rusty_workers_proxy::sched::SchedError::build_response(&self) -> Response<Body>`: the
//!   proxy answers with one of its own errors (rdi = the sret slot, rsi = self, or under fat
//!   LTO the byte itself); the enum is fieldless, a byte.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP, cty::c_void, helpers::generated::bpf_probe_read_user,
    macros::uprobe, programs::ProbeContext,
};
use observer_common::{
    conn_key,
    event::{ConnSnapshot, HttpRequest, HttpResponse, SchedError},
    program, stat, Kind, CONN_WINDOW,
};

use crate::{bump, check, header, read, send, CONN_KEY, EVENTS, OBSERVER_STATS};

#[uprobe]
pub fn http_request(ctx: ProbeContext) -> u32 {
    let r = try_http_request(&ctx);
    check(&ctx, program::HTTP_REQUEST, r);
    0
}

#[uprobe]
pub fn http_response(ctx: ProbeContext) -> u32 {
    let r = try_http_response(&ctx);
    check(&ctx, program::HTTP_RESPONSE, r);
    0
}

#[uprobe]
pub fn sched_error(ctx: ProbeContext) -> u32 {
    let r = try_sched_error(&ctx);
    check(&ctx, program::SCHED_ERROR, r);
    0
}

fn try_http_request(ctx: &ProbeContext) -> Result<(), i64> {
    let key: u64 = ctx.arg(0).ok_or(1i64)?;
    send(Kind::HttpRequest, |rec: &mut HttpRequest| {
        rec.key = key;
        Ok(())
    })
}

fn try_http_response(ctx: &ProbeContext) -> Result<(), i64> {
    let conn: u64 = ctx.arg(1).ok_or(1i64)?;
    let how = CONN_KEY
        .get(0)
        .copied()
        .filter(|h| h.mode != conn_key::UNKNOWN);
    let Some(how) = how else {
        return send_snapshot(conn);
    };
    send(Kind::HttpResponse, |rec: &mut HttpResponse| {
        rec.conn = conn;
        let at = conn.wrapping_add(how.offset as u64);
        rec.key = match how.mode {
            conn_key::LOAD => read::word(at).unwrap_or(0),
            _ => at,
        };
        Ok(())
    })
}

/// The response record with the memory around its connection, while userspace learns where
/// the request key is: the connection is closed and its memory reused within microseconds
/// of the head when clients do not keep connections alive, long before userspace looks.
/// Not zeroed first: every byte of it is written here (a failed read zeroes `words`).
fn send_snapshot(conn: u64) -> Result<(), i64> {
    let Some(mut entry) = EVENTS.reserve::<ConnSnapshot>(0) else {
        bump(&OBSERVER_STATS, stat::EVENTS_LOST);
        return Err(1);
    };
    // SAFETY: the entry is ours until submitted.
    let snap = unsafe { &mut *entry.as_mut_ptr() };
    header(&mut snap.head.header, Kind::HttpResponse);
    snap.head.conn = conn;
    snap.head.key = 0;
    let words = &mut snap.words;
    // SAFETY: the destination is the entry's own array, of the size passed; a bad source
    // address makes the helper fail and zero the destination (mm/maccess.c).
    let rc = unsafe {
        bpf_probe_read_user(
            words.as_mut_ptr() as *mut c_void,
            core::mem::size_of_val(words) as u32,
            conn.wrapping_sub(CONN_WINDOW) as *const c_void,
        )
    };
    if rc == 0 {
        snap.read_ok = 1;
    } else {
        snap.read_ok = 0;
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    Ok(())
}

/// Below this no user address is mapped (`vm.mmap_min_addr` is 4096 or more): an argument
/// there is not a pointer.
const MIN_USER_ADDR: u64 = 4096;

fn try_sched_error(ctx: &ProbeContext) -> Result<(), i64> {
    let arg: u64 = ctx.arg(1).ok_or(1i64)?;
    let error = if arg < MIN_USER_ADDR {
        // `self` passed by value: under fat LTO the fieldless enum's `&self` is promoted to
        // its byte in esi (the test target's release-fat-lto build: `mov %esi,%ecx` at the
        // function's start). A pointer is never this low.
        arg & 0xff
    } else {
        let mut b = [0u8; 1];
        read::bytes(arg, &mut b)?;
        b[0] as u64
    };
    send(Kind::SchedError, |rec: &mut SchedError| {
        rec.error = error;
        Ok(())
    })
}
