//! Every runtime RPC of the proxy: `<tarpc::client::Channel<Req, Resp> as Client<Req>>::call`.
//!
//! rusty-workers' `RuntimeServiceClient::{spawn_worker, fetch, ...}` are inlined; all of them
//! end in this one generic function, which receives the request enum by reference
//! (`call(&mut self, ctx, request)` with the returned future in the sret slot: rdi = sret,
//! rsi = self, rdx = &ctx, rcx = &request). It runs once per proxied request (the fetch), so
//! the fetch path is one map lookup and one counter; only spawns, terminations and the first
//! fetch of each new worker reach userspace.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use observer_common::{kind, method, HandleKey, Layout, HANDLE_KEY_LEN};

use crate::{bump, layout, read, send, APP_REQUESTS, HANDLE_APP, RPC_CALLS};

#[uprobe]
pub fn rpc_call(ctx: ProbeContext) -> u32 {
    let _ = try_rpc_call(&ctx);
    0
}

fn try_rpc_call(ctx: &ProbeContext) -> Result<(), i64> {
    let channel: u64 = ctx.arg(1).ok_or(1i64)?;
    let request: u64 = ctx.arg(3).ok_or(1i64)?;
    let lay = layout();
    let tag = read::word(request + lay.req_tag_offset)?;
    let m = lay.method_of(tag);
    bump(&RPC_CALLS, m);
    match m {
        method::FETCH => fetch(channel, request, &lay),
        method::SPAWN_WORKER => emit(
            kind::RPC_SPAWN,
            channel,
            request + lay.req_spawn_appid,
            &lay,
        ),
        method::TERMINATE_WORKER => {
            emit(kind::RPC_TERMINATE, channel, request + lay.req_handle, &lay)
        }
        _ => Ok(()),
    }
}

fn fetch(channel: u64, request: u64, lay: &Layout) -> Result<(), i64> {
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
            bump(&APP_REQUESTS, *slot);
            return Ok(());
        }
    }
    emit(kind::RPC_FETCH_UNKNOWN, channel, handle, lay)
}

fn emit(k: u32, channel: u64, string: u64, lay: &Layout) -> Result<(), i64> {
    send(k, channel, |ev| read::string(string, lay, ev))
}
