//! Bounded reads of target memory.

use aya_ebpf::helpers::{bpf_probe_read_user, bpf_probe_read_user_buf};
use observer_common::{stat, Event, Layout, MAX_STR};

use crate::{bump, OBSERVER_STATS};

#[inline(always)]
pub fn word(addr: u64) -> Result<u64, i64> {
    // SAFETY: bpf_probe_read_user checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|e| {
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
        i64::from(e)
    })
}

/// Reads the Rust `String` at `addr` into `ev.str` (cut at `MAX_STR`) and its full length.
#[inline(always)]
pub fn string(addr: u64, lay: &Layout, ev: &mut Event) -> Result<(), i64> {
    let ptr = word(addr + lay.string_ptr)?;
    let len = word(addr + lay.string_len)?;
    ev.str_full_len = len;
    let mut n = len as usize;
    if n > MAX_STR {
        n = MAX_STR;
    }
    ev.str_len = n as u32;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: n is bounded by MAX_STR, the destination's size.
    unsafe { bpf_probe_read_user_buf(ptr as *const u8, &mut ev.str[..n]) }.map_err(|e| {
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
        i64::from(e)
    })
}
