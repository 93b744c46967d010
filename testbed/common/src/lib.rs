//! Shared types and the runtime RPC service of the test target.
//!
//! The wire types have the shapes rusty-workers gives them (same fields, same variants, same
//! order), because the observer decodes their in-memory layout and their bincode encoding.

pub mod rpc;
pub mod types;

pub use futures;
pub use tarpc;
pub use tokio;
pub use tokio_serde;

/// The transport format rusty-workers uses: bincode with its default options (varint integers).
pub use tokio_serde::formats::Bincode as SerdeFormat;

/// A random lowercase hex string of `bytes` random bytes.
pub fn rand_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}
