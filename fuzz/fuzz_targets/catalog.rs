//! Catalog files (`--catalog`, `--runtime-catalog`): errors name a line and field, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::catalog::Catalog;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Catalog::parse(text, "fuzz.toml");
    }
});
