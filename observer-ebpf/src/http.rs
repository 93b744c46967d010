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
//!   offset userspace learns and sets in `CONN_KEY`.
//! - `rusty_workers_proxy::sched::SchedError::build_response(&self) -> Response<Body>`: the
//!   proxy answers with one of its own errors (rdi = the sret slot, rsi = self); the enum is
//!   fieldless, a byte.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use observer_common::{conn_key, kind};

use crate::{read, send, CONN_KEY};

#[uprobe]
pub fn http_request(ctx: ProbeContext) -> u32 {
    let _ = try_http_request(&ctx);
    0
}

#[uprobe]
pub fn http_response(ctx: ProbeContext) -> u32 {
    let _ = try_http_response(&ctx);
    0
}

#[uprobe]
pub fn sched_error(ctx: ProbeContext) -> u32 {
    let _ = try_sched_error(&ctx);
    0
}

fn try_http_request(ctx: &ProbeContext) -> Result<(), i64> {
    let key: u64 = ctx.arg(0).ok_or(1i64)?;
    send(kind::HTTP_REQUEST, key, |_| Ok(()))
}

fn try_http_response(ctx: &ProbeContext) -> Result<(), i64> {
    let conn: u64 = ctx.arg(1).ok_or(1i64)?;
    // SAFETY: index 0 of an array map always exists; a plain copy.
    let how = CONN_KEY.get(0).copied();
    send(kind::HTTP_RESPONSE, conn, |ev| {
        if let Some(how) = how {
            let at = conn.wrapping_add(how.offset as u64);
            ev.ptr_b = match how.mode {
                conn_key::LOAD => read::word(at).unwrap_or(0),
                conn_key::ADDRESS => at,
                _ => 0,
            };
        }
        Ok(())
    })
}

fn try_sched_error(ctx: &ProbeContext) -> Result<(), i64> {
    let err: u64 = ctx.arg(1).ok_or(1i64)?;
    let mut b = [0u8; 1];
    read::bytes(err, &mut b)?;
    send(kind::SCHED_ERROR, err, |ev| {
        ev.word_a = b[0] as u64;
        Ok(())
    })
}
