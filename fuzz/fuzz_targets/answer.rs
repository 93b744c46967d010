//! The first bytes of a runtime's in-memory `tarpc::Response`, as the `rpc_response` probe
//! copies them, and the peer address words beside them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::model::requests;
use observer_common::{Layout, MAX_STR};

fuzz_target!(|data: &[u8]| {
    let mut raw = [0u8; MAX_STR];
    let n = data.len().min(MAX_STR);
    raw[..n].copy_from_slice(&data[..n]);
    let _ = requests::decode_answer(&raw, &Layout::DEFAULT);
    let word = |i: usize| {
        let mut b = [0u8; 8];
        if let Some(s) = data.get(MAX_STR + 8 * i..MAX_STR + 8 * i + 8) {
            b.copy_from_slice(s);
        }
        u64::from_ne_bytes(b)
    };
    let _ = requests::peer_name(word(0), word(1), word(2));
});
