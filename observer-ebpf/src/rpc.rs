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
use observer_common::{
    event::{RpcAnswer, RpcCall, RpcDone},
    method, HandleKey, Kind, Layout, HANDLE_KEY_LEN,
};

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
fn identify(rec: &mut RpcCall, call: &Call, lay: &Layout) {
    rec.client = call.channel;
    rec.conn = read::word(call.channel + lay.chan_cancel).unwrap_or(0);
    rec.trace_id[0] = read::word(call.context + lay.ctx_trace_id).unwrap_or(0);
    rec.trace_id[1] = read::word(call.context + lay.ctx_trace_id + 8).unwrap_or(0);
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
        method::SPAWN_WORKER => emit(Kind::RpcSpawn, &call, request + lay.req_spawn_appid, &lay),
        method::TERMINATE_WORKER => emit(Kind::RpcTerminate, &call, request + lay.req_handle, &lay),
        _ if request_metrics => send(Kind::RpcOther, |rec: &mut RpcCall| {
            rec.method = m;
            identify(rec, &call, &lay);
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
            return send(Kind::RpcFetch, |rec: &mut RpcCall| {
                rec.slot = slot;
                identify(rec, call, lay);
                // The handle, for the instance the proxy discards if this fetch fails.
                rec.arg.bytes[..HANDLE_KEY_LEN].copy_from_slice(&key.bytes);
                rec.arg.len = n as u32;
                rec.arg.full_len = len;
                Ok(())
            });
        }
    }
    emit(Kind::RpcFetchUnknown, call, handle, lay)
}

fn emit(k: Kind, call: &Call, string: u64, lay: &Layout) -> Result<(), i64> {
    send(k, |rec: &mut RpcCall| {
        identify(rec, call, lay);
        read::string(string, lay, &mut rec.arg)
    })
}

fn try_rpc_response(ctx: &ProbeContext) -> Result<(), i64> {
    let oneshot: u64 = ctx.arg(1).ok_or(1i64)?;
    let response: u64 = ctx.arg(2).ok_or(1i64)?;
    let lay = layout();
    send(Kind::RpcAnswer, |rec: &mut RpcAnswer| {
        rec.oneshot = oneshot;
        read::bytes(response, &mut rec.raw)?;
        let tag = u64::from_ne_bytes([
            rec.raw[0], rec.raw[1], rec.raw[2], rec.raw[3], rec.raw[4], rec.raw[5], rec.raw[6],
            rec.raw[7],
        ]);
        let string = if tag == lay.resp_niche_base.wrapping_add(lay.resp_tag_id) {
            lay.resp_id_string
        } else if tag == lay.resp_niche_base.wrapping_add(lay.resp_tag_spawn) {
            lay.resp_spawn_string
        } else {
            0
        };
        if string != 0 {
            // An error answer has no string there: userspace only uses it for an `Ok`.
            let _ = read::string(response + string, &lay, &mut rec.string);
        }
        let tid = bpf_get_current_pid_tgid() as u32;
        // SAFETY: a copy out of a per-thread entry; a stale one is harmless (a wrong name is
        // not possible: it is the last peer this thread received from).
        if let Some(p) = unsafe { LAST_PEER.get(tid) } {
            rec.peer = *p;
        }
        Ok(())
    })
}

fn try_rpc_done(ctx: &ProbeContext) -> Result<(), i64> {
    let dr: u64 = ctx.arg(0).ok_or(1i64)?;
    let lay = layout();
    let oneshot = read::word(dr + lay.dr_response)?;
    send(Kind::RpcDone, |rec: &mut RpcDone| {
        rec.oneshot = oneshot;
        rec.conn = read::word(dr + lay.dr_cancel)?;
        let trace = dr + lay.dr_ctx + lay.ctx_trace_id;
        rec.trace_id[0] = read::word(trace)?;
        rec.trace_id[1] = read::word(trace + 8)?;
        rec.completed = read::word(dr + lay.dr_complete)? & 0xff;
        Ok(())
    })
}
