//! eBPF programs of the rusty-workers observer. One module per hook family; maps live here.
#![no_std]
#![no_main]

mod app_cache;
mod read;
mod rpc;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use observer_common::{method, stat, Event, HandleKey, Layout, MAX_APP_SLOTS};

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

/// Reserves a zeroed event (counted as lost when the ring buffer is full), lets `fill` complete
/// it, then submits it, or discards it if `fill` fails.
#[inline(always)]
fn send(
    kind: u32,
    ptr_a: u64,
    fill: impl FnOnce(&mut Event) -> Result<(), i64>,
) -> Result<(), i64> {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(&OBSERVER_STATS, stat::EVENTS_LOST);
        return Err(1);
    };
    // SAFETY: the entry is ours until submitted; zeroed first so no stale bytes leak out.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = Event::zeroed();
    ev.kind = kind;
    // SAFETY: no preconditions.
    ev.ktime_ns = unsafe { bpf_ktime_get_ns() };
    ev.ptr_a = ptr_a;
    match fill(ev) {
        Ok(()) => {
            entry.submit(0);
            Ok(())
        }
        Err(e) => {
            entry.discard(0);
            Err(e)
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
