//! Types shared by the eBPF programs and the userspace observer.
//!
//! Every type is `#[repr(C)]`, `Copy` and free of padding, so that the kernel and userspace
//! agree on it byte for byte (checked by the `const _` size assertions).
#![no_std]

/// Bytes of a string (app id, worker handle) read from target memory. rusty-workers app ids
/// are UUIDs (36 bytes) and worker handles 32 hex digits; longer strings are cut here and
/// reported with their full length, so userspace can refuse them as labels.
pub const MAX_STR: usize = 64;

/// Bytes of a worker handle kept as a map key; rusty-workers' handles are 16 random bytes in hex.
pub const HANDLE_KEY_LEN: usize = 32;

/// Slots of per-app counters kept in the kernel. Slot 0 is the shared `other` series for apps
/// past the label cap and for strings refused as labels.
pub const MAX_APP_SLOTS: u32 = 4096;

/// Event kinds sent through the ring buffer.
pub mod kind {
    /// `LruCache::insert` on an LRU cache; `ptr_a` = cache, `ptr_b` = value argument,
    /// `word_a`/`word_b` = the first two words the value argument points to.
    pub const CACHE_INSERT: u32 = 1;
    /// `LruCache::remove`; `ptr_a` = cache.
    pub const CACHE_REMOVE: u32 = 2;
    /// A `spawn_worker` RPC; `str` = app id, `ptr_a` = the client (`&mut Channel`) it was sent on.
    pub const RPC_SPAWN: u32 = 3;
    /// A `terminate_worker` RPC; `str` = worker handle.
    pub const RPC_TERMINATE: u32 = 4;
    /// A `fetch` RPC on a worker handle the kernel had no app for; `str` = handle,
    /// `ptr_a` = the client it was sent on.
    pub const RPC_FETCH_UNKNOWN: u32 = 5;
}

/// RPC methods of rusty-workers' `RuntimeService`, in declaration order (which is also the
/// order of the variants of the tarpc-generated request enum).
pub mod method {
    pub const ID: u32 = 0;
    pub const SPAWN_WORKER: u32 = 1;
    pub const TERMINATE_WORKER: u32 = 2;
    pub const LIST_WORKERS: u32 = 3;
    pub const FETCH: u32 = 4;
    pub const LOAD: u32 = 5;
    /// A request whose discriminant did not decode (layout mismatch): counted, never guessed.
    pub const UNKNOWN: u32 = 6;
    pub const COUNT: u32 = 7;
    pub const NAMES: [&str; COUNT as usize] = [
        "id",
        "spawn_worker",
        "terminate_worker",
        "list_workers",
        "fetch",
        "load",
        "unknown",
    ];
}

/// Indexes of the kernel's self-counters (`OBSERVER_STATS` per-CPU array).
pub mod stat {
    /// Ring buffer full: an event was dropped.
    pub const EVENTS_LOST: u32 = 0;
    /// A read of target memory failed (page not present, bad pointer).
    pub const READ_ERRORS: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// One event from a probe to userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    /// Bytes of `str` that hold data (`<= MAX_STR`).
    pub str_len: u32,
    /// The string's full length in target memory (may exceed `MAX_STR`).
    pub str_full_len: u64,
    /// `bpf_ktime_get_ns()` at the probe.
    pub ktime_ns: u64,
    pub ptr_a: u64,
    pub ptr_b: u64,
    pub word_a: u64,
    pub word_b: u64,
    /// `CACHE_INSERT`: how many entries the insert evicts to stay within capacity.
    pub word_c: u64,
    /// Bytes of `str2` that hold data.
    pub str2_len: u32,
    pub _pad: u32,
    pub str2_full_len: u64,
    pub str: [u8; MAX_STR],
    /// `CACHE_INSERT`: the first key the insert evicts (the least recently used).
    pub str2: [u8; MAX_STR],
}

const _: () = assert!(core::mem::size_of::<Event>() == 8 + 8 + 8 + 5 * 8 + 8 + 8 + 2 * MAX_STR);

impl Event {
    pub const fn zeroed() -> Self {
        Event {
            kind: 0,
            str_len: 0,
            str_full_len: 0,
            ktime_ns: 0,
            ptr_a: 0,
            ptr_b: 0,
            word_a: 0,
            word_b: 0,
            word_c: 0,
            str2_len: 0,
            _pad: 0,
            str2_full_len: 0,
            str: [0; MAX_STR],
            str2: [0; MAX_STR],
        }
    }
}

/// Key of the worker handle -> app slot map: the handle's bytes, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandleKey {
    pub bytes: [u8; HANDLE_KEY_LEN],
}

const _: () = assert!(core::mem::size_of::<HandleKey>() == HANDLE_KEY_LEN);

/// How to read a Rust `String` and the tarpc request enum in target memory. Filled in by
/// userspace from the catalog (the layouts are the compiler's, not the language's) and read by
/// the programs as a global.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the data pointer inside a `String` (rustc >= 1.67: `{cap, ptr, len}`).
    pub string_ptr: u64,
    /// Offset of the length inside a `String`.
    pub string_len: u64,
    /// Request enum: tag word offset; values `>= niche_base` are `niche_base + variant`,
    /// anything below is the dataful variant (its first field's capacity lives there).
    pub req_tag_offset: u64,
    pub req_niche_base: u64,
    pub req_dataful_variant: u64,
    /// Offset of `appid: String` inside the `SpawnWorker` variant.
    pub req_spawn_appid: u64,
    /// Offset of `handle: WorkerHandle` inside the `TerminateWorker` and `Fetch` variants.
    pub req_handle: u64,
    /// `lru_time_cache::LruCache`: offset of `capacity`, and of its LRU order
    /// `list: VecDeque<Key>`'s buffer pointer, buffer capacity, head index and length.
    pub lru_capacity: u64,
    pub lru_list_ptr: u64,
    pub lru_list_cap: u64,
    pub lru_list_head: u64,
    pub lru_list_len: u64,
    /// Size of the cache's key (`AppId` / `String`).
    pub lru_key_size: u64,
}

const _: () = assert!(core::mem::size_of::<Layout>() == 13 * 8);

impl Layout {
    /// The RPC method of a request enum, from its tag word.
    #[inline(always)]
    pub fn method_of(&self, tag: u64) -> u32 {
        if tag >= self.req_niche_base {
            let v = tag - self.req_niche_base;
            if v < method::UNKNOWN as u64 && v != self.req_dataful_variant {
                return v as u32;
            }
            return method::UNKNOWN;
        }
        self.req_dataful_variant as u32
    }
}

impl Layout {
    /// The layout rustc 1.67 and later (through 1.96, checked) give these types on x86_64.
    pub const DEFAULT: Layout = Layout {
        string_ptr: 8,
        string_len: 16,
        req_tag_offset: 0,
        req_niche_base: 0x8000_0000_0000_0000,
        req_dataful_variant: method::SPAWN_WORKER as u64,
        req_spawn_appid: 0,
        req_handle: 8,
        // LruCache { list: VecDeque { cap, ptr, head, len }, time_to_live, map, capacity }
        lru_capacity: 72,
        lru_list_ptr: 8,
        lru_list_cap: 0,
        lru_list_head: 16,
        lru_list_len: 24,
        lru_key_size: 24,
    };
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::HandleKey {}
    unsafe impl aya::Pod for super::Layout {}
}
