//! The head of a tarpc frame, as the socket tracepoints copy it from a connection between the
//! proxy and a runtime (any bytes: a misread stream, another protocol), through both of its
//! decoders, and the peer beside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::model::requests;
use observer_common::{Peer, WIRE_HEAD};

fuzz_target!(|data: &[u8]| {
    let head = &data[..data.len().min(WIRE_HEAD)];
    let _ = requests::decode_sent(head);
    let _ = requests::decode_answer(head);
    let mut peer = [0u8; 24];
    if let Some(s) = data.get(WIRE_HEAD..WIRE_HEAD + 24) {
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
