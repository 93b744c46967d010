//! The proxy's HTTP/1 server (hyper 0.14), from a request's arrival to its response head,
//! and rusty-workers' own errors.
//!
//! - `<hyper::proto::h1::dispatch::Server<S, Body> as Dispatch>::recv_msg` (a uprobe): a
//!   parsed request is handed to the service. Its first argument identifies the request's
//!   service future (on the builds measured it is the box the future is put in: LLVM passes
//!   the loaded field; userspace only needs it to be stable for the request and shared with
//!   its RPCs). Its client's connection is the one this thread last received on
//!   (`HTTP_RECV`, set by `sock_recv`): hyper reads the head and hands it over in one poll of
//!   the connection's task, with no other socket call between (`Conn::poll_read_head`).
//! - The response head (no uprobe): the proxy's first send on the request's connection after
//!   it, seen by the `sock_send` tracepoint (`net.rs`, `wire.rs`), which reads its status
//!   line. `recv_msg` marks the connection a client's (`wire::client_connection`): other
//!   HTTP the proxy's process may send (the test target's hand-written admin endpoint) is
//!   not taken for responses. hyper writes a head with its body in one `writev`, the head
//!   first.
//! - `rusty_workers_proxy::sched::SchedError::build_response(&self) -> Response<Body>` (a
//!   uprobe, on the error path only): the proxy answers with one of its own errors (rdi = the
//!   sret slot, rsi = self, or under fat LTO the byte itself); the enum is fieldless, a byte.

use aya_ebpf::{
    cty::c_void, helpers::generated::bpf_probe_read_user, macros::uprobe, programs::ProbeContext,
};
use observer_common::{
    event::{HttpRequest, HttpResponse, SchedError},
    program, Kind,
};

use crate::{check, read, send, HTTP_RECV};

#[uprobe]
pub fn http_request(ctx: ProbeContext) -> u32 {
    let r = try_http_request(&ctx);
    check(&ctx, program::HTTP_REQUEST, r);
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
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // Taken, not left: a head hyper had buffered (a pipelined request) is handed over with no
    // receive before it, and must not be given an older request's connection. Zeroed in
    // place rather than removed: the thread's next receive writes it again (`net.rs`).
    let sock = match HTTP_RECV.get_ptr_mut(tid) {
        // SAFETY: this thread's own entry; only it writes it.
        Some(p) => unsafe { core::mem::replace(&mut *p, 0) },
        None => 0,
    };
    if sock != 0 {
        crate::wire::client_connection(sock)?;
    }
    send(Kind::HttpRequest, |rec: &mut HttpRequest| {
        rec.key = key;
        rec.sock = sock;
        Ok(())
    })
}

/// `HTTP/1.x NNN`: the status line's start.
const STATUS_LINE: usize = 12;

#[inline(always)]
fn status(buf: u64, n: u64) -> Option<u32> {
    if n < STATUS_LINE as u64 {
        return None;
    }
    let mut words = core::mem::MaybeUninit::<[u64; 2]>::uninit();
    let line = crate::as_bytes(crate::zero_words(&mut words));
    // SAFETY: into the array, within its size; the source is checked by the helper.
    let r = unsafe {
        bpf_probe_read_user(
            line.as_mut_ptr() as *mut c_void,
            STATUS_LINE as u32,
            buf as *const c_void,
        )
    };
    if r != 0 || &line[..7] != b"HTTP/1." || line[8] != b' ' {
        return None;
    }
    let mut code = 0u32;
    for d in &line[9..STATUS_LINE] {
        if !d.is_ascii_digit() {
            return None;
        }
        code = code * 10 + u32::from(d - b'0');
    }
    Some(code)
}

/// The proxy sends `n` bytes at `buf` on the client connection `sock`: a response head is
/// sent to userspace if they begin one (a body sent apart from its head does not).
#[inline(always)]
pub fn response(sock: u64, buf: u64, n: u64) -> Result<(), i64> {
    let Some(code) = status(buf, n) else {
        return Ok(());
    };
    send(Kind::HttpResponse, |rec: &mut HttpResponse| {
        rec.sock = sock;
        rec.status = code;
        Ok(())
    })
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
