//! Bounded reads of target memory.

use aya_ebpf::helpers::{bpf_probe_read_user, bpf_probe_read_user_buf};
use observer_common::{stat, Layout, Str, MAX_STR};

use crate::{bump, OBSERVER_STATS};

#[inline(always)]
pub fn word(addr: u64) -> Result<u64, i64> {
    // SAFETY: bpf_probe_read_user checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|e| {
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
        i64::from(e)
    })
}

/// Reads the Rust `String` at `addr` into `dst` (cut at `MAX_STR`), with its full length.
#[inline(always)]
pub fn string(addr: u64, lay: &Layout, dst: &mut Str) -> Result<(), i64> {
    let ptr = word(addr + lay.string_ptr)?;
    let len = word(addr + lay.string_len)?;
    let mut n = len as usize;
    if n > MAX_STR {
        n = MAX_STR;
    }
    if n > 0 {
        bytes(ptr, &mut dst.bytes[..n])?;
    }
    // Set once the bytes are in: a failed read leaves the string empty.
    dst.full_len = len;
    dst.len = n as u32;
    Ok(())
}

/// Reads `dst.len()` bytes at `ptr` (callers bound the length for the verifier).
#[inline(always)]
pub fn bytes(ptr: u64, dst: &mut [u8]) -> Result<(), i64> {
    // SAFETY: bpf_probe_read_user checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_user_buf(ptr as *const u8, dst) }.map_err(|e| {
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
        i64::from(e)
    })
}
