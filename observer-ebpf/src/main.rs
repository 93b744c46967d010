//! eBPF programs of the rusty-workers observer. One module per hook family; maps live here.
#![no_std]
#![no_main]

mod app_cache;
mod read;
mod rpc;

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use observer_common::{method, stat, HandleKey, Layout, MAX_APP_SLOTS};

/// Events for userspace; sized for bursts of app loads and cold starts, which are the only
/// events on the request path (a fetch on a handle already mapped to an app stays in-kernel).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// RPCs sent by the proxy, by method (`observer_common::method`).
#[map]
static RPC_CALLS: PerCpuArray<u64> = PerCpuArray::with_max_entries(method::COUNT, 0);

/// Worker handle -> app slot, filled by userspace once it has paired a handle with its app.
#[map]
static HANDLE_APP: HashMap<HandleKey, u32> = HashMap::with_max_entries(65536, 0);

/// Fetch RPCs per app slot, counted here for handles already in `HANDLE_APP`.
#[map]
static APP_REQUESTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_APP_SLOTS, 0);

/// The observer's own counters (`observer_common::stat`).
#[map]
static OBSERVER_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Memory layout of the target's types, set by userspace from the catalog at load time.
#[no_mangle]
static LAYOUT: Layout = Layout::DEFAULT;

#[inline(always)]
fn layout() -> Layout {
    // SAFETY: a global the loader fills before the program runs; volatile so the compiler
    // does not fold the default in.
    unsafe { core::ptr::read_volatile(&LAYOUT) }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
