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

/// Two adjacent words in one read: each helper call checks its destination (hardened
/// usercopy's `__check_object_size`: 1.4% of a saturated test target's CPU for all the probes'
/// reads, `perf record -a`), so one read of 16 bytes costs less than two of 8.
#[inline(always)]
pub fn words2(addr: u64) -> Result<[u64; 2], i64> {
    // SAFETY: as `word`.
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.map_err(|e| {
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
        i64::from(e)
    })
}

/// Four adjacent words in one read (see `words2`).
#[inline(always)]
pub fn words4(addr: u64) -> Result<[u64; 4], i64> {
    // SAFETY: as `word`.
    unsafe { bpf_probe_read_user(addr as *const [u64; 4]) }.map_err(|e| {
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
        i64::from(e)
    })
}

/// The word at byte offset `off` of `words`, if it is one of them (a constant index for the
/// verifier).
#[inline(always)]
pub fn word_in(words: &[u64; 4], off: u64) -> Option<u64> {
    match off {
        0 => Some(words[0]),
        8 => Some(words[1]),
        16 => Some(words[2]),
        24 => Some(words[3]),
        _ => None,
    }
}

/// The pointer and length of the Rust `String` at `addr`: one read of its three words where
/// the layout puts both in them (every build seen: capacity, pointer, length), else two.
#[inline(always)]
pub fn string_parts(addr: u64, lay: &Layout) -> Result<(u64, u64), i64> {
    let at = |off: u64| match off {
        0 => Some(0),
        8 => Some(1),
        16 => Some(2),
        _ => None,
    };
    if let (Some(p), Some(l)) = (at(lay.string_ptr), at(lay.string_len)) {
        // SAFETY: as `word`.
        let w: [u64; 3] = unsafe { bpf_probe_read_user(addr as *const [u64; 3]) }.map_err(|e| {
            bump(&OBSERVER_STATS, stat::READ_ERRORS);
            i64::from(e)
        })?;
        return Ok((w[p], w[l]));
    }
    Ok((word(addr + lay.string_ptr)?, word(addr + lay.string_len)?))
}

/// Reads the Rust `String` at `addr` into `dst` (cut at `MAX_STR`), with its full length.
#[inline(always)]
pub fn string(addr: u64, lay: &Layout, dst: &mut Str) -> Result<(), i64> {
    let (ptr, len) = string_parts(addr, lay)?;
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
