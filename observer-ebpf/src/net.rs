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
//! With request metrics on, they also follow the tarpc frames on the connections between the
//! proxy and its runtimes (`wire.rs`), at both ends: in the proxy, its calls, cancels and the
//! answers; in a runtime, the calls it served. No uprobe.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use observer_common::{family, netstat, program, role, wire, Peer, Watched};

use crate::{add, check, request_metrics, runtime_calls, wire::Side, HTTP_RECV, PROC_NET, WATCHED};

/// The events' arguments (include/trace/events/sock.h, `sock_msg_length`: `TP_PROTO(struct
/// sock *sk, int ret, int flags)`; the BTF typedef `btf_trace_sock_send_length` has the same).
const ARG_SK: usize = 0;
const ARG_RET: usize = 1;
const ARG_FLAGS: usize = 2;
/// include/linux/socket.h. A peek leaves the bytes in the socket: they are read again.
const MSG_PEEK: i32 = 2;
/// include/uapi/asm-generic/errno-base.h: a receive with nothing to read yet, or cut short.
const EINTR: i32 = 4;
const EAGAIN: i32 = 11;
/// `struct sock_common` (include/net/sock.h; offsets read from this kernel's BTF):
/// `skc_daddr` at 0, `skc_dport` at 12, `skc_family` at 16, `skc_v6_daddr` at 56.
const SKC_DADDR: u64 = 0;
const SKC_DPORT: u64 = 12;
const SKC_FAMILY: u64 = 16;
const SKC_V6_DADDR: u64 = 56;

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send(ctx: BtfTracePointContext) -> i32 {
    let r = try_sock_send(&ctx);
    check(&ctx, program::SOCK_SEND, r);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv(ctx: BtfTracePointContext) -> i32 {
    let r = try_sock_recv(&ctx);
    check(&ctx, program::SOCK_RECV, r);
    0
}

/// `tcp:tcp_destroy_sock` (include/trace/events/tcp.h, `TP_PROTO(struct sock *sk)`), fired by
/// `tcp_v4_destroy_sock`, which IPv6 shares: a TCP socket's end, whichever side closed first,
/// before its memory can go to a new socket. A receive of 0 bytes or an error tells only a
/// connection the peer ended; one the proxy closes first (`Connection: close`, a dropped
/// runtime client) would otherwise leave its `CONNS` entry to the next socket at that address,
/// which would inherit what this one was (a client's, or tarpc's). Once per connection, not
/// per request; it may run in softirq, in any process: the entry is looked up by the socket
/// alone.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn sock_close(ctx: BtfTracePointContext) -> i32 {
    let r = try_sock_close(&ctx);
    check(&ctx, program::SOCK_CLOSE, r);
    0
}

/// Attached only with request metrics (`observer/src/kernel.rs`): without them nothing is
/// followed, and there is nothing to end.
fn try_sock_close(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(ARG_SK);
    crate::wire::end(sk)
}

fn watched() -> Option<Watched> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the map can change.
    let w = unsafe { WATCHED.get((id >> 32) as u32) }?;
    Some(*w)
}

/// A socket call's outcome as the tracepoint reports it.
struct Transfer {
    sk: u64,
    ret: i32,
    /// `AF_INET` or `AF_INET6` (other families are not transfers here).
    family: u16,
}

fn transfer(ctx: &BtfTracePointContext) -> Result<Option<Transfer>, i64> {
    let flags: i32 = ctx.arg(ARG_FLAGS);
    if flags & MSG_PEEK != 0 {
        return Ok(None);
    }
    let sk: u64 = ctx.arg(ARG_SK);
    // A direct load, not bpf_probe_read_kernel: a BTF tracepoint's `struct sock *` argument is
    // typed (PTR_TO_BTF_ID), so the verifier checks the field against the kernel's BTF and
    // the JIT guards the load with an exception-table entry (kernel/bpf/verifier.c,
    // BPF_PROBE_MEM); no helper call on every socket call of the watched processes.
    // SAFETY: see above; the kernel recovers from a faulting load.
    let fam: u16 = unsafe { core::ptr::read_volatile((sk + SKC_FAMILY) as *const u16) };
    if fam != family::INET && fam != family::INET6 {
        return Ok(None);
    }
    Ok(Some(Transfer {
        sk,
        ret: ctx.arg(ARG_RET),
        family: fam,
    }))
}

/// Counts one transfer of `t.ret` bytes into the counters at `first` (bytes) and `first + 1`
/// (messages).
fn count(t: &Transfer, w: &Watched, first: u32) {
    if t.ret <= 0 {
        return;
    }
    let base = w.slot * netstat::COUNT + first;
    add(&PROC_NET, base, t.ret as u64);
    add(&PROC_NET, base + 1, 1);
}

/// Which direction of this process's connections opens a tarpc connection: the proxy, the
/// client, sends first; a runtime, the server, receives first. `None`: its connections are not
/// followed (request metrics off, or `--no-runtime-probes` in a runtime).
fn opens_wire(w: &Watched) -> Option<Side> {
    if !request_metrics() {
        return None;
    }
    let opens = match w.role {
        role::PROXY => wire::SENT,
        role::RUNTIME if runtime_calls() => wire::RECEIVED,
        _ => return None,
    };
    Some(Side {
        role: w.role,
        opens,
    })
}

fn try_sock_send(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let Some(w) = watched() else {
        return Ok(());
    };
    let Some(t) = transfer(ctx)? else {
        return Ok(());
    };
    count(&t, &w, netstat::BYTES_SENT);
    let Some(side) = opens_wire(&w) else {
        return Ok(());
    };
    if t.ret > 0 {
        crate::wire::follow(t.sk, wire::SENT, side, t.ret as u32, || peer(&t))?;
        Ok(())
    } else if t.ret < 0 && t.ret != -EAGAIN && t.ret != -EINTR {
        crate::wire::end(t.sk)
    } else {
        Ok(())
    }
}

fn try_sock_recv(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let Some(w) = watched() else {
        return Ok(());
    };
    let Some(t) = transfer(ctx)? else {
        return Ok(());
    };
    count(&t, &w, netstat::BYTES_RECEIVED);
    let Some(side) = opens_wire(&w) else {
        return Ok(());
    };
    if t.ret > 0 {
        let tarpc = crate::wire::follow(t.sk, wire::RECEIVED, side, t.ret as u32, || peer(&t))?;
        if !tarpc && w.role == role::PROXY {
            // A client's bytes: the connection of the request hyper may hand over next on
            // this thread (`http.rs`).
            let tid = bpf_get_current_pid_tgid() as u32;
            // In place when the thread has an entry (every receive after its first): an
            // insert into an LRU map takes a free node and the map's lock each time.
            match HTTP_RECV.get_ptr_mut(tid) {
                // SAFETY: this thread's own entry; only it writes it.
                Some(p) => unsafe { *p = t.sk },
                None => HTTP_RECV.insert(tid, t.sk, 0)?,
            }
        }
        Ok(())
    } else if t.ret != -EAGAIN && t.ret != -EINTR {
        // End of stream (0) or an error: the connection is gone.
        crate::wire::end(t.sk)
    } else {
        Ok(())
    }
}

/// The connection's peer (`family` 0 if it cannot be read).
fn peer(t: &Transfer) -> Peer {
    let mut peer = Peer {
        addr: [0; 16],
        port: 0,
        family: 0,
        _pad: 0,
    };
    let sk = t.sk;
    // SAFETY: bpf_probe_read_kernel checks the addresses.
    unsafe {
        let Ok(port) = bpf_probe_read_kernel((sk + SKC_DPORT) as *const u16) else {
            return peer;
        };
        peer.port = u16::from_be(port);
        if t.family == family::INET {
            let Ok(a) = bpf_probe_read_kernel((sk + SKC_DADDR) as *const [u8; 4]) else {
                return peer;
            };
            peer.addr[..4].copy_from_slice(&a);
        } else {
            let Ok(a) = bpf_probe_read_kernel((sk + SKC_V6_DADDR) as *const [u8; 16]) else {
                return peer;
            };
            peer.addr = a;
        }
    }
    peer.family = t.family;
    peer
}
