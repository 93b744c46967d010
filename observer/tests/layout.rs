//! The memory layout the probes assume (`observer_common::Layout::DEFAULT`) checked against
//! real values of the RPC types, compiled by this compiler: the request enum rusty-workers'
//! proxy hands to tarpc's `Channel::call`, `String`, the LRU cache, tarpc's answers and the
//! client types the request probes read.

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

/// `tarpc::Response<RuntimeServiceResponse>` as `rpc_response` copies it and userspace decodes
/// it: every answer kind, built as tarpc's dispatch task builds it (deserialized).
#[test]
fn runtime_answers_decode_as_the_probe_reads_them() {
    use observer::model::requests::{decode_answer, AnswerResult};
    use rusty_workers::rpc::RuntimeServiceResponse as R;
    type Resp = tarpc::Response<R>;
    let lay = Layout::DEFAULT;
    let handle = "0123456789abcdef0123456789abcdef";
    let ok_fetch = serde_json::json!({"headers": {}, "status": 200, "body": {"Binary": [1, 2]}});
    let cases: Vec<(serde_json::Value, u32, AnswerResult, Option<&str>)> = vec![
        (
            serde_json::json!({"Ok": {"Id": "rt-1"}}),
            method::ID,
            AnswerResult::Ok,
            Some("rt-1"),
        ),
        (
            serde_json::json!({"Ok": {"SpawnWorker": {"Ok": {"id": handle}}}}),
            method::SPAWN_WORKER,
            AnswerResult::Ok,
            Some(handle),
        ),
        (
            serde_json::json!({"Ok": {"SpawnWorker": {"Err": "V8Unknown"}}}),
            method::SPAWN_WORKER,
            AnswerResult::Error("generic_error"),
            None,
        ),
        (
            serde_json::json!({"Ok": {"SpawnWorker": {"Err": {"Io": "x"}}}}),
            method::SPAWN_WORKER,
            AnswerResult::Error("generic_error"),
            None,
        ),
        (
            serde_json::json!({"Ok": {"TerminateWorker": true}}),
            method::TERMINATE_WORKER,
            AnswerResult::Ok,
            None,
        ),
        (
            serde_json::json!({"Ok": {"ListWorkers": {"Ok": []}}}),
            method::LIST_WORKERS,
            AnswerResult::Ok,
            None,
        ),
        (
            serde_json::json!({"Ok": {"Fetch": {"Ok": ok_fetch}}}),
            method::FETCH,
            AnswerResult::Ok,
            None,
        ),
        (
            serde_json::json!({"Ok": {"Load": {"Ok": 5}}}),
            method::LOAD,
            AnswerResult::Ok,
            None,
        ),
        (
            serde_json::json!({"Ok": {"Load": {"Err": "V8Unknown"}}}),
            method::LOAD,
            AnswerResult::Error("generic_error"),
            None,
        ),
        (
            serde_json::json!({"Err": {"kind": 17, "detail": "x"}}),
            method::UNKNOWN,
            AnswerResult::ServerError,
            None,
        ),
    ];
    let mut cases = cases;
    for (kind, name) in [
        ("NoSuchWorker", "no_such_worker"),
        ("RuntimeThrowsException", "runtime_throws"),
        ("TimeLimitExceeded", "time_limit"),
        ("MemoryLimitExceeded", "memory_limit"),
        ("IoTimeout", "io_timeout"),
    ] {
        cases.push((
            serde_json::json!({"Ok": {"Fetch": {"Err": kind}}}),
            method::FETCH,
            AnswerResult::Error(name),
            None,
        ));
    }
    cases.push((
        serde_json::json!({"Ok": {"Fetch": {"Err": {"ScriptThrowsException": "boom"}}}}),
        method::FETCH,
        AnswerResult::Error("script_throws"),
        None,
    ));
    for (message, m, result, text) in cases {
        // tarpc::Response is non_exhaustive: built the way the wire builds it.
        let r: Resp =
            serde_json::from_value(serde_json::json!({"request_id": 4242, "message": message}))
                .expect("a valid answer");
        let base = &r as *const Resp as usize;
        let mut raw = [0u8; observer_common::MAX_STR];
        // SAFETY: reading the first bytes of a live value, as the probe does.
        raw.copy_from_slice(unsafe {
            std::slice::from_raw_parts(base as *const u8, observer_common::MAX_STR)
        });
        let a = decode_answer(&raw, &lay);
        assert_eq!(
            (a.request_id, a.method, &a.result),
            (4242, m, &result),
            "{r:?}"
        );
        if let Some(text) = text {
            let off = if m == method::ID {
                lay.resp_id_string
            } else {
                lay.resp_spawn_string
            };
            assert_eq!(
                lay.resp_niche_base
                    + if m == method::ID {
                        lay.resp_tag_id
                    } else {
                        lay.resp_tag_spawn
                    },
                word(base),
                "tag of {r:?}"
            );
            assert_eq!(
                string_at(base + off as usize, &lay),
                text,
                "string in {r:?}"
            );
        }
    }
}

/// What `rpc_call` and `rpc_done` read of tarpc's client types, on replicas of their private
/// structs (same field types, so the same layout from the same compiler) and on the public
/// `context::Context`.
#[test]
fn tarpc_client_layouts_match_the_probes() {
    use futures::channel::{mpsc, oneshot};
    use rusty_workers::rpc::{RuntimeServiceRequest as Req, RuntimeServiceResponse as Resp};
    let lay = Layout::DEFAULT;
    // tarpc::context::Context and its trace context are public.
    let trace = std::mem::offset_of!(tarpc::context::Context, trace_context)
        + std::mem::offset_of!(tarpc::trace::Context, trace_id);
    assert_eq!(trace as u64, lay.ctx_trace_id, "trace id in a Context");
    let ctx = tarpc::context::current();
    let base = &ctx as *const _ as usize;
    let id = ctx.trace_context.trace_id;
    // SAFETY: a live value; TraceId is a u128 newtype.
    let raw: u128 = unsafe { std::ptr::read_unaligned((base + trace) as *const u128) };
    assert_eq!(format!("{id}"), format!("{raw:02x}"), "trace id bytes");

    // tarpc 0.24 src/rpc/client/channel.rs: Channel and DispatchResponse.
    #[allow(dead_code)]
    struct RequestCancellation(mpsc::UnboundedSender<u64>);
    #[allow(dead_code)]
    struct DispatchRequest {
        ctx: tarpc::context::Context,
        request_id: u64,
        request: Req,
        response_completion: oneshot::Sender<tarpc::Response<Resp>>,
    }
    #[allow(dead_code)]
    struct Channel {
        to_dispatch: mpsc::Sender<DispatchRequest>,
        cancellation: RequestCancellation,
        next_request_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }
    #[allow(dead_code)]
    struct DispatchResponse {
        response: oneshot::Receiver<tarpc::Response<Resp>>,
        ctx: tarpc::context::Context,
        complete: bool,
        cancellation: RequestCancellation,
        request_id: u64,
    }
    use std::mem::offset_of;
    assert_eq!(offset_of!(Channel, cancellation) as u64, lay.chan_cancel);
    assert_eq!(offset_of!(DispatchResponse, ctx) as u64, lay.dr_ctx);
    assert_eq!(
        offset_of!(DispatchResponse, response) as u64,
        lay.dr_response
    );
    assert_eq!(
        offset_of!(DispatchResponse, cancellation) as u64,
        lay.dr_cancel
    );
    assert_eq!(
        offset_of!(DispatchResponse, complete) as u64,
        lay.dr_complete
    );
}

/// The proxy's state, shaped as rusty-workers' (`rusty-workers-proxy/src/sched.rs`: the same
/// field types; the field order is this compiler's, as it is the proxy's), built here and read
/// back by the snapshot walker through `process_vm_readv` on this very process: the std and
/// crate layouts of `StateLayout::DEFAULT` (OnceCell, Arc, BTreeMap nodes, VecDeque, LruCache)
/// and the search for the proxy's own fields are checked against values of this compiler.
mod state {
    use lru_time_cache::LruCache;
    use observer::memory::ProcessMemory;
    use observer::snapshot::{AppEntry, Learnt, PooledInstance, StateLayout, Target};
    use observer_common::Layout;
    use rusty_workers::types::*;
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::atomic::AtomicU16;
    use std::sync::Arc;
    use std::time::Instant;
    use tokio::sync::{Mutex as AsyncMutex, RwLock as AsyncRwLock};

    #[allow(dead_code)]
    pub struct RtState {
        client: Arc<u64>,
        load: Arc<AtomicU16>,
    }

    #[allow(dead_code)]
    pub struct ReadyInstance {
        rtid: RuntimeId,
        last_active: Instant,
        handle: WorkerHandle,
        client: Arc<u64>,
    }

    #[allow(dead_code)]
    pub struct AppState {
        id: AppId,
        config: WorkerConfiguration,
        bundle_id: String,
        bundle: Vec<u8>,
        ready_instances: AsyncMutex<VecDeque<ReadyInstance>>,
    }

    #[allow(dead_code)]
    pub struct Scheduler {
        local_config: [u64; 7],
        worker_config: WorkerConfiguration,
        clients: AsyncRwLock<BTreeMap<RuntimeId, RtState>>,
        apps: AsyncMutex<LruCache<AppId, Arc<AppState>>>,
        route_cache: AsyncMutex<LruCache<String, BTreeMap<String, AppId>>>,
        terminate_queue: tokio::sync::mpsc::Sender<ReadyInstance>,
    }

    static SCHEDULER: once_cell::sync::OnceCell<Arc<Scheduler>> = once_cell::sync::OnceCell::new();

    fn hex(n: u64, salt: u64) -> String {
        format!(
            "{:016x}{:016x}",
            n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            salt
        )
    }

    fn app_id(i: u64) -> String {
        format!("{:08x}-0000-4000-8000-{:012x}", i, i * 7)
    }

    /// 30 apps (a B-tree of height 1), 14 runtimes (one whose value size the walk must find),
    /// pools of 0 to 5 instances, some wrapped around their ring buffer.
    fn build() -> (Arc<Scheduler>, Vec<AppEntry>, Vec<String>) {
        let runtimes: Vec<String> = (0..14).map(|i| hex(i, 0xaaaa)).collect();
        let mut clients = BTreeMap::new();
        for r in &runtimes {
            clients.insert(
                RuntimeId(r.clone()),
                RtState {
                    client: Arc::new(1),
                    load: Arc::new(AtomicU16::new(3)),
                },
            );
        }
        let mut apps = LruCache::with_capacity(100);
        let mut want = Vec::new();
        for a in 0..30u64 {
            let mut pool = VecDeque::with_capacity(4);
            // Wrap some buffers: push then pop, so the head moves off the start.
            for _ in 0..(a % 3) {
                pool.push_back(instance(&runtimes, 999, a));
                pool.pop_front();
            }
            let n = a % 6;
            let mut instances = Vec::new();
            for k in 0..n {
                let inst = instance(&runtimes, k, a);
                instances.push(PooledInstance {
                    handle: inst.handle.id.clone(),
                    runtime_id: inst.rtid.0.clone(),
                });
                pool.push_back(inst);
            }
            let id = app_id(a);
            apps.insert(
                AppId(id.clone()),
                Arc::new(AppState {
                    id: AppId(id.clone()),
                    config: WorkerConfiguration::for_tests(),
                    bundle_id: format!("bundle-{a}"),
                    bundle: vec![7; 100],
                    ready_instances: AsyncMutex::new(pool),
                }),
            );
            want.push(AppEntry {
                id,
                ready: Some(n),
                instances,
            });
        }
        want.sort_by(|a, b| a.id.cmp(&b.id));
        let mut routes = LruCache::with_capacity(100);
        routes.insert(
            "example.com".to_string(),
            BTreeMap::from([("/".to_string(), AppId(app_id(1)))]),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(10);
        std::mem::forget(rx);
        let s = Arc::new(Scheduler {
            local_config: [1, 2, 3, 4, 5, 6, 7],
            worker_config: WorkerConfiguration::for_tests(),
            clients: AsyncRwLock::new(clients),
            apps: AsyncMutex::new(apps),
            route_cache: AsyncMutex::new(routes),
            terminate_queue: tx,
        });
        (s, want, runtimes)
    }

    fn instance(runtimes: &[String], k: u64, app: u64) -> ReadyInstance {
        ReadyInstance {
            rtid: RuntimeId(runtimes[((k + app) % runtimes.len() as u64) as usize].clone()),
            last_active: Instant::now(),
            handle: WorkerHandle {
                id: hex(app * 100 + k, 0xbbbb),
            },
            client: Arc::new(k),
        }
    }

    #[test]
    fn the_snapshot_walker_reads_a_state_built_by_this_compiler() {
        let static_addr = &SCHEDULER as *const _ as u64;
        let mut t = Target::new(
            static_addr,
            StateLayout::DEFAULT,
            Layout::DEFAULT,
            Learnt::default(),
        );
        let mem = ProcessMemory::new(std::process::id(), 1 << 24);
        let empty = t.walk(&mem).expect("an unset OnceCell: no scheduler yet");
        assert!(empty.apps.is_empty() && empty.app_cache == 0, "{empty:?}");

        let (s, want, runtimes) = build();
        assert!(SCHEDULER.set(s.clone()).is_ok(), "set once");
        let snap = t.walk(&mem).expect("the state walks");
        let mut got = snap.apps.clone();
        got.sort_by(|a, b| a.id.cmp(&b.id));
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "app, its pool and its pooled instances");
        }
        assert_eq!(got.len(), want.len(), "apps");
        let mut rts = snap.runtimes.clone().expect("runtimes found");
        rts.sort();
        let mut want_rts = runtimes.clone();
        want_rts.sort();
        assert_eq!(rts, want_rts, "runtime ids");
        assert!(snap.instances_complete, "every pooled instance read");
        let apps_addr = {
            let g = s.apps.try_lock().expect("unlocked");
            &*g as *const _ as u64
        };
        assert_eq!(snap.app_cache, apps_addr, "the app cache's address");
        let l = t.learnt;
        assert!(
            l.sched_apps.is_some()
                && l.sched_clients.is_some()
                && l.app_id.is_some()
                && l.app_ready.is_some()
                && l.instance_handle.is_some()
                && l.instance_rtid.is_some(),
            "everything learnt: {l:?}"
        );
        assert_eq!(
            l.instance_size,
            Some(std::mem::size_of::<ReadyInstance>() as u64),
            "ReadyInstance's size found"
        );
        // What was learnt reads the same state again, and a budget stops a walk.
        assert_eq!(t.walk(&mem).expect("again").apps.len(), 30);
        let poor = ProcessMemory::new(std::process::id(), 4096);
        let e = t.walk(&poor).expect_err("budget");
        assert_eq!(e.reason(), "budget", "{e}");
    }
}
