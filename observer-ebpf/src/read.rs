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
    let (len, n) = string_into(addr, lay, &mut ev.str)?;
    ev.str_full_len = len;
    ev.str_len = n;
    Ok(())
}

/// Same into `ev.str2`.
#[inline(always)]
pub fn string2(addr: u64, lay: &Layout, ev: &mut Event) -> Result<(), i64> {
    let (len, n) = string_into(addr, lay, &mut ev.str2)?;
    ev.str2_full_len = len;
    ev.str2_len = n;
    Ok(())
}

/// Returns (full length, bytes copied).
#[inline(always)]
fn string_into(addr: u64, lay: &Layout, dst: &mut [u8; MAX_STR]) -> Result<(u64, u32), i64> {
    let ptr = word(addr + lay.string_ptr)?;
    let len = word(addr + lay.string_len)?;
    let mut n = len as usize;
    if n > MAX_STR {
        n = MAX_STR;
    }
    if n == 0 {
        return Ok((len, 0));
    }
    bytes(ptr, &mut dst[..n])?;
    Ok((len, n as u32))
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
