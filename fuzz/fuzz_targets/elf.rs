//! The target's executable (`/proc/<pid>/exe`) and symbol dumps (`--symbols`): a damaged or
//! hostile file is refused with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::symbols::SymbolTable;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SymbolTable::from_elf_bytes(data, "fuzz") {
        let _ = s
            .by_path("rusty_workers_proxy::sched::Scheduler::handle_request")
            .count();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SymbolTable::from_tsv(text, 0);
    }
});
