//! A runtime's answer, decoded from the bytes `rpc_response` copies, and the runtime's
//! address from the peer the answering thread last read from.

use observer_common::{family, method, Layout, Peer, MAX_STR};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How `tarpc::Response<RuntimeServiceResponse>` reads in memory beyond what the kernel needs
/// (`Layout`): where the request id is, the tags of the other answers, the `Ok` of a
/// `GenericResult`, the execution errors. rustc 1.95's layout, checked by tests/layout.rs.
pub mod answer_layout {
    pub const REQUEST_ID: usize = 56;
    /// Tag (first word, minus the niche base) of `Fetch(Err(_))`; any word below the niche base
    /// is `Fetch(Ok(_))`, the dataful variant.
    pub const TAG_FETCH_ERR: u64 = 0;
    pub const TAG_TERMINATE: u64 = 3;
    pub const TAG_LIST: u64 = 4;
    pub const TAG_LOAD: u64 = 6;
    pub const TAG_SERVER_ERROR: u64 = 7;
    /// Second word of an `Ok` `GenericResult` (`SpawnWorker`, `Load`, `ListWorkers`): the
    /// niche past `GenericError`'s variants.
    pub const GENERIC_OK: u64 = 11;
    /// `Fetch(Err(e))`: the second word is the niche base + the variant for the fieldless
    /// `ExecutionError`s, in declaration order; anything else is `ScriptThrowsException`.
    pub const EXECUTION_ERRORS: &[&str] = &[
        "no_such_worker",
        "runtime_throws",
        "time_limit",
        "memory_limit",
        "io_timeout",
    ];
}

/// A runtime's answer, decoded from the bytes `rpc_response` copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub request_id: u64,
    /// The method it answers (`observer_common::method`), `UNKNOWN` if the tag did not decode.
    pub method: u32,
    pub result: AnswerResult,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerResult {
    Ok,
    /// The method's own error; for a fetch, which `ExecutionError`.
    Error(&'static str),
    /// tarpc's `ServerError`: the server could not run the method.
    ServerError,
}

fn word(raw: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(raw[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the first `MAX_STR` bytes of an in-memory `tarpc::Response<RuntimeServiceResponse>`.
pub fn decode_answer(raw: &[u8; MAX_STR], lay: &Layout) -> Answer {
    use answer_layout as A;
    let request_id = word(raw, A::REQUEST_ID);
    let w0 = word(raw, 0);
    let w1 = word(raw, 8);
    let generic = |w: u64| {
        if w == A::GENERIC_OK {
            AnswerResult::Ok
        } else {
            AnswerResult::Error("generic_error")
        }
    };
    let (method, result) = if w0 < lay.resp_niche_base {
        (method::FETCH, AnswerResult::Ok)
    } else {
        match w0 - lay.resp_niche_base {
            A::TAG_FETCH_ERR => {
                let kind = w1
                    .checked_sub(lay.resp_niche_base)
                    .and_then(|k| A::EXECUTION_ERRORS.get(k as usize))
                    .copied()
                    .unwrap_or("script_throws");
                (method::FETCH, AnswerResult::Error(kind))
            }
            t if t == lay.resp_tag_id => (method::ID, AnswerResult::Ok),
            t if t == lay.resp_tag_spawn => (method::SPAWN_WORKER, generic(w1)),
            A::TAG_TERMINATE => (method::TERMINATE_WORKER, AnswerResult::Ok),
            A::TAG_LIST => (method::LIST_WORKERS, generic(w1)),
            A::TAG_LOAD => (method::LOAD, generic(w1)),
            A::TAG_SERVER_ERROR => (method::UNKNOWN, AnswerResult::ServerError),
            _ => (method::UNKNOWN, AnswerResult::Error("undecoded")),
        }
    };
    Answer {
        request_id,
        method,
        result,
    }
}

/// A runtime's address from the peer an answer's record carries (`family` 0: none).
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
