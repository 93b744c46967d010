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
///
/// The RPC kinds (`RPC_SPAWN` .. `RPC_OTHER`) all carry the call's identity: `ptr_a` = the
/// client (`&mut Channel`), `ptr_b` = its connection (the cancellation sender's `Arc`, one per
/// runtime connection), `word_b`/`word_c` = the trace id of its context (random per
/// `tarpc::context::current()`, which rusty-workers makes for every call; the request id is
/// taken inside the call, too late to read race-free at its entry).
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
    /// A `fetch` RPC on a handle the kernel knows: `word_a` = its app slot, `str` = the handle.
    pub const RPC_FETCH: u32 = 6;
    /// Any other RPC (`id`, `load`, `list_workers`): `word_a` = the method.
    pub const RPC_OTHER: u32 = 7;
    /// hyper's HTTP/1 server took a request: `ptr_a` = the request's key (what
    /// `Server::recv_msg` receives: the box its service future goes into).
    pub const HTTP_REQUEST: u32 = 8;
    /// hyper's HTTP/1 server encodes a response head: `ptr_a` = the connection, `ptr_b` = the
    /// request key read from it (0 until userspace has learnt where it is). Until then the
    /// record is a `ConnSnapshot` (`word_a` = 1 if its words were read).
    pub const HTTP_RESPONSE: u32 = 9;
    /// `SchedError::build_response`: `word_a` = the error's discriminant.
    pub const SCHED_ERROR: u32 = 10;
    /// A runtime's answer reached its caller's oneshot: `ptr_a` = the oneshot, `str` = the
    /// first `MAX_STR` bytes of the in-memory `tarpc::Response`, `str2` = its string (runtime
    /// id, worker handle), and the runtime's address as the thread last received from it:
    /// `ptr_b`/`word_b` = its 16 bytes (IPv4: the first 4), `word_c` = port | family << 16
    /// (0: unknown).
    pub const RPC_RESPONSE: u32 = 11;
    /// A call's response future is dropped: `ptr_a` = its oneshot, `ptr_b` = its connection,
    /// `word_b`/`word_c` = its trace id, `word_a` = 1 if it completed.
    pub const RPC_DONE: u32 = 12;
    /// A runtime's tarpc method future ended (dropped): `word_a` = the method, `word_b` = ns
    /// from its first poll, `word_c` = its polls, `ptr_a` = the process (tgid).
    pub const SERVER_CALL: u32 = 13;
    /// The highest kind: events past it do not decode.
    pub const LAST: u32 = SERVER_CALL;
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
    /// A hook run that ended on an error (a failed read, a full ring buffer or map).
    pub const HOOK_ERRORS: u32 = 2;
    pub const COUNT: u32 = 3;
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
    /// The thread that ran the probe.
    pub tid: u32,
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
            tid: 0,
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

/// Defines `Layout` from one list: each field's doc, name and default (the layout rustc 1.67
/// and later, through 1.96, checked, give these types on x86_64), with `Layout::DEFAULT`,
/// `Layout::FIELDS` and `Layout::field_mut` (the catalog's `[layout]` overrides by name).
macro_rules! layout {
    ($($(#[$doc:meta])* $field:ident = $default:expr,)*) => {
        /// How to read a Rust `String` and the tarpc request enum in target memory. Filled in
        /// by userspace from the catalog (the layouts are the compiler's, not the language's)
        /// and read by the programs as a global.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct Layout {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl Layout {
            /// The layout rustc 1.67 and later (through 1.96, checked) give these types on
            /// x86_64.
            pub const DEFAULT: Layout = Layout { $($field: $default,)* };
            /// Every field's name, in order.
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field),)*];

            /// The field named `name`, to override it.
            pub fn field_mut(&mut self, name: &str) -> Option<&mut u64> {
                match name {
                    $(stringify!($field) => Some(&mut self.$field),)*
                    _ => None,
                }
            }
        }
    };
}

layout! {
    /// Offset of the data pointer inside a `String` (rustc >= 1.67: `{cap, ptr, len}`).
    string_ptr = 8,
    /// Offset of the length inside a `String`.
    string_len = 16,
    /// Request enum: tag word offset; values `>= niche_base` are `niche_base + variant`,
    /// anything below is the dataful variant (its first field's capacity lives there).
    req_tag_offset = 0,
    req_niche_base = 0x8000_0000_0000_0000,
    req_dataful_variant = method::SPAWN_WORKER as u64,
    /// Offset of `appid: String` inside the `SpawnWorker` variant.
    req_spawn_appid = 0,
    /// Offset of `handle: WorkerHandle` inside the `TerminateWorker` and `Fetch` variants.
    req_handle = 8,
    /// `lru_time_cache::LruCache`: offset of `capacity`, and of its LRU order
    /// `list: VecDeque<Key>`'s buffer pointer, buffer capacity, head index and length
    /// (`LruCache { list: VecDeque { cap, ptr, head, len }, time_to_live, map, capacity }`).
    lru_capacity = 72,
    lru_list_ptr = 8,
    lru_list_cap = 0,
    lru_list_head = 16,
    lru_list_len = 24,
    /// Size of the cache's key (`AppId` / `String`).
    lru_key_size = 24,
    /// tarpc `Channel`: offset of its cancellation sender (an `Arc`, one per connection).
    chan_cancel = 0,
    /// `tarpc::context::Context`: offset of its trace id (a `u128`).
    ctx_trace_id = 16,
    /// tarpc `DispatchResponse`: offsets of its context, oneshot receiver, cancellation
    /// sender and `complete` flag.
    dr_ctx = 0,
    dr_response = 64,
    dr_cancel = 72,
    dr_complete = 88,
    /// `tarpc::Response<RuntimeServiceResponse>`: the niche base of its first word, the tags
    /// of the `Id` and `SpawnWorker` answers, and where their strings are.
    resp_niche_base = 0x8000_0000_0000_0000,
    resp_tag_id = 1,
    resp_tag_spawn = 2,
    resp_id_string = 8,
    resp_spawn_string = 16,
}

const _: () = assert!(core::mem::size_of::<Layout>() == 24 * 8);

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

/// How the response-head probe finds the request key from the connection: learnt by
/// userspace (hyper's dispatcher holds both, at an offset the compiler chose), then set here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    /// 0: not learnt yet; 1: the key is the word at `conn + offset`; 2: it is `conn + offset`.
    pub mode: u64,
    pub offset: i64,
}

const _: () = assert!(core::mem::size_of::<ConnKey>() == 16);

/// Bytes of the connection's memory on each side of it that a `ConnSnapshot` holds. hyper
/// 0.14's `Dispatcher` (the connection with the request's service beside it) is well under
/// 1 KiB on x86_64; the test target's key sits 536 bytes past the connection.
pub const CONN_WINDOW: u64 = 2048;
pub const CONN_SNAP_WORDS: usize = 2 * CONN_WINDOW as usize / 8;

/// A response head's event with the memory around its connection, copied by the kernel when
/// the head is encoded. Userspace learns where the request key is from these; it cannot read
/// that memory later itself, because by then a closed connection's memory holds the next one.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnSnapshot {
    pub ev: Event,
    /// The words from `ev.ptr_a - CONN_WINDOW` on (zero if the read failed).
    pub words: [u64; CONN_SNAP_WORDS],
}

const _: () = assert!(
    core::mem::size_of::<ConnSnapshot>()
        == core::mem::size_of::<Event>() + 2 * CONN_WINDOW as usize
);

pub mod conn_key {
    pub const UNKNOWN: u64 = 0;
    pub const LOAD: u64 = 1;
    pub const ADDRESS: u64 = 2;
}

/// Address families of `Peer::family` (include/linux/socket.h).
pub mod family {
    pub const INET: u16 = 2;
    pub const INET6: u16 = 10;
}

/// The last peer a thread received from (the `sock_recv` tracepoint's output).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Peer>() == 24);

/// Processes whose socket traffic the kernel counts (the proxy and the runtimes), at most.
pub const MAX_PROCS: u32 = 256;

/// A watched process, by thread group id in the `WATCHED` map: where its network counters are
/// and what it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    /// Index of its counters: `slot * netstat::COUNT + netstat::*` in `PROC_NET`.
    pub slot: u32,
    /// `role::*`.
    pub role: u32,
}

const _: () = assert!(core::mem::size_of::<Watched>() == 8);

pub mod role {
    pub const PROXY: u32 = 1;
    pub const RUNTIME: u32 = 2;
}

/// Per-process socket counters (`PROC_NET`), TCP and UDP over IPv4 and IPv6.
pub mod netstat {
    pub const BYTES_SENT: u32 = 0;
    pub const MESSAGES_SENT: u32 = 1;
    pub const BYTES_RECEIVED: u32 = 2;
    pub const MESSAGES_RECEIVED: u32 = 3;
    pub const COUNT: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Watched {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::HandleKey {}
    unsafe impl aya::Pod for super::Layout {}
}
