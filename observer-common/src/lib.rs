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

/// Defines `Kind` from one list, with `Kind::from_u32` for the kernel's untrusted word.
macro_rules! kinds {
    ($($(#[$doc:meta])* $name:ident = $n:literal,)*) => {
        /// Event kinds sent through the ring buffer: `Header::kind`, and which record type
        /// follows. One record type per hook family (`event`), each starting with a `Header`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kind {
            $($(#[$doc])* $name = $n,)*
        }

        impl Kind {
            /// The kind a header's word names, if any: the kernel's bytes are untrusted.
            pub const fn from_u32(k: u32) -> Option<Kind> {
                match k {
                    $($n => Some(Kind::$name),)*
                    _ => None,
                }
            }
        }
    };
}

kinds! {
    /// `LruCache::insert` on an LRU cache (`event::CacheOp`).
    CacheInsert = 1,
    /// `LruCache::remove` (`event::CacheOp`).
    CacheRemove = 2,
    /// A `spawn_worker` RPC (`event::RpcCall`, `arg` = the app id).
    RpcSpawn = 3,
    /// A `terminate_worker` RPC (`event::RpcCall`, `arg` = the worker handle).
    RpcTerminate = 4,
    /// A `fetch` RPC on a worker handle the kernel had no app for (`event::RpcCall`, `arg` =
    /// the handle).
    RpcFetchUnknown = 5,
    /// A `fetch` RPC on a handle the kernel knows (`event::RpcCall`, `slot` = its app slot,
    /// `arg` = the handle).
    RpcFetch = 6,
    /// Any other RPC: `id`, `load`, `list_workers` (`event::RpcCall`, `method`).
    RpcOther = 7,
    /// hyper's HTTP/1 server took a request (`event::HttpRequest`).
    HttpRequest = 8,
    /// The proxy sent a response head on a client's connection (`event::HttpResponse`).
    HttpResponse = 9,
    /// `SchedError::build_response` (`event::SchedError`).
    SchedError = 10,
    /// The head of a tarpc frame on a connection between the proxy and a runtime
    /// (`event::WireFrame`): a request or cancel the proxy sent, an answer it received.
    WireFrame = 11,
    /// Such a connection ended under the proxy: end of stream or an error on it
    /// (`event::WireFrame`, no head).
    WireEnd = 12,
    /// A runtime's tarpc method future ended (`event::ServerCall`).
    ServerCall = 13,
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

    /// The method `m` stands for: itself, or `UNKNOWN` past the known methods.
    pub const fn known(m: u32) -> u32 {
        if m < UNKNOWN {
            m
        } else {
            UNKNOWN
        }
    }

    /// The `method` label of `m`: its name, `unknown` past the known methods.
    pub fn name(m: u32) -> &'static str {
        NAMES[known(m) as usize]
    }
}

/// The eBPF programs that count their own runs (`PROGRAM_RUNS` per-CPU array), by index;
/// `NAMES` are their names in the object, the `program` label. Counted by the programs, not
/// by the kernel's BPF statistics: those cost two clock reads per run of every program, on
/// every socket call of the host (`--bpf-stats` turns them on, for the time spent).
/// `floor_uprobe` stays empty: it is the bench's floor.
pub mod program {
    pub const LRU_INSERT: u32 = 0;
    pub const LRU_REMOVE: u32 = 1;
    pub const HTTP_REQUEST: u32 = 2;
    pub const SCHED_ERROR: u32 = 3;
    pub const RPC_CALL: u32 = 4;
    pub const SOCK_SEND: u32 = 5;
    pub const SOCK_RECV: u32 = 6;
    pub const SERVER_POLL: u32 = 7;
    pub const SERVER_POLL_SRET: u32 = 8;
    pub const SERVER_DROP: u32 = 9;
    pub const SOCK_CLOSE: u32 = 10;
    pub const COUNT: u32 = 11;
    pub const NAMES: [&str; COUNT as usize] = [
        "lru_insert",
        "lru_remove",
        "http_request",
        "sched_error",
        "rpc_call",
        "sock_send",
        "sock_recv",
        "server_poll",
        "server_poll_sret",
        "server_drop",
        "sock_close",
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
    /// A socket call on a tarpc connection the kernel could not follow frame by frame (a
    /// buffer shape it does not read, more frames at once than it steps through): it starts
    /// again at the next call, which on tarpc's framed transport begins a frame.
    pub const WIRE_RESYNCS: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// What every record in the ring buffer starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `Kind` as a number.
    pub kind: u32,
    /// The thread that ran the probe.
    pub tid: u32,
    /// `bpf_ktime_get_ns()` at the probe.
    pub ktime_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Header>() == 16);

/// A Rust `String` read from target memory: its first `len` bytes (`<= MAX_STR`) and the
/// length it has there (may exceed `MAX_STR`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Str {
    pub len: u32,
    pub _pad: u32,
    pub full_len: u64,
    pub bytes: [u8; MAX_STR],
}

const _: () = assert!(core::mem::size_of::<Str>() == 16 + MAX_STR);

/// A record type: `Header` first, zeroable (the kernel zeroes a record before filling it, so
/// no stale ring bytes leak out).
pub trait Record: Copy {
    fn header_mut(&mut self) -> &mut Header;
}

/// The records, one type per hook family; the `Kind`s each carries are on `Kind`.
pub mod event {
    use super::{Header, Peer, Record, Str, MAX_STR, WIRE_HEAD};

    /// `LruCache::{insert, remove}` (`observer-ebpf/src/app_cache.rs`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CacheOp {
        pub header: Header,
        /// The cache (`&mut self`).
        pub cache: u64,
        /// Insert: the value argument, and the first two words it points to (an `Arc`'s
        /// strong and weak counts when it is one).
        pub value: u64,
        pub value_words: [u64; 2],
        /// Insert: how many entries it evicts to stay within capacity, and the first of them
        /// (the least recently used).
        pub evicts: u64,
        pub key: Str,
        pub evicted: Str,
    }

    const _: () = assert!(core::mem::size_of::<CacheOp>() == 16 + 5 * 8 + 2 * (16 + MAX_STR));

    /// A runtime RPC sent by the proxy (`observer-ebpf/src/rpc.rs`). Its identity: the
    /// connection (the cancellation sender's `Arc`, one per runtime connection) and the trace
    /// id of its context (random per `tarpc::context::current()`, which rusty-workers makes
    /// for every call; the request id is taken inside the call, too late to read race-free at
    /// its entry).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RpcCall {
        pub header: Header,
        /// The client (`&mut Channel`).
        pub client: u64,
        /// Its connection: the channel its cancellations go through (shared by every clone
        /// of the client, one per connection to a runtime).
        pub conn: u64,
        /// That channel's state word: its high bit is clear once tarpc's dispatch task for
        /// the connection has ended (the call then fails without reaching the wire).
        pub conn_state: u64,
        /// Its context's trace id: which request frame on the wire is the call's.
        pub trace_id: [u64; 2],
        /// `RpcOther`: the method (`method::*`).
        pub method: u32,
        /// `RpcFetch`: the app slot the kernel looked up.
        pub slot: u32,
        /// The app id (spawn) or worker handle (fetch, terminate).
        pub arg: Str,
    }

    const _: () = assert!(core::mem::size_of::<RpcCall>() == 16 + 6 * 8 + 16 + MAX_STR);

    /// hyper took a request (`observer-ebpf/src/http.rs`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HttpRequest {
        pub header: Header,
        /// The request's key: what `Server::recv_msg` receives (the box its service future
        /// goes into).
        pub key: u64,
        /// Its client's connection (`struct sock`): the last one this thread received on, in
        /// the same poll of the connection's task that parsed the head; 0 if not known.
        pub sock: u64,
    }

    const _: () = assert!(core::mem::size_of::<HttpRequest>() == 32);

    /// The proxy sent a response head on a client's connection (`observer-ebpf/src/http.rs`,
    /// from the socket tracepoint).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct HttpResponse {
        pub header: Header,
        /// The connection (`struct sock`): the request's, `HttpRequest::sock`.
        pub sock: u64,
        /// The status code of its status line.
        pub status: u32,
        pub _pad: u32,
    }

    const _: () = assert!(core::mem::size_of::<HttpResponse>() == 32);

    /// `SchedError::build_response`: the proxy answers with one of its own errors.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SchedError {
        pub header: Header,
        /// The error's discriminant (the enum is fieldless).
        pub error: u64,
    }

    const _: () = assert!(core::mem::size_of::<SchedError>() == 24);

    /// The head of one tarpc frame on a proxy <-> runtime connection (`observer-ebpf/src/wire.rs`),
    /// as one of its two ends saw it: the proxy (the client) or a runtime (the server).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct WireFrame {
        pub header: Header,
        /// The connection (its `struct sock` in the process that saw the frame): a key only.
        pub sock: u64,
        /// The frame's length (its 4-byte prefix; the head's bytes follow it).
        pub frame_len: u32,
        /// `wire::SENT` or `wire::RECEIVED`, from the side of the process that saw it.
        pub direction: u32,
        /// The connection's peer: the runtime, in the proxy; the proxy, in a runtime.
        pub peer: Peer,
        /// How many of `head` are the frame's (at most `WIRE_HEAD`).
        pub head_len: u32,
        /// The process that saw it, and its `role::*` (the proxy or a runtime).
        pub tgid: u32,
        pub role: u32,
        pub _pad: u32,
        /// The frame's first bytes: bincode of `tarpc::ClientMessage` or `tarpc::Response`;
        /// past `head_len`, zeros or the next frame's first bytes (`observer-ebpf/src/wire.rs`).
        pub head: [u8; WIRE_HEAD],
    }

    const _: () = assert!(core::mem::size_of::<WireFrame>() == 16 + 16 + 24 + 16 + WIRE_HEAD);

    /// A runtime's tarpc method future ended (`observer-ebpf/src/server.rs`, `--runtime-polls`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ServerCall {
        pub header: Header,
        /// The runtime process.
        pub tgid: u32,
        /// `method::*`.
        pub method: u32,
        /// Polls of its future, from the first to its drop.
        pub polls: u64,
    }

    const _: () = assert!(core::mem::size_of::<ServerCall>() == 16 + 2 * 8);

    macro_rules! records {
        ($($t:ident),*) => {
            $(impl Record for $t {
                fn header_mut(&mut self) -> &mut Header {
                    &mut self.header
                }
            })*
        };
    }

    records!(
        CacheOp,
        RpcCall,
        HttpRequest,
        HttpResponse,
        SchedError,
        WireFrame,
        ServerCall
    );
}

/// Bytes of a tarpc frame the kernel copies past its length prefix: enough for the head of a
/// request (message kind, context, request id, method: 56 bytes at most in bincode's varint
/// encoding) and of an answer (request id, result, method, a 32-byte worker handle or a
/// 36-byte runtime id with their lengths).
pub const WIRE_HEAD: usize = 64;

/// Directions of a tarpc frame, from the proxy's side (`event::WireFrame::direction`).
pub mod wire {
    pub const SENT: u32 = 0;
    pub const RECEIVED: u32 = 1;
}

/// The largest record, for sizing the ring buffer.
pub const MAX_RECORD: usize = core::mem::size_of::<event::CacheOp>();

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
    /// tarpc `Channel`: offset of its cancellation sender (`futures::channel::mpsc::
    /// UnboundedSender`, whose first word is its `Arc<UnboundedInner>`: one per connection).
    chan_cancel = 0,
    /// Offset of the `state` word in that `Arc`'s allocation (the `ArcInner` counts, then
    /// `UnboundedInner` as rustc orders it: the message queue's two pointers first): its high
    /// bit (`OPEN_MASK`) is set while the receiver, in tarpc's dispatch task, lives.
    chan_state = 32,
    /// `tarpc::context::Context`: offset of its trace id (a `u128`).
    ctx_trace_id = 16,
}

const _: () = assert!(core::mem::size_of::<Layout>() == 16 * 8);

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

/// Address families of `Peer::family` (include/linux/socket.h).
pub mod family {
    pub const INET: u16 = 2;
    pub const INET6: u16 = 10;
}

/// The last peer a thread received from (the `sock_recv` tracepoint's output); `family` 0:
/// none.
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
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::Header {}
    unsafe impl aya::Pod for super::HandleKey {}
    unsafe impl aya::Pod for super::Layout {}
}
