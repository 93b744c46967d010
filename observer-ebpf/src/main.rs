//! eBPF programs of the rusty-workers observer. One module per hook family; maps live here.
#![no_std]
#![no_main]

mod app_cache;
mod floor;
mod http;
mod net;
mod read;
mod rpc;
mod server;
mod wire;

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    EbpfContext,
};
use aya_log_ebpf::error;
use observer_common::{
    method, netstat, program, stat, HandleKey, Kind, Layout, Record, Watched, MAX_APP_SLOTS,
    MAX_PROCS,
};

/// Events for userspace. With request metrics on, every request sends seven records (about 810
/// bytes in all with the ring's headers, `observer_common::event`: the request's start, its
/// call, its two frames at each end of the wire, its response): 4 MiB hold ~5,200 requests,
/// far more than arrive between two drains of userspace (every 10 ms). With them off, only
/// app loads and cold starts come here.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Thread -> the last connection (`struct sock`) it received bytes on in the proxy: the
/// client's connection of the request hyper hands over next on that thread (`http.rs`).
#[map]
static HTTP_RECV: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// RPCs sent by the proxy, by method (`observer_common::method`).
#[map]
static RPC_CALLS: PerCpuArray<u64> = PerCpuArray::with_max_entries(method::COUNT, 0);

/// Worker handle -> app slot, filled by userspace once it has paired a handle with its app.
#[map]
static HANDLE_APP: HashMap<HandleKey, u32> = HashMap::with_max_entries(65536, 0);

/// Fetch RPCs per app slot, counted here for handles already in `HANDLE_APP`.
#[map]
static APP_REQUESTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_APP_SLOTS, 0);

/// Runs of each program (`observer_common::program`), counted by the programs themselves.
#[map]
static PROGRAM_RUNS: PerCpuArray<u64> = PerCpuArray::with_max_entries(program::COUNT, 0);

/// The observer's own counters (`observer_common::stat`).
#[map]
static OBSERVER_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Memory layout of the target's types, set by userspace from the catalog at load time.
#[no_mangle]
static LAYOUT: Layout = Layout::DEFAULT;

/// The watched processes (proxy and runtimes) by thread group id, kept by userspace as they
/// come and go: the socket tracepoints fire in every process of the host.
#[map]
static WATCHED: HashMap<u32, Watched> = HashMap::with_max_entries(MAX_PROCS, 0);

/// Socket traffic per watched process (`Watched::slot`), `netstat::COUNT` counters each.
#[map]
static PROC_NET: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_PROCS * netstat::COUNT, 0);

/// 1: request metrics on (per-request events); 0: off (`--no-request-metrics`).
#[no_mangle]
static REQUEST_METRICS: u32 = 1;

/// 1: the runtimes' wire is followed too (their served calls); 0: `--no-runtime-probes`.
#[no_mangle]
static RUNTIME_CALLS: u32 = 1;

#[inline(always)]
fn runtime_calls() -> bool {
    // SAFETY: as `layout`.
    unsafe { core::ptr::read_volatile(&RUNTIME_CALLS) != 0 }
}

#[inline(always)]
fn request_metrics() -> bool {
    // SAFETY: as `layout`.
    unsafe { core::ptr::read_volatile(&REQUEST_METRICS) != 0 }
}

#[inline(always)]
fn layout() -> Layout {
    // SAFETY: a global the loader fills before the program runs; volatile so the compiler
    // does not fold the default in.
    unsafe { core::ptr::read_volatile(&LAYOUT) }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    add(map, index, 1)
}

#[inline(always)]
fn add(map: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += n }
    }
}

/// Ends a hook: its run is counted (`PROGRAM_RUNS`); a run that ended on an error (a failed read of the target, a full ring buffer
/// or map) is counted in `stat::HOOK_ERRORS`, and logged through aya-log for the first error
/// on each CPU and then at every power of two. A wrong layout or a changed target shows in the
/// observer's log without a line per request: the log's own ring buffer would fill at full
/// request rate.
#[inline(always)]
fn check<C: EbpfContext>(ctx: &C, prog: u32, res: Result<(), i64>) {
    bump(&PROGRAM_RUNS, prog);
    let Err(e) = res else {
        return;
    };
    let Some(p) = OBSERVER_STATS.get_ptr_mut(stat::HOOK_ERRORS) else {
        return;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
    let n = unsafe {
        *p += 1;
        *p
    };
    if n & (n - 1) == 0 {
        let hook = program::NAMES
            .get(prog as usize)
            .copied()
            .unwrap_or("unknown");
        error!(ctx, "hook {} failed: error {} ({} on this CPU)", hook, e, n);
    }
}

/// Reserves a zeroed record of type `T` (counted as lost when the ring buffer is full), lets
/// `fill` complete it, then submits it, or discards it if `fill` fails.
#[inline(always)]
fn send<T: Record + 'static>(
    kind: Kind,
    fill: impl FnOnce(&mut T) -> Result<(), i64>,
) -> Result<(), i64> {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        bump(&OBSERVER_STATS, stat::EVENTS_LOST);
        return Err(1);
    };
    // SAFETY: the entry is ours until submitted, and of `T`'s size; every record type is
    // plain data, for which all-zero bytes are a value.
    let rec = unsafe { zeroed(entry.as_mut_ptr()) };
    header(rec.header_mut(), kind);
    match fill(rec) {
        Ok(()) => {
            // No wakeup: userspace drains on a short timer, in batches. A wakeup per event
            // (the adaptive default, when the reader has caught up) costs an irq_work and a
            // reader wakeup per request (kernel/bpf/ringbuf.c, bpf_ringbuf_commit).
            entry.submit(BPF_RB_NO_WAKEUP as u64);
            Ok(())
        }
        Err(e) => {
            entry.discard(0);
            Err(e)
        }
    }
}

/// Zeroes a record in place, a word at a time. Not `write_bytes`: LLVM lowers a memset of a
/// record's size to a call of aya-ebpf's `memset`, a byte loop (136 iterations for a
/// `WireFrame`: 0.6% of the CPU of a saturated test target, `perf record -a`); volatile
/// stores are not merged back into one.
///
/// # Safety
/// `rec` points to writable memory of `T`'s size, 8-byte aligned (ring buffer entries are).
#[inline(always)]
unsafe fn zeroed<'a, T: Record>(rec: *mut T) -> &'a mut T {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8)) };
    // SAFETY: the record's words, per the caller.
    unsafe { zero_at(rec as *mut u64, core::mem::size_of::<T>() / 8) };
    // SAFETY: all-zero bytes are a value of every record type.
    unsafe { &mut *rec }
}

/// Writes `n` zero words from `p` with volatile stores (not merged back into a `memset`).
///
/// # Safety
/// `p` points to `n` writable, 8-byte aligned words.
#[inline(always)]
unsafe fn zero_at(p: *mut u64, n: usize) {
    for i in 0..n {
        // SAFETY: inside the words, per the caller.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
}

/// Zeroes `N` words of stack in place, by volatile stores, and hands them over. A zeroed byte
/// array (a status line, a frame's length and head, a handle key) is lowered by LLVM to a call
/// of aya-ebpf's `memset`, a loop of one byte per iteration (`zeroed`); these are word stores.
#[inline(always)]
fn zero_words<const N: usize>(w: &mut core::mem::MaybeUninit<[u64; N]>) -> &mut [u64; N] {
    // SAFETY: the array's own words.
    unsafe { zero_at(w.as_mut_ptr() as *mut u64, N) };
    // SAFETY: every word was written.
    unsafe { w.assume_init_mut() }
}

/// The bytes of a word array.
#[inline(always)]
fn as_bytes<const N: usize>(w: &mut [u64; N]) -> &mut [u8] {
    // SAFETY: the array's own bytes; u8 has no alignment or validity requirement.
    unsafe { core::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, N * 8) }
}

/// Fills what every record has.
#[inline(always)]
fn header(h: &mut observer_common::Header, kind: Kind) {
    h.kind = kind as u32;
    h.tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: no preconditions.
    h.ktime_ns = unsafe { bpf_ktime_get_ns() };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
