//! Which runtime an answer came from: `sock:sock_recv_length` (net/socket.c, in
//! `sock_recvmsg`) in the proxy's threads remembers, per thread, the peer of the last socket
//! that delivered bytes. tarpc's dispatch task decodes and hands out an answer in the same
//! poll that read it, on the same thread, so `rpc_response` reads its runtime here.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};
use observer_common::{family, Peer};

use crate::{LAST_PEER, TARGET_TGID};

/// Offsets in the tracepoint record (/sys/kernel/tracing/events/sock/sock_recv_length/format).
const TP_SK: usize = 8;
const TP_FAMILY: usize = 16;
const TP_RET: usize = 20;
/// `struct sock_common` (include/net/sock.h; offsets read from this kernel's BTF):
/// `skc_daddr` at 0, `skc_dport` at 12, `skc_v6_daddr` at 56.
const SKC_DADDR: u64 = 0;
const SKC_DPORT: u64 = 12;
const SKC_V6_DADDR: u64 = 56;

#[tracepoint]
pub fn sock_recv(ctx: TracePointContext) -> u32 {
    let _ = try_sock_recv(&ctx);
    0
}

fn try_sock_recv(ctx: &TracePointContext) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a global the loader fills; volatile so the default is not folded in.
    let target = unsafe { core::ptr::read_volatile(&TARGET_TGID) };
    if (id >> 32) as u32 != target {
        return Ok(());
    }
    // SAFETY: offsets of this tracepoint's stable record format.
    let ret: i32 = unsafe { ctx.read_at(TP_RET) }.map_err(i64::from)?;
    if ret <= 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let fam: u16 = unsafe { ctx.read_at(TP_FAMILY) }.map_err(i64::from)?;
    // SAFETY: as above.
    let sk: u64 = unsafe { ctx.read_at(TP_SK) }.map_err(i64::from)?;
    let mut peer = Peer {
        addr: [0; 16],
        port: 0,
        family: fam,
        _pad: 0,
    };
    // SAFETY: bpf_probe_read_kernel checks the address.
    let port: u16 = unsafe { bpf_probe_read_kernel((sk + SKC_DPORT) as *const u16) }?;
    peer.port = u16::from_be(port);
    match fam {
        family::INET => {
            // SAFETY: as above.
            let a: [u8; 4] = unsafe { bpf_probe_read_kernel((sk + SKC_DADDR) as *const [u8; 4]) }?;
            peer.addr[..4].copy_from_slice(&a);
        }
        family::INET6 => {
            // SAFETY: as above.
            peer.addr = unsafe { bpf_probe_read_kernel((sk + SKC_V6_DADDR) as *const [u8; 16]) }?;
        }
        _ => return Ok(()),
    }
    LAST_PEER.insert(id as u32, peer, 0)?;
    Ok(())
}
