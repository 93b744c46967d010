//! Pure decoders of what the probes send: ring buffer records and strings read from the
//! target's memory, which are untrusted until validated here.

use observer_common::{kind, method, ConnSnapshot, Event, CONN_WINDOW, MAX_STR};

/// A ring buffer record, decoded.
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
    /// An event only the request metrics use: `request_event` decodes it for `crate::model::requests`.
    PerRequest,
    /// A runtime's tarpc method call ended (`crate::server`).
    ServerCall {
        tgid: u32,
        method: u32,
        duration_ns: u64,
        polls: u64,
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
        Bytes {
            data: s.as_bytes().to_vec(),
            full_len: s.len() as u64,
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

/// A ring buffer record as an `Event`, its lengths checked.
pub fn event(record: &[u8]) -> Result<Event, DecodeError> {
    let want = std::mem::size_of::<Event>();
    if record.len() < want {
        return Err(DecodeError::Size(record.len(), want));
    }
    // SAFETY: Event is plain old data of this size; read_unaligned copes with any alignment.
    let ev: Event = unsafe { std::ptr::read_unaligned(record.as_ptr() as *const Event) };
    if ev.str_len as usize > MAX_STR {
        return Err(DecodeError::StrLen(ev.str_len));
    }
    if ev.str2_len as usize > MAX_STR {
        return Err(DecodeError::StrLen(ev.str2_len));
    }
    if !(kind::CACHE_INSERT..=kind::LAST).contains(&ev.kind) {
        return Err(DecodeError::Kind(ev.kind));
    }
    Ok(ev)
}

/// The memory around a response head's connection, as the kernel copied it when the head
/// was encoded (`ConnSnapshot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Address of `bytes[0]` in the target.
    pub base: u64,
    pub bytes: Vec<u8>,
}

/// The snapshot a response head's record carries, if it is one whose read succeeded.
pub fn snapshot(record: &[u8], ev: &Event) -> Option<Snapshot> {
    let want = std::mem::size_of::<ConnSnapshot>();
    if ev.kind != kind::HTTP_RESPONSE || record.len() < want || ev.word_a != 1 {
        return None;
    }
    Some(Snapshot {
        base: ev.ptr_a.wrapping_sub(CONN_WINDOW),
        bytes: record[std::mem::size_of::<Event>()..want].to_vec(),
    })
}

impl Snapshot {
    /// Copies `buf.len()` bytes from `addr`, if the snapshot holds all of them.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(start) = addr.checked_sub(self.base) else {
            return false;
        };
        let Ok(start) = usize::try_from(start) else {
            return false;
        };
        match self.bytes.get(start..start.saturating_add(buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

/// `ev.str` as a string read from the target.
pub fn str1(ev: &Event) -> Bytes {
    Bytes {
        data: ev.str[..ev.str_len as usize].to_vec(),
        full_len: ev.str_full_len,
    }
}

/// `ev.str2` as a string read from the target.
pub fn str2(ev: &Event) -> Bytes {
    Bytes {
        data: ev.str2[..ev.str2_len as usize].to_vec(),
        full_len: ev.str2_full_len,
    }
}

pub fn decode(record: &[u8]) -> Result<Decoded, DecodeError> {
    decode_event(&event(record)?)
}

pub fn decode_event(ev: &Event) -> Result<Decoded, DecodeError> {
    // The string is copied out only for the kinds that carry one to the tracker: the
    // per-request kinds (most events) go to `request_event` and allocate nothing here.
    let s = || str1(ev);
    let t = ev.ktime_ns;
    Ok(match ev.kind {
        kind::CACHE_INSERT => Decoded::CacheInsert {
            cache: ev.ptr_a,
            key: s(),
            fresh_arc: ev.word_a == 1 && ev.word_b == 1,
            evicts: ev.word_c,
            evicted: (ev.word_c > 0).then(|| str2(ev)),
            ktime_ns: t,
        },
        kind::CACHE_REMOVE => Decoded::CacheRemove {
            cache: ev.ptr_a,
            key: s(),
            ktime_ns: t,
        },
        kind::RPC_SPAWN => Decoded::Spawn {
            client: ev.ptr_a,
            app: s(),
            ktime_ns: t,
        },
        kind::RPC_TERMINATE => Decoded::Terminate {
            handle: s(),
            ktime_ns: t,
        },
        kind::RPC_FETCH_UNKNOWN => Decoded::FetchUnknown {
            client: ev.ptr_a,
            handle: s(),
            ktime_ns: t,
        },
        kind::RPC_FETCH..=kind::RPC_DONE => Decoded::PerRequest,
        kind::SERVER_CALL => Decoded::ServerCall {
            tgid: u32::try_from(ev.ptr_a).map_err(|_| DecodeError::Kind(ev.kind))?,
            method: u32::try_from(ev.word_a)
                .ok()
                .filter(|m| *m < method::COUNT)
                .unwrap_or(method::UNKNOWN),
            duration_ns: ev.word_b,
            polls: ev.word_c,
        },
        k => return Err(DecodeError::Kind(k)),
    })
}

/// A runtime RPC's identity: its connection (the cancellation sender's `Arc`, one per runtime
/// connection) and its context's trace id, which the call and its end both carry.
pub type CallId = (u64, u64, u64);

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

/// A request-path event, decoded for the joins (`crate::model::requests`): each kind's fields named,
/// so that nothing else reads an `Event`'s raw words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestEvent {
    /// hyper hands a parsed request to the proxy's service; `key`: its service future.
    Start { key: u64, ktime_ns: u64 },
    /// A runtime RPC is sent on the client at `client`.
    Call {
        call: CallKind,
        client: u64,
        id: CallId,
        ktime_ns: u64,
    },
    /// A runtime's answer is handed to its call's oneshot: the answer's first bytes (decoded
    /// with the layout: `crate::model::requests::decode_answer`), its string (an `Id`'s RuntimeId, a
    /// spawn's handle) and the peer the thread last read from (`crate::model::requests::peer_name`).
    Answer {
        oneshot: u64,
        raw: [u8; MAX_STR],
        string: Bytes,
        peer: (u64, u64, u64),
        ktime_ns: u64,
    },
    /// A call's response future ends, answered (on `oneshot`) or not; `completed`: its
    /// `complete` flag.
    Done {
        oneshot: u64,
        id: CallId,
        completed: bool,
    },
    /// The proxy builds the response of one of its own errors (`SchedError`'s discriminant).
    SchedError { tid: u32, error: u64, ktime_ns: u64 },
    /// A response head is encoded on the connection at `conn`; `key`: the request key the
    /// kernel read there once told where (`CONN_KEY`; 0 before).
    Response {
        conn: u64,
        key: u64,
        tid: u32,
        ktime_ns: u64,
    },
}

/// The request-path event `ev` is, if it is one.
pub fn request_event(ev: &Event) -> Option<RequestEvent> {
    let t = ev.ktime_ns;
    let id = (ev.ptr_b, ev.word_b, ev.word_c);
    let call = |call| RequestEvent::Call {
        call,
        client: ev.ptr_a,
        id,
        ktime_ns: t,
    };
    Some(match ev.kind {
        kind::HTTP_REQUEST => RequestEvent::Start {
            key: ev.ptr_a,
            ktime_ns: t,
        },
        kind::RPC_SPAWN => call(CallKind::Spawn { app: str1(ev) }),
        kind::RPC_TERMINATE => call(CallKind::Terminate),
        kind::RPC_FETCH => call(CallKind::Fetch {
            slot: ev.word_a as u32,
            handle: str1(ev),
        }),
        kind::RPC_FETCH_UNKNOWN => call(CallKind::FetchUnknown { handle: str1(ev) }),
        kind::RPC_OTHER => call(CallKind::Other {
            method: ev.word_a as u32,
        }),
        kind::RPC_RESPONSE => RequestEvent::Answer {
            oneshot: ev.ptr_a,
            raw: ev.str,
            string: str2(ev),
            peer: (ev.ptr_b, ev.word_b, ev.word_c),
            ktime_ns: t,
        },
        kind::RPC_DONE => RequestEvent::Done {
            oneshot: ev.ptr_a,
            id,
            completed: ev.word_a != 0,
        },
        kind::SCHED_ERROR => RequestEvent::SchedError {
            tid: ev.tid,
            error: ev.word_a,
            ktime_ns: t,
        },
        kind::HTTP_RESPONSE => RequestEvent::Response {
            conn: ev.ptr_a,
            key: ev.ptr_b,
            tid: ev.tid,
            ktime_ns: t,
        },
        _ => return None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_record(kind: u32, read_ok: u64, conn: u64, len: usize) -> (Vec<u8>, Event) {
        let mut ev = Event::zeroed();
        ev.kind = kind;
        ev.ptr_a = conn;
        ev.word_a = read_ok;
        let p = &ev as *const Event as *const u8;
        // SAFETY: reading the bytes of a plain old data value.
        let mut rec =
            unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<Event>()) }.to_vec();
        rec.extend((0..len - rec.len()).map(|i| (i / 8) as u8));
        (rec, ev)
    }

    #[test]
    fn snapshots_come_only_with_response_heads_whose_read_succeeded() {
        let full = std::mem::size_of::<ConnSnapshot>();
        let plain = std::mem::size_of::<Event>();
        let cases = [
            (
                "a response head with its snapshot",
                kind::HTTP_RESPONSE,
                1,
                full,
                true,
            ),
            ("the read failed", kind::HTTP_RESPONSE, 0, full, false),
            (
                "a response head the kernel keyed itself",
                kind::HTTP_RESPONSE,
                1,
                plain,
                false,
            ),
            ("a cut record", kind::HTTP_RESPONSE, 1, full - 8, false),
            ("another kind", kind::HTTP_REQUEST, 1, full, false),
        ];
        for (what, k, ok, len, want) in cases {
            let (rec, ev) = snapshot_record(k, ok, 0x10_0000, len);
            assert_eq!(snapshot(&rec, &ev).is_some(), want, "{what}");
        }
    }

    #[test]
    fn a_snapshot_reads_only_what_it_holds() {
        let conn = 0x10_0000u64;
        let (rec, ev) = snapshot_record(
            kind::HTTP_RESPONSE,
            1,
            conn,
            std::mem::size_of::<ConnSnapshot>(),
        );
        let snap = snapshot(&rec, &ev).expect("a snapshot");
        assert_eq!(snap.base, conn - CONN_WINDOW);
        let words = (2 * CONN_WINDOW / 8) as usize;
        let cases = [
            ("the first word", snap.base, true),
            ("the connection's word", conn, true),
            ("the last word", snap.base + 8 * (words as u64 - 1), true),
            ("past the end", snap.base + 8 * words as u64, false),
            (
                "straddling the end",
                snap.base + 8 * words as u64 - 4,
                false,
            ),
            ("before the start", snap.base - 8, false),
            ("an address that wraps", u64::MAX - 3, false),
        ];
        for (what, addr, want) in cases {
            let mut b = [0u8; 8];
            assert_eq!(snap.read(addr, &mut b), want, "{what}");
            if want {
                // The synthetic snapshot numbers its words (mod 256) in their first byte.
                assert_eq!(b[0], ((addr - snap.base) / 8) as u8, "{what}");
            }
        }
    }

    #[test]
    fn request_events_name_what_each_kind_carries() {
        let mut ev = Event::zeroed();
        ev.ktime_ns = 7;
        ev.tid = 9;
        ev.ptr_a = 0xa;
        ev.ptr_b = 0xb;
        ev.word_a = 3;
        ev.word_b = 0xc;
        ev.word_c = 0xd;
        ev.str[..2].copy_from_slice(b"h1");
        ev.str_len = 2;
        ev.str_full_len = 2;
        let with = |k: u32| {
            let mut e = ev;
            e.kind = k;
            request_event(&e)
        };
        let call = |call| {
            Some(RequestEvent::Call {
                call,
                client: 0xa,
                id: (0xb, 0xc, 0xd),
                ktime_ns: 7,
            })
        };
        let h1 = Bytes::new("h1");
        let cases = [
            (
                kind::HTTP_REQUEST,
                Some(RequestEvent::Start {
                    key: 0xa,
                    ktime_ns: 7,
                }),
            ),
            (kind::RPC_SPAWN, call(CallKind::Spawn { app: h1.clone() })),
            (kind::RPC_TERMINATE, call(CallKind::Terminate)),
            (
                kind::RPC_FETCH,
                call(CallKind::Fetch {
                    slot: 3,
                    handle: h1.clone(),
                }),
            ),
            (
                kind::RPC_FETCH_UNKNOWN,
                call(CallKind::FetchUnknown { handle: h1.clone() }),
            ),
            (kind::RPC_OTHER, call(CallKind::Other { method: 3 })),
            (
                kind::RPC_DONE,
                Some(RequestEvent::Done {
                    oneshot: 0xa,
                    id: (0xb, 0xc, 0xd),
                    completed: true,
                }),
            ),
            (
                kind::SCHED_ERROR,
                Some(RequestEvent::SchedError {
                    tid: 9,
                    error: 3,
                    ktime_ns: 7,
                }),
            ),
            (
                kind::HTTP_RESPONSE,
                Some(RequestEvent::Response {
                    conn: 0xa,
                    key: 0xb,
                    tid: 9,
                    ktime_ns: 7,
                }),
            ),
            (kind::CACHE_INSERT, None),
            (kind::SERVER_CALL, None),
        ];
        for (k, want) in cases {
            assert_eq!(with(k), want, "kind {k}");
        }
        let Some(RequestEvent::Answer {
            oneshot,
            raw,
            peer,
            ktime_ns,
            ..
        }) = with(kind::RPC_RESPONSE)
        else {
            panic!("an answer decodes as one");
        };
        assert_eq!((oneshot, peer, ktime_ns), (0xa, (0xb, 0xc, 0xd), 7));
        assert_eq!(&raw[..2], b"h1", "the answer's first bytes");
    }

    fn record(kind: u32, s: &[u8], full: u64, words: [u64; 4]) -> Vec<u8> {
        record2(kind, s, full, words, 0, b"")
    }

    fn record2(kind: u32, s: &[u8], full: u64, words: [u64; 4], evicts: u64, s2: &[u8]) -> Vec<u8> {
        let mut ev = Event::zeroed();
        ev.kind = kind;
        ev.str_len = s.len() as u32;
        ev.str_full_len = full;
        ev.ktime_ns = 42;
        ev.ptr_a = words[0];
        ev.ptr_b = words[1];
        ev.word_a = words[2];
        ev.word_b = words[3];
        ev.str[..s.len()].copy_from_slice(s);
        ev.word_c = evicts;
        ev.str2_len = s2.len() as u32;
        ev.str2_full_len = s2.len() as u64;
        ev.str2[..s2.len()].copy_from_slice(s2);
        let p = &ev as *const Event as *const u8;
        // SAFETY: reading the bytes of a plain old data value.
        unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<Event>()) }.to_vec()
    }

    #[test]
    fn decodes_every_kind() {
        let cases: Vec<(Vec<u8>, Decoded)> = vec![
            (
                record(kind::CACHE_INSERT, b"app", 3, [0x10, 0x20, 1, 1]),
                Decoded::CacheInsert {
                    cache: 0x10,
                    key: Bytes::new("app"),
                    fresh_arc: true,
                    evicts: 0,
                    evicted: None,
                    ktime_ns: 42,
                },
            ),
            (
                record2(kind::CACHE_INSERT, b"app", 3, [0x10, 0x20, 1, 1], 1, b"old"),
                Decoded::CacheInsert {
                    cache: 0x10,
                    key: Bytes::new("app"),
                    fresh_arc: true,
                    evicts: 1,
                    evicted: Some(Bytes::new("old")),
                    ktime_ns: 42,
                },
            ),
            (
                record(
                    kind::CACHE_INSERT,
                    b"example.com",
                    11,
                    [0x10, 0x20, 0x7f00, 0],
                ),
                Decoded::CacheInsert {
                    cache: 0x10,
                    key: Bytes::new("example.com"),
                    fresh_arc: false,
                    evicts: 0,
                    evicted: None,
                    ktime_ns: 42,
                },
            ),
            (
                record(kind::CACHE_REMOVE, b"app", 3, [0x10, 0, 0, 0]),
                Decoded::CacheRemove {
                    cache: 0x10,
                    key: Bytes::new("app"),
                    ktime_ns: 42,
                },
            ),
            (
                record(kind::RPC_SPAWN, b"app", 3, [0x30, 0, 0, 0]),
                Decoded::Spawn {
                    client: 0x30,
                    app: Bytes::new("app"),
                    ktime_ns: 42,
                },
            ),
            (
                record(kind::RPC_TERMINATE, b"h1", 2, [0, 0, 0, 0]),
                Decoded::Terminate {
                    handle: Bytes::new("h1"),
                    ktime_ns: 42,
                },
            ),
            (
                record(kind::RPC_FETCH_UNKNOWN, b"h1", 2, [0x40, 0, 0, 0]),
                Decoded::FetchUnknown {
                    client: 0x40,
                    handle: Bytes::new("h1"),
                    ktime_ns: 42,
                },
            ),
            (
                record2(kind::SERVER_CALL, b"", 0, [1234, 0, 4, 3_000_000], 2, b""),
                Decoded::ServerCall {
                    tgid: 1234,
                    method: method::FETCH,
                    duration_ns: 3_000_000,
                    polls: 2,
                },
            ),
            (
                record(kind::SERVER_CALL, b"", 0, [1234, 0, 77, 1]),
                Decoded::ServerCall {
                    tgid: 1234,
                    method: method::UNKNOWN,
                    duration_ns: 1,
                    polls: 0,
                },
            ),
        ];
        for (rec, want) in cases {
            assert_eq!(decode(&rec), Ok(want));
        }
    }

    #[test]
    fn refuses_malformed_records() {
        assert_eq!(
            decode(&[0u8; 8]),
            Err(DecodeError::Size(8, std::mem::size_of::<Event>()))
        );
        assert_eq!(
            decode(&record(99, b"", 0, [0; 4])),
            Err(DecodeError::Kind(99))
        );
        let mut r = record(kind::RPC_SPAWN, b"", 0, [0; 4]);
        r[4..8].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(decode(&r), Err(DecodeError::StrLen(1000)));
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
