//! Bounded reads of target memory.

use aya_ebpf::helpers::{bpf_probe_read_user, bpf_probe_read_user_buf};
use observer_common::{stat, Layout, Str, MAX_STR};

use crate::{bump, OBSERVER_STATS};

/// `N` adjacent words in one read, an error counted (`stat::READ_ERRORS`). One read of several
/// words costs less than a read of each: each helper call checks its destination (hardened
/// usercopy's `__check_object_size`: 1.4% of a saturated test target's CPU for all the probes'
/// reads, `perf record -a`).
#[inline(always)]
pub fn words<const N: usize>(addr: u64) -> Result<[u64; N], i64> {
    // SAFETY: bpf_probe_read_user checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_user(addr as *const [u64; N]) }.map_err(|e| {
        bump(&OBSERVER_STATS, stat::READ_ERRORS);
        i64::from(e)
    })
}

#[inline(always)]
pub fn word(addr: u64) -> Result<u64, i64> {
    words::<1>(addr).map(|[w]| w)
}

/// The word at byte offset `off` of `words`, if it is one of them (word-aligned and inside).
#[inline(always)]
pub fn word_in<const N: usize>(words: &[u64; N], off: u64) -> Option<u64> {
    const { assert!(N <= 4, "offsets up to 24 only") };
    let i = match off {
        0 => 0,
        8 => 1,
        16 => 2,
        24 => 3,
        _ => return None,
    };
    words.get(i).copied()
}

/// The pointer and length of a Rust `String` at byte offset `at` of `words`, if both are in
/// them.
#[inline(always)]
pub fn string_parts_in<const N: usize>(
    words: &[u64; N],
    at: u64,
    lay: &Layout,
) -> Option<(u64, u64)> {
    Some((
        word_in(words, at + lay.string_ptr)?,
        word_in(words, at + lay.string_len)?,
    ))
}

/// The pointer and length of the Rust `String` at `addr`: one read of its three words where
/// the layout puts both in them (every build seen: capacity, pointer, length), else two.
#[inline(always)]
pub fn string_parts(addr: u64, lay: &Layout) -> Result<(u64, u64), i64> {
    if let Some(parts) = string_parts_in(&words::<3>(addr)?, 0, lay) {
        return Ok(parts);
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
