//! The proxy's LRU caches: `lru_time_cache::LruCache<Key, Value>::{insert, remove}`.
//!
//! Legacy mangling erases the generic arguments, so the app cache
//! (`LruCache<AppId, Arc<AppState>>`) and the route cache (`LruCache<String, BTreeMap<..>>`)
//! share a name; both are probed and userspace tells them apart by their arguments.
//! Both run only on app/route loads and evictions, never per request.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use observer_common::{event::CacheOp, program, Kind, Layout};

use crate::{check, layout, read, send};

/// `fn insert(&mut self, key: Key, value: Value) -> Option<Value>`: the key (24 bytes) is
/// passed by reference, an `Arc` value in a register, a `BTreeMap` value by reference.
#[uprobe]
pub fn lru_insert(ctx: ProbeContext) -> u32 {
    let r = try_cache_event(&ctx, Kind::CacheInsert);
    check(&ctx, program::LRU_INSERT, r);
    0
}

/// `fn remove<Q>(&mut self, key: &Q) -> Option<Value>`.
#[uprobe]
pub fn lru_remove(ctx: ProbeContext) -> u32 {
    let r = try_cache_event(&ctx, Kind::CacheRemove);
    check(&ctx, program::LRU_REMOVE, r);
    0
}

/// `insert` of a new key into a full cache first drops the least recently used entries
/// (`remove_lru`: `list.drain(..=len - capacity)`), inside itself: no `remove` call shows it.
/// Reads how many, and the first of them, the front of the LRU order list.
fn capacity_eviction(cache: u64, lay: &Layout, rec: &mut CacheOp) -> Result<(), i64> {
    let capacity = read::word(cache + lay.lru_capacity)?;
    let len = read::word(cache + lay.lru_list_len)?;
    if capacity == 0 || len < capacity {
        return Ok(());
    }
    rec.evicts = len - capacity + 1;
    let buf = read::word(cache + lay.lru_list_ptr)?;
    let cap = read::word(cache + lay.lru_list_cap)?;
    let mut head = read::word(cache + lay.lru_list_head)?;
    if cap != 0 && head >= cap {
        head -= cap;
    }
    read::string(buf + head * lay.lru_key_size, lay, &mut rec.evicted)
}

fn try_cache_event(ctx: &ProbeContext, k: Kind) -> Result<(), i64> {
    let cache: u64 = ctx.arg(0).ok_or(1i64)?;
    let key: u64 = ctx.arg(1).ok_or(1i64)?;
    let lay = layout();
    send(k, |rec: &mut CacheOp| {
        rec.cache = cache;
        if k == Kind::CacheInsert {
            let value: u64 = ctx.arg(2).unwrap_or(0);
            rec.value = value;
            rec.value_words[0] = read::word(value).unwrap_or(0);
            rec.value_words[1] = read::word(value + 8).unwrap_or(0);
            let _ = capacity_eviction(cache, &lay, rec);
        }
        read::string(key, &lay, &mut rec.key)
    })
}
