//! The memory layout the probes assume (`observer_common::Layout::DEFAULT`) checked against
//! real values of the RPC types, compiled by this compiler: the request enum rusty-workers'
//! proxy hands to tarpc's `Channel::call`, and `String`.

use observer_common::{method, Layout};
use rusty_workers::rpc::RuntimeServiceRequest as Req;
use rusty_workers::types::*;

/// Reads target memory the way the eBPF program does, but from our own address space.
fn word(addr: usize) -> u64 {
    // SAFETY: addresses inside live values of this test.
    unsafe { std::ptr::read_unaligned(addr as *const u64) }
}

fn string_at(addr: usize, lay: &Layout) -> String {
    let ptr = word(addr + lay.string_ptr as usize) as *const u8;
    let len = word(addr + lay.string_len as usize) as usize;
    // SAFETY: ptr/len of a live String, if the layout is right (else this test fails or faults,
    // which is the point).
    String::from_utf8(unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()).expect("utf8")
}

fn cfg() -> WorkerConfiguration {
    WorkerConfiguration::for_tests()
}

#[test]
fn request_enum_decodes_as_the_probe_reads_it() {
    let lay = Layout::DEFAULT;
    // Capacities past the length, so that cap and len cannot be mistaken for each other.
    let s = |x: &str| {
        let mut v = String::with_capacity(x.len() + 9);
        v.push_str(x);
        v
    };
    let appid = "afb38b70-d0bb-4102-8248-765e6c1d7dde";
    let handle = "0123456789abcdef0123456789abcdef";
    let cases: Vec<(Req, u32, Option<&str>)> = vec![
        (Req::Id {}, method::ID, None),
        (
            Req::SpawnWorker {
                appid: s(appid),
                configuration: cfg(),
                bundle: vec![1, 2, 3],
            },
            method::SPAWN_WORKER,
            Some(appid),
        ),
        (
            Req::TerminateWorker {
                handle: WorkerHandle { id: s(handle) },
            },
            method::TERMINATE_WORKER,
            Some(handle),
        ),
        (Req::ListWorkers {}, method::LIST_WORKERS, None),
        (
            Req::Fetch {
                handle: WorkerHandle { id: s(handle) },
                req: RequestObject {
                    url: s("https://localhost/x"),
                    method: s("GET"),
                    ..Default::default()
                },
            },
            method::FETCH,
            Some(handle),
        ),
        (Req::Load {}, method::LOAD, None),
    ];
    for (req, want, text) in &cases {
        let base = req as *const Req as usize;
        let m = lay.method_of(word(base + lay.req_tag_offset as usize));
        assert_eq!(m, *want, "method of {req:?}");
        if let Some(text) = text {
            let off = if m == method::SPAWN_WORKER {
                lay.req_spawn_appid
            } else {
                lay.req_handle
            };
            assert_eq!(
                &string_at(base + off as usize, &lay),
                text,
                "string in {req:?}"
            );
        }
    }
}

#[test]
fn arc_inner_starts_with_strong_and_weak_counts() {
    // The app cache is told from the route cache by its value: a fresh Arc (strong = weak = 1).
    let a = std::sync::Arc::new([7u64; 4]);
    let inner = std::sync::Arc::as_ptr(&a) as usize - 16;
    assert_eq!((word(inner), word(inner + 8)), (1, 1));
}

#[test]
fn lru_cache_capacity_and_lru_order_read_as_the_probe_reads_them() {
    let lay = Layout::DEFAULT;
    let key = |k: &str| AppId(format!("{k}-{}", "x".repeat(20)));
    let mut cache: lru_time_cache::LruCache<AppId, std::sync::Arc<u8>> =
        lru_time_cache::LruCache::with_capacity(3);
    // Wrap the LRU list's ring buffer around, so head != 0.
    for (i, k) in ["a", "b", "c", "d", "e", "f", "g"].iter().enumerate() {
        let base = &cache as *const _ as usize;
        let cap = word(base + lay.lru_capacity as usize);
        let len = word(base + lay.lru_list_len as usize);
        assert_eq!(cap, 3, "capacity");
        assert_eq!(len, i.min(3) as u64, "LRU list length before inserting {k}");
        if len >= cap {
            // What the probe reports as evicted: the front of the LRU list.
            let buf = word(base + lay.lru_list_ptr as usize) as usize;
            let ring = word(base + lay.lru_list_cap as usize);
            let mut head = word(base + lay.lru_list_head as usize);
            if head >= ring {
                head -= ring;
            }
            let front = string_at(buf + (head * lay.lru_key_size) as usize, &lay);
            // Keys are ordered by insertion here (no gets), so the LRU one is the oldest.
            let oldest = key(["a", "b", "c", "d", "e", "f", "g"][i - 3]).0;
            assert_eq!(front, oldest, "front of the LRU list before inserting {k}");
        }
        cache.insert(key(k), std::sync::Arc::new(0));
    }
    // A get makes an entry the most recently used: the next eviction is the one after it.
    assert!(cache.get(&key("e")).is_some());
    let base = &cache as *const _ as usize;
    let buf = word(base + lay.lru_list_ptr as usize) as usize;
    let head = word(base + lay.lru_list_head as usize) % word(base + lay.lru_list_cap as usize);
    assert_eq!(
        string_at(buf + (head * lay.lru_key_size) as usize, &lay),
        key("f").0
    );
    assert_eq!(std::mem::size_of::<AppId>() as u64, lay.lru_key_size);
}
