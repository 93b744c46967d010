//! Socket traffic of the watched processes, and which runtime an answer came from.
//!
//! `sock:sock_send_length` and `sock:sock_recv_length` (net/socket.c, in `sock_sendmsg_nosec`
//! and `sock_recvmsg_nosec`: every `write`, `writev`, `send*`, `read`, `readv` and `recv*` on a
//! socket) fire in every process; the `WATCHED` map keeps the proxy's and the runtimes'.
//! Counting here, per process, is what `/proc/<pid>/net/dev` cannot do: it counts a whole
//! network namespace.
//!
//! They are attached as BTF tracepoints (`tp_btf`, BPF_RAW_TRACEPOINT_OPEN by the event's BTF
//! id): no tracefs is needed, which a fresh host or a container often has unmounted, and the
//! program reads the event's arguments directly instead of the perf record the kernel would
//! fill for a classic tracepoint.
//!
//! In the proxy, with request metrics on, the receive side also remembers, per thread, the
//! peer of the last socket that delivered bytes. tarpc's dispatch task decodes and hands out
//! an answer in the same poll that read it, on the same thread, so `rpc_response` reads its
//! runtime here.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use observer_common::{family, netstat, role, Peer, Watched};

use crate::{add, check, request_metrics, LAST_PEER, PROC_NET, WATCHED};

/// The events' arguments (include/trace/events/sock.h, `sock_msg_length`: `TP_PROTO(struct
/// sock *sk, int ret, int flags)`; the BTF typedef `btf_trace_sock_send_length` has the same).
const ARG_SK: usize = 0;
const ARG_RET: usize = 1;
const ARG_FLAGS: usize = 2;
/// include/linux/socket.h. A peek leaves the bytes in the socket: they are read again.
const MSG_PEEK: i32 = 2;
/// `struct sock_common` (include/net/sock.h; offsets read from this kernel's BTF):
/// `skc_daddr` at 0, `skc_dport` at 12, `skc_family` at 16, `skc_v6_daddr` at 56.
const SKC_DADDR: u64 = 0;
const SKC_DPORT: u64 = 12;
const SKC_FAMILY: u64 = 16;
const SKC_V6_DADDR: u64 = 56;

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send(ctx: BtfTracePointContext) -> i32 {
    let r = try_sock_send(&ctx);
    check(&ctx, "sock_send", r);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv(ctx: BtfTracePointContext) -> i32 {
    let r = try_sock_recv(&ctx);
    check(&ctx, "sock_recv", r);
    0
}

fn watched() -> Option<(u32, Watched)> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the map can change.
    let w = unsafe { WATCHED.get((id >> 32) as u32) }?;
    Some((id as u32, *w))
}

/// Counts one transfer of `ret` bytes into the counters at `first` (bytes) and `first + 1`
/// (messages); returns the family when the socket is an Internet one and bytes moved.
fn count(ctx: &BtfTracePointContext, w: &Watched, first: u32) -> Result<Option<u16>, i64> {
    let ret: i32 = ctx.arg(ARG_RET);
    if ret <= 0 {
        return Ok(None);
    }
    let flags: i32 = ctx.arg(ARG_FLAGS);
    if flags & MSG_PEEK != 0 {
        return Ok(None);
    }
    let sk: u64 = ctx.arg(ARG_SK);
    // SAFETY: bpf_probe_read_kernel checks the address.
    let fam: u16 = unsafe { bpf_probe_read_kernel((sk + SKC_FAMILY) as *const u16) }?;
    if fam != family::INET && fam != family::INET6 {
        return Ok(None);
    }
    let base = w.slot * netstat::COUNT + first;
    add(&PROC_NET, base, ret as u64);
    add(&PROC_NET, base + 1, 1);
    Ok(Some(fam))
}

fn try_sock_send(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let Some((_, w)) = watched() else {
        return Ok(());
    };
    count(ctx, &w, netstat::BYTES_SENT)?;
    Ok(())
}

fn try_sock_recv(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let Some((tid, w)) = watched() else {
        return Ok(());
    };
    let Some(fam) = count(ctx, &w, netstat::BYTES_RECEIVED)? else {
        return Ok(());
    };
    if w.role != role::PROXY || !request_metrics() {
        return Ok(());
    }
    let sk: u64 = ctx.arg(ARG_SK);
    let mut peer = Peer {
        addr: [0; 16],
        port: 0,
        family: fam,
        _pad: 0,
    };
    // SAFETY: bpf_probe_read_kernel checks the address.
    let port: u16 = unsafe { bpf_probe_read_kernel((sk + SKC_DPORT) as *const u16) }?;
    peer.port = u16::from_be(port);
    if fam == family::INET {
        // SAFETY: as above.
        let a: [u8; 4] = unsafe { bpf_probe_read_kernel((sk + SKC_DADDR) as *const [u8; 4]) }?;
        peer.addr[..4].copy_from_slice(&a);
    } else {
        // SAFETY: as above.
        peer.addr = unsafe { bpf_probe_read_kernel((sk + SKC_V6_DADDR) as *const [u8; 16]) }?;
    }
    LAST_PEER.insert(tid, peer, 0)?;
    Ok(())
}
