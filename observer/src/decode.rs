//! Pure decoders of what the probes send: ring buffer records and strings read from the
//! target's memory, which are untrusted until validated here.

use observer_common::{event, role, Header, Kind, Peer, Str, MAX_STR, WIRE_HEAD};

/// A ring buffer record, decoded for the app tracker (`crate::model::tracker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    CacheInsert {
        cache: u64,
        key: Bytes,
        /// The value argument looks like a freshly made `Arc` (strong = weak = 1).
        fresh_arc: bool,
        /// Entries the insert drops to stay within capacity (if `key` is new), and the first.
        evicts: u64,
        evicted: Option<Bytes>,
        ktime_ns: u64,
    },
    CacheRemove {
        cache: u64,
        key: Bytes,
        ktime_ns: u64,
    },
    Spawn {
        client: u64,
        app: Bytes,
        ktime_ns: u64,
    },
    Terminate {
        handle: Bytes,
        ktime_ns: u64,
    },
    FetchUnknown {
        client: u64,
        handle: Bytes,
        ktime_ns: u64,
    },
}

/// A string from target memory: the bytes read and the length it claimed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bytes {
    pub data: Vec<u8>,
    pub full_len: u64,
}

impl Bytes {
    pub fn new(s: &str) -> Self {
        Self::whole(s.as_bytes())
    }

    /// Bytes read whole (their length is theirs).
    pub fn whole(b: &[u8]) -> Self {
        Bytes {
            data: b.to_vec(),
            full_len: b.len() as u64,
        }
    }

    /// The string a record carries (its length checked by `record`).
    fn of(s: &Str) -> Self {
        Bytes {
            data: s.bytes[..(s.len as usize).min(MAX_STR)].to_vec(),
            full_len: s.full_len,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {1}")]
    Size(usize, usize),
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("string length {0} exceeds the {MAX_STR} bytes carried")]
    StrLen(u32),
}

/// A ring buffer record as the kernel's typed record of its kind (`observer_common::event`),
/// its size and string lengths checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `Kind::CacheInsert` or `Kind::CacheRemove`.
    Cache(Kind, event::CacheOp),
    /// `Kind::RpcSpawn` ..= `Kind::RpcOther`.
    Call(Kind, event::RpcCall),
    HttpRequest(event::HttpRequest),
    HttpResponse(event::HttpResponse),
    SchedError(event::SchedError),
    /// `Kind::WireFrame` or `Kind::WireEnd`.
    Wire(Kind, event::WireFrame),
    ServerCall(event::ServerCall),
}

impl Record {
    /// When its probe ran.
    pub fn ktime_ns(&self) -> u64 {
        self.header().ktime_ns
    }

    pub fn header(&self) -> &Header {
        match self {
            Record::Cache(_, r) => &r.header,
            Record::Call(_, r) => &r.header,
            Record::HttpRequest(r) => &r.header,
            Record::HttpResponse(r) => &r.header,
            Record::SchedError(r) => &r.header,
            Record::Wire(_, r) => &r.header,
            Record::ServerCall(r) => &r.header,
        }
    }
}

/// The `T` at the start of `rec`, if `rec` holds one.
fn read<T: Copy>(rec: &[u8]) -> Result<T, DecodeError> {
    let want = std::mem::size_of::<T>();
    if rec.len() < want {
        return Err(DecodeError::Size(rec.len(), want));
    }
    // SAFETY: every record type is plain old data of this size (`observer_common::event`),
    // for which any bytes are a value; read_unaligned copes with any alignment.
    Ok(unsafe { std::ptr::read_unaligned(rec.as_ptr() as *const T) })
}

fn checked(s: &Str) -> Result<(), DecodeError> {
    if s.len as usize > MAX_STR {
        return Err(DecodeError::StrLen(s.len));
    }
    Ok(())
}

/// Decodes a ring buffer record by the kind its header names.
pub fn record(rec: &[u8]) -> Result<Record, DecodeError> {
    let h: Header = read(rec)?;
    let k = Kind::from_u32(h.kind).ok_or(DecodeError::Kind(h.kind))?;
    Ok(match k {
        Kind::CacheInsert | Kind::CacheRemove => {
            let r: event::CacheOp = read(rec)?;
            checked(&r.key)?;
            checked(&r.evicted)?;
            Record::Cache(k, r)
        }
        Kind::RpcSpawn
        | Kind::RpcTerminate
        | Kind::RpcFetchUnknown
        | Kind::RpcFetch
        | Kind::RpcOther => {
            let r: event::RpcCall = read(rec)?;
            checked(&r.arg)?;
            Record::Call(k, r)
        }
        Kind::HttpRequest => Record::HttpRequest(read(rec)?),
        Kind::HttpResponse => Record::HttpResponse(read(rec)?),
        Kind::SchedError => Record::SchedError(read(rec)?),
        Kind::WireFrame | Kind::WireEnd => {
            let r: event::WireFrame = read(rec)?;
            if r.head_len as usize > WIRE_HEAD {
                return Err(DecodeError::StrLen(r.head_len));
            }
            Record::Wire(k, r)
        }
        Kind::ServerCall => Record::ServerCall(read(rec)?),
    })
}

/// What the app tracker takes from a record, if anything: the per-request kinds (most
/// records) go to `request_event` and allocate nothing here, the served calls to
/// `crate::model::runtime_server` as they are.
pub fn decode_event(r: &Record) -> Option<Decoded> {
    let t = r.ktime_ns();
    Some(match r {
        Record::Cache(Kind::CacheInsert, c) => Decoded::CacheInsert {
            cache: c.cache,
            key: Bytes::of(&c.key),
            fresh_arc: c.value_words == [1, 1],
            evicts: c.evicts,
            evicted: (c.evicts > 0).then(|| Bytes::of(&c.evicted)),
            ktime_ns: t,
        },
        Record::Cache(_, c) => Decoded::CacheRemove {
            cache: c.cache,
            key: Bytes::of(&c.key),
            ktime_ns: t,
        },
        Record::Call(Kind::RpcSpawn, c) => Decoded::Spawn {
            client: c.client,
            app: Bytes::of(&c.arg),
            ktime_ns: t,
        },
        Record::Call(Kind::RpcTerminate, c) => Decoded::Terminate {
            handle: Bytes::of(&c.arg),
            ktime_ns: t,
        },
        Record::Call(Kind::RpcFetchUnknown, c) => Decoded::FetchUnknown {
            client: c.client,
            handle: Bytes::of(&c.arg),
            ktime_ns: t,
        },
        _ => return None,
    })
}

/// A runtime RPC's identity: its context's trace id (a random `u128` per call), which the call
/// and its request frame on the wire both carry.
pub type CallId = u128;

/// What a sent RPC carries, by kind (`observer-ebpf/src/rpc.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKind {
    /// `spawn_worker`, with the app id.
    Spawn { app: Bytes },
    /// `fetch` on a worker the kernel knows: the app slot it looked up, and the handle.
    Fetch { slot: u32, handle: Bytes },
    /// `fetch` on a worker the kernel does not know yet.
    FetchUnknown { handle: Bytes },
    /// `terminate_worker`.
    Terminate,
    /// Any other method (`observer_common::method`).
    Other { method: u32 },
}

/// A request-path record, decoded for the joins (`crate::model::requests`): each kind's
/// fields named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestEvent {
    /// hyper hands a parsed request to the proxy's service; `key`: its service future;
    /// `sock`: its client's connection (0: not known).
    Start { key: u64, sock: u64, ktime_ns: u64 },
    /// A runtime RPC is sent on the client at `client`, on the connection `conn`; `conn_open`:
    /// whether that connection's dispatch task still ran.
    Call {
        call: CallKind,
        client: u64,
        conn: u64,
        conn_open: bool,
        id: CallId,
        ktime_ns: u64,
    },
    /// A tarpc frame on the connection `sock` to a runtime (`peer`): sent by the proxy (a
    /// request or a cancel) or received (an answer); `head`: its first bytes
    /// (`crate::model::requests::wire` decodes them).
    Frame {
        sock: u64,
        direction: u32,
        /// Inline, not a `Vec`: one frame per call and answer, no allocation per event.
        head: [u8; WIRE_HEAD],
        head_len: usize,
        peer: Peer,
        ktime_ns: u64,
    },
    /// The connection `sock` to a runtime ended under the proxy.
    WireEnd { sock: u64 },
    /// The proxy builds the response of one of its own errors (`SchedError`'s discriminant).
    SchedError { tid: u32, error: u64, ktime_ns: u64 },
    /// A response head with `status` is sent on the client's connection `sock`, by the
    /// thread `tid`.
    Response {
        sock: u64,
        status: u32,
        tid: u32,
        ktime_ns: u64,
    },
}

/// futures-channel 0.3 `mpsc`'s `OPEN_MASK`: the high bit of a channel's state.
const CONN_OPEN: u64 = 1 << 63;

/// Whether a call's connection was open, from its channel's state word: closed only when the
/// word reads as a closed state (the open bit clear, a count of queued messages left). A word
/// that is no state (a wrong `chan_state` on another compiler lands on a pointer, which the
/// low half of the address space keeps above 2^32) reads as open: a call is never failed on
/// a misread.
pub fn conn_open(state: u64) -> bool {
    state & CONN_OPEN != 0 || state >= 1 << 32
}

/// A trace id from its two words in memory (a little-endian `u128`).
pub fn trace_id(words: [u64; 2]) -> CallId {
    u128::from(words[0]) | (u128::from(words[1]) << 64)
}

/// The request-path event a record is, if it is one.
pub fn request_event(r: &Record) -> Option<RequestEvent> {
    let t = r.ktime_ns();
    Some(match r {
        Record::HttpRequest(h) => RequestEvent::Start {
            key: h.key,
            sock: h.sock,
            ktime_ns: t,
        },
        Record::Call(k, c) => RequestEvent::Call {
            call: match k {
                Kind::RpcSpawn => CallKind::Spawn {
                    app: Bytes::of(&c.arg),
                },
                Kind::RpcTerminate => CallKind::Terminate,
                Kind::RpcFetch => CallKind::Fetch {
                    slot: c.slot,
                    handle: Bytes::of(&c.arg),
                },
                Kind::RpcFetchUnknown => CallKind::FetchUnknown {
                    handle: Bytes::of(&c.arg),
                },
                _ => CallKind::Other { method: c.method },
            },
            client: c.client,
            conn: c.conn,
            conn_open: conn_open(c.conn_state),
            id: trace_id(c.trace_id),
            ktime_ns: t,
        },
        // A runtime's end of the wire is its served calls (`model::runtime_server`).
        Record::Wire(_, w) if w.role != role::PROXY => return None,
        Record::Wire(Kind::WireEnd, w) => RequestEvent::WireEnd { sock: w.sock },
        Record::Wire(_, w) => RequestEvent::Frame {
            sock: w.sock,
            direction: w.direction,
            head: w.head,
            head_len: w.head_len as usize,
            peer: w.peer,
            ktime_ns: t,
        },
        Record::SchedError(e) => RequestEvent::SchedError {
            tid: e.header.tid,
            error: e.error,
            ktime_ns: t,
        },
        Record::HttpResponse(h) => RequestEvent::Response {
            sock: h.sock,
            status: h.status,
            tid: h.header.tid,
            ktime_ns: t,
        },
        Record::Cache(..) | Record::ServerCall(_) => return None,
    })
}

/// Why a string was refused as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Empty,
    TooLong,
    NotUtf8,
    BadChar,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Empty => "empty",
            Refused::TooLong => "too_long",
            Refused::NotUtf8 => "not_utf8",
            Refused::BadChar => "bad_char",
        }
    }
}

/// Longest app id accepted as a label (rusty-workers' ids are 36-byte UUIDs).
pub const MAX_LABEL: usize = 64;

/// Validates an app id read from target memory before it becomes a label value. Accepts the
/// characters of ids, hostnames and paths; anything else (quotes, backslashes, controls,
/// newlines, non-UTF-8) is refused, not escaped, so no label can be forged or broken.
pub fn app_label(b: &Bytes) -> Result<String, Refused> {
    if b.full_len == 0 || b.data.is_empty() {
        return Err(Refused::Empty);
    }
    if b.full_len as usize > MAX_LABEL || b.data.len() > MAX_LABEL {
        return Err(Refused::TooLong);
    }
    let s = std::str::from_utf8(&b.data).map_err(|_| Refused::NotUtf8)?;
    if !s
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-_.:/@+~=".contains(&c))
    {
        return Err(Refused::BadChar);
    }
    Ok(s.to_string())
}

/// Building records as the kernel sends them, for tests.
#[cfg(test)]
pub(crate) mod fake {
    use observer_common::{Header, Kind, Record, Str, MAX_STR};

    /// A zeroed record of kind `k` at `t` from thread 1, filled by `f`.
    pub fn rec<T: Record>(k: Kind, t: u64, f: impl FnOnce(&mut T)) -> T {
        // SAFETY: every record type is plain old data, for which all-zero bytes are a value.
        let mut r: T = unsafe { std::mem::zeroed() };
        *r.header_mut() = Header {
            kind: k as u32,
            tid: 1,
            ktime_ns: t,
        };
        f(&mut r);
        r
    }

    /// A record's bytes, as the ring buffer holds them.
    pub fn bytes<T: Copy>(r: &T) -> Vec<u8> {
        let p = r as *const T as *const u8;
        // SAFETY: reading the bytes of a padding-free plain old data value.
        unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<T>()) }.to_vec()
    }

    pub fn string(s: &[u8], full_len: u64) -> Str {
        let mut out = Str {
            len: s.len() as u32,
            _pad: 0,
            full_len,
            bytes: [0; MAX_STR],
        };
        out.bytes[..s.len()].copy_from_slice(s);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{bytes, rec, string};
    use super::*;
    use observer_common::event::*;
    use observer_common::method;

    fn call(k: Kind) -> Vec<u8> {
        bytes(&rec(k, 7, |c: &mut RpcCall| {
            c.header.tid = 9;
            c.client = 0xa;
            c.conn = 0xb;
            c.conn_state = 1 << 63;
            c.trace_id = [0xc, 0xd];
            c.method = 3;
            c.slot = 3;
            c.arg = string(b"h1", 2);
        }))
    }

    #[test]
    fn request_events_name_what_each_kind_carries() {
        let of = |r: Vec<u8>| request_event(&record(&r).expect("a record"));
        let sent = |call| {
            Some(RequestEvent::Call {
                call,
                client: 0xa,
                conn: 0xb,
                conn_open: true,
                id: 0xc | (0xd << 64),
                ktime_ns: 7,
            })
        };
        let h1 = Bytes::new("h1");
        let cases = [
            (
                "a request",
                bytes(&rec(Kind::HttpRequest, 7, |r: &mut HttpRequest| {
                    r.key = 0xa;
                    r.sock = 0xc;
                })),
                Some(RequestEvent::Start {
                    key: 0xa,
                    sock: 0xc,
                    ktime_ns: 7,
                }),
            ),
            (
                "a spawn",
                call(Kind::RpcSpawn),
                sent(CallKind::Spawn { app: h1.clone() }),
            ),
            (
                "a terminate",
                call(Kind::RpcTerminate),
                sent(CallKind::Terminate),
            ),
            (
                "a fetch",
                call(Kind::RpcFetch),
                sent(CallKind::Fetch {
                    slot: 3,
                    handle: h1.clone(),
                }),
            ),
            (
                "a fetch on an unknown worker",
                call(Kind::RpcFetchUnknown),
                sent(CallKind::FetchUnknown { handle: h1.clone() }),
            ),
            (
                "another method",
                call(Kind::RpcOther),
                sent(CallKind::Other { method: 3 }),
            ),
            (
                "the proxy's own error",
                bytes(&rec(Kind::SchedError, 7, |e: &mut SchedError| {
                    e.header.tid = 9;
                    e.error = 3;
                })),
                Some(RequestEvent::SchedError {
                    tid: 9,
                    error: 3,
                    ktime_ns: 7,
                }),
            ),
            (
                "a response head",
                bytes(&rec(Kind::HttpResponse, 7, |h: &mut HttpResponse| {
                    h.header.tid = 9;
                    h.sock = 0xa;
                    h.status = 502;
                })),
                Some(RequestEvent::Response {
                    sock: 0xa,
                    status: 502,
                    tid: 9,
                    ktime_ns: 7,
                }),
            ),
            (
                "a cache insert",
                bytes(&rec(Kind::CacheInsert, 7, |_: &mut CacheOp| {})),
                None,
            ),
            (
                "a served call",
                bytes(&rec(Kind::ServerCall, 7, |_: &mut ServerCall| {})),
                None,
            ),
        ];
        for (what, r, want) in cases {
            assert_eq!(of(r), want, "{what}");
        }
        let peer = Peer {
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 9000,
            family: observer_common::family::INET,
            _pad: 0,
        };
        let frame = rec(Kind::WireFrame, 7, |w: &mut WireFrame| {
            w.sock = 0xa;
            w.direction = observer_common::wire::RECEIVED;
            w.frame_len = 90;
            w.peer = peer;
            w.head[..2].copy_from_slice(b"h1");
            w.head_len = 2;
            w.tgid = 40;
            w.role = role::PROXY;
        });
        assert_eq!(
            of(bytes(&frame)),
            Some(RequestEvent::Frame {
                sock: 0xa,
                direction: observer_common::wire::RECEIVED,
                head: frame.head,
                head_len: 2,
                peer,
                ktime_ns: 7,
            }),
            "a frame names its connection, direction, head and peer"
        );
        let end = rec(Kind::WireEnd, 7, |w: &mut WireFrame| {
            w.sock = 0xa;
            w.role = role::PROXY;
        });
        assert_eq!(
            of(bytes(&end)),
            Some(RequestEvent::WireEnd { sock: 0xa }),
            "a connection's end"
        );
        for (what, r) in [("frame", frame), ("end", end)] {
            let mut theirs = r;
            theirs.role = role::RUNTIME;
            assert_eq!(
                of(bytes(&theirs)),
                None,
                "a runtime's {what} is its served calls', not the proxy's joins'"
            );
        }
        let mut long = frame;
        long.head_len = observer_common::WIRE_HEAD as u32 + 1;
        assert!(
            record(&bytes(&long)).is_err(),
            "a head longer than the kernel copies is refused"
        );
    }

    #[test]
    fn a_connection_reads_closed_only_from_a_closed_state() {
        let cases = [
            ("open, idle", 1u64 << 63, true),
            ("open, 3 queued", (1 << 63) | 3, true),
            ("closed, idle", 0, false),
            ("closed, 2 left", 2, false),
            ("a heap pointer, not a state", 0x55b0_038a_e9d0, true),
            ("unread (u64::MAX)", u64::MAX, true),
        ];
        for (what, state, want) in cases {
            assert_eq!(conn_open(state), want, "{what}");
        }
    }

    fn cache(k: Kind, key: &[u8], full: u64, value_words: [u64; 2]) -> CacheOp {
        rec(k, 42, |c: &mut CacheOp| {
            c.cache = 0x10;
            c.value = 0x20;
            c.value_words = value_words;
            c.key = string(key, full);
        })
    }

    #[test]
    fn decodes_every_kind() {
        let mut evicting = cache(Kind::CacheInsert, b"app", 3, [1, 1]);
        evicting.evicts = 1;
        evicting.evicted = string(b"old", 3);
        let rpc = |k: Kind, client: u64, arg: &[u8]| {
            bytes(&rec(k, 42, |c: &mut RpcCall| {
                c.client = client;
                c.arg = string(arg, arg.len() as u64);
            }))
        };
        let served = |method: u32, polls: u64| {
            bytes(&rec(Kind::ServerCall, 42, |c: &mut ServerCall| {
                c.tgid = 1234;
                c.method = method;
                c.polls = polls;
            }))
        };
        let cases: Vec<(&str, Vec<u8>, Option<Decoded>)> = vec![
            (
                "an insert of a fresh Arc",
                bytes(&cache(Kind::CacheInsert, b"app", 3, [1, 1])),
                Some(Decoded::CacheInsert {
                    cache: 0x10,
                    key: Bytes::new("app"),
                    fresh_arc: true,
                    evicts: 0,
                    evicted: None,
                    ktime_ns: 42,
                }),
            ),
            (
                "an insert that evicts",
                bytes(&evicting),
                Some(Decoded::CacheInsert {
                    cache: 0x10,
                    key: Bytes::new("app"),
                    fresh_arc: true,
                    evicts: 1,
                    evicted: Some(Bytes::new("old")),
                    ktime_ns: 42,
                }),
            ),
            (
                "an insert of something else",
                bytes(&cache(Kind::CacheInsert, b"example.com", 11, [0x7f00, 0])),
                Some(Decoded::CacheInsert {
                    cache: 0x10,
                    key: Bytes::new("example.com"),
                    fresh_arc: false,
                    evicts: 0,
                    evicted: None,
                    ktime_ns: 42,
                }),
            ),
            (
                "a remove",
                bytes(&cache(Kind::CacheRemove, b"app", 3, [0, 0])),
                Some(Decoded::CacheRemove {
                    cache: 0x10,
                    key: Bytes::new("app"),
                    ktime_ns: 42,
                }),
            ),
            (
                "a spawn",
                rpc(Kind::RpcSpawn, 0x30, b"app"),
                Some(Decoded::Spawn {
                    client: 0x30,
                    app: Bytes::new("app"),
                    ktime_ns: 42,
                }),
            ),
            (
                "a terminate",
                rpc(Kind::RpcTerminate, 0, b"h1"),
                Some(Decoded::Terminate {
                    handle: Bytes::new("h1"),
                    ktime_ns: 42,
                }),
            ),
            (
                "a fetch on an unknown worker",
                rpc(Kind::RpcFetchUnknown, 0x40, b"h1"),
                Some(Decoded::FetchUnknown {
                    client: 0x40,
                    handle: Bytes::new("h1"),
                    ktime_ns: 42,
                }),
            ),
            (
                "a fetch on a known worker",
                rpc(Kind::RpcFetch, 0, b"h1"),
                None,
            ),
        ];
        for (what, r, want) in cases {
            assert_eq!(decode(&r), Ok(want), "{what}");
        }
        // Served calls go to the model as they are: the tracker takes nothing from them, and
        // `ServerMetrics::polled` names a method past the known ones `unknown`.
        for (method, polls) in [(method::FETCH, 2), (77, 0)] {
            let r = record(&served(method, polls)).expect("a served call");
            let Record::ServerCall(c) = &r else {
                panic!("a served call decodes as one: {r:?}");
            };
            assert_eq!(
                (c.tgid, c.method, c.polls),
                (1234, method, polls),
                "a served call's fields"
            );
            assert_eq!(decode_event(&r), None, "the tracker takes nothing from it");
        }
    }

    /// A record as the tracker sees it.
    fn decode(r: &[u8]) -> Result<Option<Decoded>, DecodeError> {
        record(r).map(|r| decode_event(&r))
    }

    #[test]
    fn refuses_malformed_records() {
        assert_eq!(
            decode(&[0u8; 8]),
            Err(DecodeError::Size(8, std::mem::size_of::<Header>())),
            "shorter than a header"
        );
        let mut unknown = bytes(&rec(Kind::HttpRequest, 0, |_: &mut HttpRequest| {}));
        unknown[..4].copy_from_slice(&99u32.to_ne_bytes());
        assert_eq!(decode(&unknown), Err(DecodeError::Kind(99)), "unknown kind");
        let mut cut = rpc_bytes();
        cut.truncate(40);
        assert_eq!(
            decode(&cut),
            Err(DecodeError::Size(40, std::mem::size_of::<RpcCall>())),
            "a record cut short of its kind's size"
        );
        let mut long = rec(Kind::RpcSpawn, 0, |_: &mut RpcCall| {});
        long.arg.len = 1000;
        assert_eq!(
            decode(&bytes(&long)),
            Err(DecodeError::StrLen(1000)),
            "a string longer than carried"
        );
    }

    fn rpc_bytes() -> Vec<u8> {
        bytes(&rec(Kind::RpcSpawn, 0, |_: &mut RpcCall| {}))
    }

    #[test]
    fn label_validation() {
        let long = "a".repeat(65);
        let cases: Vec<(Bytes, Result<String, Refused>)> = vec![
            (
                Bytes::new("afb38b70-d0bb-4102-8248-765e6c1d7dde"),
                Ok("afb38b70-d0bb-4102-8248-765e6c1d7dde".into()),
            ),
            (
                Bytes::new("app.example.com/x"),
                Ok("app.example.com/x".into()),
            ),
            (Bytes::new(""), Err(Refused::Empty)),
            (Bytes::new(&long), Err(Refused::TooLong)),
            (
                Bytes {
                    data: b"abc".to_vec(),
                    full_len: 5000,
                },
                Err(Refused::TooLong),
            ),
            (
                Bytes {
                    data: vec![0xff, 0xfe],
                    full_len: 2,
                },
                Err(Refused::NotUtf8),
            ),
            (Bytes::new("a\"b"), Err(Refused::BadChar)),
            (Bytes::new("a\nb"), Err(Refused::BadChar)),
            (Bytes::new("a\\b"), Err(Refused::BadChar)),
            (Bytes::new("a}b"), Err(Refused::BadChar)),
        ];
        for (input, want) in cases {
            assert_eq!(app_label(&input), want, "{input:?}");
        }
    }
}
