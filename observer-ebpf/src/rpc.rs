//! Runtime RPCs of the proxy, from the call to the answer.
//!
//! - `<tarpc::client::Channel<Req, Resp> as Client<Req>>::call`: every RPC.
//!   rusty-workers' `RuntimeServiceClient::{spawn_worker, fetch, ...}` are inlined; all of them
//!   end in this one generic function, which receives the request enum by reference
//!   (`call(&mut self, ctx, request)` with the returned future in the sret slot: rdi = sret,
//!   rsi = self, rdx = &ctx, rcx = &request).
//! - `futures_channel::oneshot::Sender<Response<_>>::send`: tarpc's dispatch task hands the
//!   runtime's answer to the waiting call (`send(self, t) -> Result<(), T>`: rdi = the sret
//!   slot, rsi = the oneshot's `Arc`, rdx = &t; measured with bpftrace on the test target).
//! - `drop_in_place::<DispatchResponse<_>>` and `<DispatchResponse<_> as Drop>::drop`: the
//!   call's response future ends, completed or not; it holds the oneshot, the connection and
//!   the request id, which tie the two above. Which of the two runs depends on inlining at
//!   each drop site, so both are probed; userspace drops the second sighting.
//!
//! With request metrics off (`REQUEST_METRICS` = 0), the fetch path stays one map lookup and one
//! counter, and only spawns, terminations and the first fetch of new workers reach userspace.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::uprobe, programs::ProbeContext};
use observer_common::{kind, method, Event, HandleKey, Layout, HANDLE_KEY_LEN, MAX_STR};

use crate::{
    bump, check, layout, read, request_metrics, send, APP_REQUESTS, HANDLE_APP, LAST_PEER,
    RPC_CALLS,
};

#[uprobe]
pub fn rpc_call(ctx: ProbeContext) -> u32 {
    let r = try_rpc_call(&ctx);
    check(&ctx, "rpc_call", r);
    0
}

#[uprobe]
pub fn rpc_response(ctx: ProbeContext) -> u32 {
    let r = try_rpc_response(&ctx);
    check(&ctx, "rpc_response", r);
    0
}

#[uprobe]
pub fn rpc_done(ctx: ProbeContext) -> u32 {
    let r = try_rpc_done(&ctx);
    check(&ctx, "rpc_done", r);
    0
}

/// The call's identity: its connection (the cancellation sender's `Arc`, one per runtime
/// connection) and its context's trace id, which its `DispatchResponse` keeps.
fn identify(ev: &mut Event, channel: u64, context: u64, lay: &Layout) {
    ev.ptr_b = read::word(channel + lay.chan_cancel).unwrap_or(0);
    ev.word_b = read::word(context + lay.ctx_trace_id).unwrap_or(0);
    ev.word_c = read::word(context + lay.ctx_trace_id + 8).unwrap_or(0);
}

fn try_rpc_call(ctx: &ProbeContext) -> Result<(), i64> {
    let channel: u64 = ctx.arg(1).ok_or(1i64)?;
    let context: u64 = ctx.arg(2).ok_or(1i64)?;
    let request: u64 = ctx.arg(3).ok_or(1i64)?;
    let call = Call { channel, context };
    let lay = layout();
    let tag = read::word(request + lay.req_tag_offset)?;
    let m = lay.method_of(tag);
    bump(&RPC_CALLS, m);
    let request_metrics = request_metrics();
    match m {
        method::FETCH => fetch(&call, request, &lay, request_metrics),
        method::SPAWN_WORKER => emit(kind::RPC_SPAWN, &call, request + lay.req_spawn_appid, &lay),
        method::TERMINATE_WORKER => {
            emit(kind::RPC_TERMINATE, &call, request + lay.req_handle, &lay)
        }
        _ if request_metrics => send(kind::RPC_OTHER, channel, |ev| {
            ev.word_a = m as u64;
            identify(ev, channel, context, &lay);
            Ok(())
        }),
        _ => Ok(()),
    }
}

struct Call {
    channel: u64,
    context: u64,
}

fn fetch(call: &Call, request: u64, lay: &Layout, request_metrics: bool) -> Result<(), i64> {
    let handle = request + lay.req_handle;
    let ptr = read::word(handle + lay.string_ptr)?;
    let len = read::word(handle + lay.string_len)?;
    let mut key = HandleKey {
        bytes: [0; HANDLE_KEY_LEN],
    };
    if len > 0 && len <= HANDLE_KEY_LEN as u64 {
        // Checked again so the verifier sees the slice bound.
        let n = (len as usize).min(HANDLE_KEY_LEN);
        read::bytes(ptr, &mut key.bytes[..n])?;
        // SAFETY: lookups copy nothing out; the value is read once.
        if let Some(slot) = unsafe { HANDLE_APP.get(key) } {
            let slot = *slot;
            bump(&APP_REQUESTS, slot);
            if !request_metrics {
                return Ok(());
            }
            return send(kind::RPC_FETCH, call.channel, |ev| {
                ev.word_a = slot as u64;
                identify(ev, call.channel, call.context, lay);
                // The handle, for the instance the proxy discards if this fetch fails.
                ev.str[..HANDLE_KEY_LEN].copy_from_slice(&key.bytes);
                ev.str_len = n as u32;
                ev.str_full_len = len;
                Ok(())
            });
        }
    }
    emit(kind::RPC_FETCH_UNKNOWN, call, handle, lay)
}

fn emit(k: u32, call: &Call, string: u64, lay: &Layout) -> Result<(), i64> {
    send(k, call.channel, |ev| {
        identify(ev, call.channel, call.context, lay);
        read::string(string, lay, ev)
    })
}

fn try_rpc_response(ctx: &ProbeContext) -> Result<(), i64> {
    let oneshot: u64 = ctx.arg(1).ok_or(1i64)?;
    let response: u64 = ctx.arg(2).ok_or(1i64)?;
    let lay = layout();
    send(kind::RPC_RESPONSE, oneshot, |ev| {
        read::bytes(response, &mut ev.str)?;
        ev.str_len = MAX_STR as u32;
        ev.str_full_len = MAX_STR as u64;
        let tag = read::word(response)?;
        let string = if tag == lay.resp_niche_base.wrapping_add(lay.resp_tag_id) {
            lay.resp_id_string
        } else if tag == lay.resp_niche_base.wrapping_add(lay.resp_tag_spawn) {
            lay.resp_spawn_string
        } else {
            0
        };
        if string != 0 {
            // An error answer has no string there: userspace only uses it for an `Ok`.
            let _ = read::string2(response + string, &lay, ev);
        }
        let tid = bpf_get_current_pid_tgid() as u32;
        // SAFETY: a copy out of a per-thread entry; a stale one is harmless (a wrong name is
        // not possible: it is the last peer this thread received from).
        if let Some(p) = unsafe { LAST_PEER.get(tid) } {
            let lo = u64::from_ne_bytes([
                p.addr[0], p.addr[1], p.addr[2], p.addr[3], p.addr[4], p.addr[5], p.addr[6],
                p.addr[7],
            ]);
            let hi = u64::from_ne_bytes([
                p.addr[8], p.addr[9], p.addr[10], p.addr[11], p.addr[12], p.addr[13], p.addr[14],
                p.addr[15],
            ]);
            ev.ptr_b = lo;
            ev.word_b = hi;
            ev.word_c = p.port as u64 | (p.family as u64) << 16;
        }
        Ok(())
    })
}

fn try_rpc_done(ctx: &ProbeContext) -> Result<(), i64> {
    let dr: u64 = ctx.arg(0).ok_or(1i64)?;
    let lay = layout();
    let oneshot = read::word(dr + lay.dr_response)?;
    send(kind::RPC_DONE, oneshot, |ev| {
        ev.ptr_b = read::word(dr + lay.dr_cancel)?;
        let trace = dr + lay.dr_ctx + lay.ctx_trace_id;
        ev.word_b = read::word(trace)?;
        ev.word_c = read::word(trace + 8)?;
        ev.word_a = read::word(dr + lay.dr_complete)? & 0xff;
        Ok(())
    })
}
