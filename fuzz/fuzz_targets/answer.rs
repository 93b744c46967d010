//! The first bytes of a runtime's in-memory `tarpc::Response`, as the `rpc_response` probe
//! copies them, and the peer beside them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::model::requests;
use observer_common::{Layout, Peer, MAX_STR};

fuzz_target!(|data: &[u8]| {
    let mut raw = [0u8; MAX_STR];
    let n = data.len().min(MAX_STR);
    raw[..n].copy_from_slice(&data[..n]);
    let _ = requests::decode_answer(&raw, &Layout::DEFAULT);
    let mut peer = [0u8; 24];
    if let Some(s) = data.get(MAX_STR..MAX_STR + 24) {
        peer.copy_from_slice(s);
    }
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&peer[..16]);
    let _ = requests::peer_name(&Peer {
        addr,
        port: u16::from_ne_bytes([peer[16], peer[17]]),
        family: u16::from_ne_bytes([peer[18], peer[19]]),
        _pad: 0,
    });
});
