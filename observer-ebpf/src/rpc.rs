//! Runtime RPCs of the proxy, from the call to the answer.
//!
//! - `<tarpc::client::Channel<Req, Resp> as Client<Req>>::call`: every RPC.
//!   rusty-workers' `RuntimeServiceClient::{spawn_worker, fetch, ...}` are inlined; all of them
//!   end in this one generic function, which receives the request enum by reference
//!   (`call(&mut self, ctx, request)` with the returned future in the sret slot: rdi = sret,
//!   rsi = self, rdx = &ctx, rcx = &request).
//!
//! The call's context trace id ties it to its request frame on the wire, and so to its
//! answer, its cancel or its connection's end (`wire.rs`).
//!
//! With request metrics off (`REQUEST_METRICS` = 0), the fetch path stays one map lookup and one
//! counter, and only spawns, terminations and the first fetch of new workers reach userspace.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use observer_common::{event::RpcCall, method, program, HandleKey, Kind, Layout, HANDLE_KEY_LEN};

use crate::{
    bump, check, layout, read, request_metrics, send, APP_REQUESTS, HANDLE_APP, RPC_CALLS,
};

#[uprobe]
pub fn rpc_call(ctx: ProbeContext) -> u32 {
    let r = try_rpc_call(&ctx);
    check(&ctx, program::RPC_CALL, r);
    0
}

/// The call's identity: its client, its connection and its context's trace id, which its
/// request frame carries on the wire (random per call: rusty-workers makes a
/// `context::current()` for each); and whether the connection's dispatch task still runs (a
/// call on a connection that ended fails before reaching the wire, tarpc 0.24
/// `Channel::send`: the dispatch channel is closed).
fn identify(rec: &mut RpcCall, call: &Call, lay: &Layout) {
    rec.client = call.channel;
    rec.conn = read::word(call.channel + lay.chan_cancel).unwrap_or(0);
    // Unknown reads as open: a failure is only reported when the state says so.
    rec.conn_state = u64::MAX;
    if rec.conn != 0 {
        rec.conn_state = read::word(rec.conn + lay.chan_state).unwrap_or(u64::MAX);
    }
    rec.trace_id = read::words::<2>(call.context + lay.ctx_trace_id).unwrap_or([0; 2]);
}

fn try_rpc_call(ctx: &ProbeContext) -> Result<(), i64> {
    let channel: u64 = ctx.arg(1).ok_or(1i64)?;
    let context: u64 = ctx.arg(2).ok_or(1i64)?;
    let request: u64 = ctx.arg(3).ok_or(1i64)?;
    let call = Call { channel, context };
    let lay = layout();
    // The request's first words in one read: its tag and, for a fetch, its handle's `String`
    // (every build seen: tag at 0, handle at 8); other layouts read each word apart.
    let first = read::words::<4>(request)?;
    let tag = match read::word_in(&first, lay.req_tag_offset) {
        Some(t) => t,
        None => read::word(request + lay.req_tag_offset)?,
    };
    let m = lay.method_of(tag);
    bump(&RPC_CALLS, m);
    let request_metrics = request_metrics();
    match m {
        method::FETCH => fetch(&call, request, &first, &lay, request_metrics),
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

const _: () = assert!(HANDLE_KEY_LEN.is_multiple_of(8));

fn fetch(
    call: &Call,
    request: u64,
    first: &[u64; 4],
    lay: &Layout,
    request_metrics: bool,
) -> Result<(), i64> {
    let handle = request + lay.req_handle;
    let (ptr, len) = match read::string_parts_in(first, lay.req_handle, lay) {
        Some(parts) => parts,
        None => read::string_parts(handle, lay)?,
    };
    // Zeroed a word at a time (no `memset` call): the key is zero-padded past the handle.
    let mut words = core::mem::MaybeUninit::<[u64; HANDLE_KEY_LEN / 8]>::uninit();
    let key_words = crate::zero_words(&mut words);
    // SAFETY: `HandleKey` is `HANDLE_KEY_LEN` bytes of alignment 1: any storage of that size.
    let key = unsafe { &mut *(key_words.as_mut_ptr() as *mut HandleKey) };
    if len > 0 && len <= HANDLE_KEY_LEN as u64 {
        // Checked again so the verifier sees the slice bound.
        let n = (len as usize).min(HANDLE_KEY_LEN);
        read::bytes(ptr, &mut key.bytes[..n])?;
        // SAFETY: lookups copy nothing out; the value is read once.
        // By reference: a copy of the key would be a byte-by-byte one (alignment 1).
        let looked_up: &HandleKey = key;
        if let Some(slot) = unsafe { HANDLE_APP.get(looked_up) } {
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
