//! The heads of tarpc frames between the proxy and a runtime, as the kernel copies them
//! (`observer-ebpf/src/wire.rs`): what the proxy sent (a call's request, or its cancel) and
//! what it received (an answer), and the runtime's address from the connection's peer.
//!
//! tarpc 0.24 encodes with bincode 1.3 through tokio-serde 0.8 (`Bincode`, whose default
//! options are `bincode::DefaultOptions`: little-endian, varint integers). A varint is one
//! byte below 251, else a marker (251: `u16`, 252: `u32`, 253: `u64`, 254: `u128`) and the
//! value's little-endian bytes; enum variants are `u32` varints, in declaration order; an
//! `Option` is a tag byte; a `String` is a varint length and its bytes. The types
//! (tarpc 0.24.1 `rpc.rs`, `context.rs`, `trace.rs`; rusty-workers' `rpc.rs` and `types.rs`):
//!
//! - `ClientMessage::Request(Request { context: Context { deadline (epoch seconds, u64),
//!   trace_context: { trace_id: u128, span_id: u64, parent_id: Option<u64> } }, id: u64,
//!   message: RuntimeServiceRequest })` (variant 0), or `ClientMessage::Cancel {
//!   trace_context, request_id }` (variant 1);
//! - `Response { request_id: u64, message: Result<RuntimeServiceResponse, ServerError> }`,
//!   whose `Ok` holds the method's variant and its return value.

use observer_common::{family, method, Peer};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `ExecutionError`'s fieldless variants in declaration order; variant 5 is
/// `ScriptThrowsException(String)`.
pub const EXECUTION_ERRORS: &[&str] = &[
    "no_such_worker",
    "runtime_throws",
    "time_limit",
    "memory_limit",
    "io_timeout",
];

/// What the proxy sent on a runtime connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// A call: its context's trace id, its request id on this connection and its method.
    Request {
        trace_id: u128,
        request_id: u64,
        method: u32,
    },
    /// A call given up before its answer (its deadline passed, or its caller dropped it).
    Cancel { trace_id: u128, request_id: u64 },
}

/// A runtime's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub request_id: u64,
    /// The method it answers (`observer_common::method`); `UNKNOWN` for a `ServerError`.
    pub method: u32,
    pub result: AnswerResult,
    /// The string of an `Ok` answer to `id` (the RuntimeId) or `spawn_worker` (the worker's
    /// handle); empty otherwise, or if the head cut it.
    pub string: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerResult {
    Ok,
    /// The method's own error; for a fetch, which `ExecutionError`.
    Error(&'static str),
    /// tarpc's `ServerError`: the server could not run the method.
    ServerError,
}

/// Reads bincode's varint encoding from a frame's head.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(b)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn varint(&mut self) -> Option<u128> {
        let le = |b: &[u8]| {
            let mut w = [0u8; 16];
            w[..b.len()].copy_from_slice(b);
            u128::from_le_bytes(w)
        };
        Some(match self.byte()? {
            b @ 0..=250 => u128::from(b),
            251 => le(self.take(2)?),
            252 => le(self.take(4)?),
            253 => le(self.take(8)?),
            254 => le(self.take(16)?),
            _ => return None,
        })
    }

    fn u64(&mut self) -> Option<u64> {
        u64::try_from(self.varint()?).ok()
    }

    fn variant(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }

    /// `trace::Context`: its trace id (the span and parent are skipped).
    fn trace_context(&mut self) -> Option<u128> {
        let trace_id = self.varint()?;
        self.u64()?;
        match self.byte()? {
            0 => {}
            1 => {
                self.u64()?;
            }
            _ => return None,
        }
        Some(trace_id)
    }

    /// A `String`'s bytes; empty if the head cut it (a part is not the string).
    fn string(&mut self) -> Option<Vec<u8>> {
        let len = usize::try_from(self.u64()?).ok()?;
        Some(self.take(len).map(<[u8]>::to_vec).unwrap_or_default())
    }
}

/// Decodes the head of a frame the proxy sent; `None` if it is not a `ClientMessage`.
pub fn decode_sent(head: &[u8]) -> Option<Sent> {
    let mut r = Reader::new(head);
    match r.variant()? {
        0 => {
            r.u64()?; // deadline
            let trace_id = r.trace_context()?;
            let request_id = r.u64()?;
            let method = method::known(r.variant()?);
            Some(Sent::Request {
                trace_id,
                request_id,
                method,
            })
        }
        1 => {
            let trace_id = r.trace_context()?;
            let request_id = r.u64()?;
            Some(Sent::Cancel {
                trace_id,
                request_id,
            })
        }
        _ => None,
    }
}

/// Decodes the head of a frame the proxy received; `None` if it is not a `Response`.
pub fn decode_answer(head: &[u8]) -> Option<Answer> {
    let mut r = Reader::new(head);
    let request_id = r.u64()?;
    let answer = |method, result, string| Answer {
        request_id,
        method,
        result,
        string,
    };
    match r.variant()? {
        0 => {}
        1 => return Some(answer(method::UNKNOWN, AnswerResult::ServerError, vec![])),
        _ => return None,
    }
    // `GenericResult<T>`: `Ok(T)` (0) or `Err(GenericError)` (1).
    let generic = |r: &mut Reader| match r.variant()? {
        0 => Some(AnswerResult::Ok),
        1 => Some(AnswerResult::Error("generic_error")),
        _ => None,
    };
    let m = r.variant()?;
    Some(match m {
        method::ID => answer(m, AnswerResult::Ok, r.string()?),
        method::SPAWN_WORKER => {
            let result = generic(&mut r)?;
            let handle = match result {
                AnswerResult::Ok => r.string()?,
                _ => vec![],
            };
            answer(m, result, handle)
        }
        method::TERMINATE_WORKER => answer(m, AnswerResult::Ok, vec![]),
        method::LIST_WORKERS | method::LOAD => answer(m, generic(&mut r)?, vec![]),
        method::FETCH => {
            let result = match r.variant()? {
                0 => AnswerResult::Ok,
                1 => {
                    let e = r.variant()? as usize;
                    match EXECUTION_ERRORS.get(e) {
                        Some(kind) => AnswerResult::Error(kind),
                        None if e == EXECUTION_ERRORS.len() => AnswerResult::Error("script_throws"),
                        None => return None,
                    }
                }
                _ => return None,
            };
            answer(m, result, vec![])
        }
        _ => return None,
    })
}

/// A runtime's address from a connection's peer (`family` 0: none).
pub fn peer_name(p: &Peer) -> Option<String> {
    let b = p.addr;
    let ip = match p.family {
        family::INET => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
        family::INET6 => {
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    let port = p.port;
    Some(SocketAddr::new(ip, port).to_string())
}

/// bincode's encoding of the frames, for tests (the encoder the decoder is checked against).
#[cfg(test)]
pub(crate) mod encode {
    pub fn varint(v: u128) -> Vec<u8> {
        match v {
            0..=250 => vec![v as u8],
            251..=0xffff => [&[251u8][..], &(v as u16).to_le_bytes()].concat(),
            0x1_0000..=0xffff_ffff => [&[252u8][..], &(v as u32).to_le_bytes()].concat(),
            0x1_0000_0000..=0xffff_ffff_ffff_ffff => {
                [&[253u8][..], &(v as u64).to_le_bytes()].concat()
            }
            _ => [&[254u8][..], &v.to_le_bytes()].concat(),
        }
    }

    pub fn string(s: &[u8]) -> Vec<u8> {
        [varint(s.len() as u128), s.to_vec()].concat()
    }

    /// A `trace::Context` with a span and an optional parent.
    pub fn context(trace_id: u128, parent: Option<u64>) -> Vec<u8> {
        let mut b = varint(trace_id);
        b.extend(varint(0x1122_3344_5566_7788));
        match parent {
            None => b.push(0),
            Some(p) => {
                b.push(1);
                b.extend(varint(p.into()));
            }
        }
        b
    }

    /// `ClientMessage::Request` of `method`, its arguments after.
    pub fn request(trace_id: u128, request_id: u64, method: u32, parent: Option<u64>) -> Vec<u8> {
        let mut b = varint(0);
        b.extend(varint(1_800_000_000)); // deadline, epoch seconds
        b.extend(context(trace_id, parent));
        b.extend(varint(request_id.into()));
        b.extend(varint(method.into()));
        b.extend(string(b"a worker handle follows"));
        b
    }

    pub fn cancel(trace_id: u128, request_id: u64) -> Vec<u8> {
        [
            varint(1),
            context(trace_id, None),
            varint(request_id.into()),
        ]
        .concat()
    }

    /// `Response { request_id, Ok(<method>(rest)) }`.
    pub fn answer(request_id: u64, method: u32, rest: &[u8]) -> Vec<u8> {
        [
            varint(request_id.into()),
            varint(0),
            varint(method.into()),
            rest.to_vec(),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;

    const TRACE: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;

    #[test]
    fn sent_frames_decode() {
        let cancel = cancel(TRACE, 70_000);
        let cases: Vec<(&str, Vec<u8>, Option<Sent>)> = vec![
            (
                "a fetch, request id in one byte",
                request(TRACE, 7, method::FETCH, None),
                Some(Sent::Request {
                    trace_id: TRACE,
                    request_id: 7,
                    method: method::FETCH,
                }),
            ),
            (
                "a spawn with a parent span and a 2-byte request id",
                request(TRACE, 300, method::SPAWN_WORKER, Some(9)),
                Some(Sent::Request {
                    trace_id: TRACE,
                    request_id: 300,
                    method: method::SPAWN_WORKER,
                }),
            ),
            (
                "a method past the service's",
                request(TRACE, 1, 9, None),
                Some(Sent::Request {
                    trace_id: TRACE,
                    request_id: 1,
                    method: method::UNKNOWN,
                }),
            ),
            (
                "a cancel",
                cancel.clone(),
                Some(Sent::Cancel {
                    trace_id: TRACE,
                    request_id: 70_000,
                }),
            ),
            (
                "a cancel cut short",
                cancel[..cancel.len() - 2].to_vec(),
                None,
            ),
            ("an HTTP head", b"HTTP/1.1 200 OK\r\n".to_vec(), None),
            ("a third variant", varint(2), None),
            (
                "a bad option tag",
                [varint(1), varint(TRACE), varint(1), vec![2]].concat(),
                None,
            ),
            ("an invalid varint marker", vec![255], None),
            ("nothing", vec![], None),
        ];
        for (what, head, want) in cases {
            assert_eq!(decode_sent(&head), want, "{what}");
        }
    }

    #[test]
    fn answers_decode() {
        let ok = |m: u32, rest: &[u8]| answer(5, m, rest);
        let handle = b"0123456789abcdef0123456789abcdef";
        let a = |method, result, string: &[u8]| {
            Some(Answer {
                request_id: 5,
                method,
                result,
                string: string.to_vec(),
            })
        };
        let cases: Vec<(&str, Vec<u8>, Option<Answer>)> = vec![
            (
                "a fetch's response",
                ok(method::FETCH, &[0, 1, 2]),
                a(method::FETCH, AnswerResult::Ok, b""),
            ),
            (
                "a fetch's time limit",
                ok(method::FETCH, &[1, 2]),
                a(method::FETCH, AnswerResult::Error("time_limit"), b""),
            ),
            (
                "a lost worker",
                ok(method::FETCH, &[1, 0]),
                a(method::FETCH, AnswerResult::Error("no_such_worker"), b""),
            ),
            (
                "a script exception",
                ok(
                    method::FETCH,
                    &[[1, 5].as_slice(), &string(b"boom")].concat(),
                ),
                a(method::FETCH, AnswerResult::Error("script_throws"), b""),
            ),
            (
                "an execution error past the enum",
                ok(method::FETCH, &[1, 6]),
                None,
            ),
            (
                "a spawned worker",
                ok(
                    method::SPAWN_WORKER,
                    &[[0u8].as_slice(), &string(handle)].concat(),
                ),
                a(method::SPAWN_WORKER, AnswerResult::Ok, handle),
            ),
            (
                "a failed spawn",
                ok(method::SPAWN_WORKER, &[1, 3]),
                a(
                    method::SPAWN_WORKER,
                    AnswerResult::Error("generic_error"),
                    b"",
                ),
            ),
            (
                "a runtime id",
                ok(method::ID, &string(b"rt-1")),
                a(method::ID, AnswerResult::Ok, b"rt-1"),
            ),
            (
                "a runtime id the head cuts",
                [varint(5), varint(0), varint(0), varint(100), b"rt".to_vec()].concat(),
                a(method::ID, AnswerResult::Ok, b""),
            ),
            (
                "a termination",
                ok(method::TERMINATE_WORKER, &[1]),
                a(method::TERMINATE_WORKER, AnswerResult::Ok, b""),
            ),
            (
                "a load",
                ok(method::LOAD, &[0, 7]),
                a(method::LOAD, AnswerResult::Ok, b""),
            ),
            (
                "a failed worker list",
                ok(method::LIST_WORKERS, &[1, 0]),
                a(
                    method::LIST_WORKERS,
                    AnswerResult::Error("generic_error"),
                    b"",
                ),
            ),
            (
                "a server error",
                [varint(5), varint(1), varint(22)].concat(),
                a(method::UNKNOWN, AnswerResult::ServerError, b""),
            ),
            ("a method past the service's", ok(6, &[0]), None),
            (
                "a bad result variant",
                [varint(5), varint(2)].concat(),
                None,
            ),
            (
                "cut before the method",
                [varint(5), varint(0)].concat(),
                None,
            ),
        ];
        for (what, head, want) in cases {
            assert_eq!(decode_answer(&head), want, "{what}");
        }
    }

    #[test]
    fn peers_name_runtimes() {
        let mut p = Peer {
            addr: [0; 16],
            port: 9000,
            family: family::INET,
            _pad: 0,
        };
        p.addr[..4].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(peer_name(&p).as_deref(), Some("10.0.0.7:9000"));
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
        p.addr = mapped;
        p.family = family::INET6;
        assert_eq!(peer_name(&p).as_deref(), Some("127.0.0.1:9000"));
        p.addr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(peer_name(&p).as_deref(), Some("[::1]:9000"));
        p.family = 0;
        assert_eq!(peer_name(&p), None);
    }
}
