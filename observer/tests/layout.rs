//! The memory layout the probes assume (`observer_common::Layout::DEFAULT`) checked against
//! real values of the RPC types, compiled by this compiler: the request enum rusty-workers'
//! proxy hands to tarpc's `Channel::call`, `String`, the LRU cache and tarpc's context; and
//! the wire encoding of tarpc's frames that userspace decodes.

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

/// The tarpc frames the socket tracepoints copy, decoded as userspace decodes them
/// (`observer::model::requests::wire`), from real values encoded by the codec tarpc's
/// transport uses (tokio-serde's `Bincode`, as the proxy and the runtimes build it): every
/// answer kind, built as a runtime's server builds it, cut to the head the kernel copies.
#[test]
fn runtime_answers_decode_from_the_wire() {
    use observer::model::requests::{decode_answer, AnswerResult};
    use rusty_workers::rpc::RuntimeServiceResponse as R;
    type Resp = tarpc::Response<R>;
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
        let bytes = encode::<Resp, tarpc::ClientMessage<Req>>(&r);
        let head = &bytes[..bytes.len().min(observer_common::WIRE_HEAD)];
        let a = decode_answer(head).unwrap_or_else(|| panic!("{r:?} does not decode: {bytes:?}"));
        assert_eq!(
            (a.request_id, a.method, &a.result),
            (4242, m, &result),
            "{r:?}"
        );
        assert_eq!(a.string, text.unwrap_or("").as_bytes(), "string in {r:?}");
    }
}

/// `item` as tarpc's TCP transport frames it, past the length prefix: tokio-serde's
/// `Bincode` with its default options, which `testbed-common`'s transport and rusty-workers'
/// use.
fn encode<T: serde::Serialize, U: for<'a> serde::Deserialize<'a>>(item: &T) -> Vec<u8> {
    use tokio_serde::Serializer;
    let codec = std::pin::pin!(rusty_workers::SerdeFormat::<U, T>::default());
    codec.serialize(item).expect("encodes").to_vec()
}

/// What the proxy sends: a call's request (its trace id, request id and method, which join it
/// to its answer) and a cancel, from real `ClientMessage`s encoded as the transport does.
#[test]
fn calls_and_cancels_decode_from_the_wire() {
    use observer::model::requests::{decode_sent, Sent};
    type Msg = tarpc::ClientMessage<Req>;
    type Resp = tarpc::Response<rusty_workers::rpc::RuntimeServiceResponse>;
    let handle = WorkerHandle {
        id: "0123456789abcdef0123456789abcdef".into(),
    };
    let requests: Vec<(Req, u32)> = vec![
        (Req::Id {}, method::ID),
        (
            Req::SpawnWorker {
                appid: "afb38b70-d0bb-4102-8248-765e6c1d7dde".into(),
                configuration: cfg(),
                bundle: vec![7; 300],
            },
            method::SPAWN_WORKER,
        ),
        (
            Req::TerminateWorker {
                handle: handle.clone(),
            },
            method::TERMINATE_WORKER,
        ),
        (Req::ListWorkers {}, method::LIST_WORKERS),
        (
            Req::Fetch {
                handle,
                req: RequestObject::default(),
            },
            method::FETCH,
        ),
        (Req::Load {}, method::LOAD),
    ];
    for (i, (message, m)) in requests.into_iter().enumerate() {
        let ctx = tarpc::context::current();
        let trace_id = trace_of(&ctx);
        let request_id = [3u64, 300, 70_000, 5_000_000_000][i % 4];
        let msg: Msg = real(&Mirror::Request {
            context: ctx,
            id: request_id,
            message,
        });
        let bytes = encode::<Msg, Resp>(&msg);
        let head = &bytes[..bytes.len().min(observer_common::WIRE_HEAD)];
        assert_eq!(
            decode_sent(head),
            Some(Sent::Request {
                trace_id,
                request_id,
                method: m
            }),
            "{msg:?}"
        );
    }
    let ctx = tarpc::context::current();
    let cancel: Msg = real(&Mirror::Cancel {
        trace_context: ctx.trace_context,
        request_id: 9,
    });
    assert_eq!(
        decode_sent(&encode::<Msg, Resp>(&cancel)),
        Some(Sent::Cancel {
            trace_id: trace_of(&ctx),
            request_id: 9
        })
    );
}

/// tarpc's `ClientMessage` and `Request`, whose fields are not public (`non_exhaustive`):
/// encoded in their shape (a newtype variant of a struct encodes as the struct variant does)
/// and decoded by the codec into the real type, which is then what the tests encode.
#[derive(serde::Serialize)]
enum Mirror {
    Request {
        context: tarpc::context::Context,
        id: u64,
        message: Req,
    },
    Cancel {
        trace_context: tarpc::trace::Context,
        request_id: u64,
    },
}

fn real(m: &Mirror) -> tarpc::ClientMessage<Req> {
    use tokio_serde::Deserializer;
    type Msg = tarpc::ClientMessage<Req>;
    let bytes = encode::<Mirror, Msg>(m);
    let codec = std::pin::pin!(rusty_workers::SerdeFormat::<Msg, Mirror>::default());
    codec
        .deserialize(&bytes::BytesMut::from(&bytes[..]))
        .expect("the mirror has tarpc's shape")
}

/// A context's trace id as the `rpc_call` probe reads it from memory (two little-endian
/// words at `Layout::ctx_trace_id`), which must be the one its request frame carries.
fn trace_of(ctx: &tarpc::context::Context) -> u128 {
    let lay = Layout::DEFAULT;
    let base = ctx as *const _ as usize + lay.ctx_trace_id as usize;
    observer::decode::trace_id([word(base), word(base + 8)])
}

/// Where `rpc_call` reads a call's connection and whether its dispatch task still runs: the
/// cancellation sender of tarpc's `Channel` (a replica of the private struct: same field
/// types, so the same layout from the same compiler) and the state word of the real
/// `futures::channel::mpsc` channel behind it, open until its receiver (the dispatch task's)
/// is dropped.
#[test]
fn a_call_reads_its_connection_open_until_the_dispatch_task_ends() {
    use futures::channel::{mpsc, oneshot};
    use rusty_workers::rpc::RuntimeServiceResponse as Resp;
    let lay = Layout::DEFAULT;
    // tarpc 0.24 src/rpc/client/channel.rs.
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
    let (to_dispatch, pending) = mpsc::channel(100);
    let (cancel, canceled) = mpsc::unbounded();
    let chan = Channel {
        to_dispatch,
        cancellation: RequestCancellation(cancel),
        next_request_id: Default::default(),
    };
    let clone = RequestCancellation(chan.cancellation.0.clone());
    assert_eq!(
        std::mem::offset_of!(Channel, cancellation) as u64,
        lay.chan_cancel
    );
    let base = &chan as *const Channel as usize;
    let conn = word(base + lay.chan_cancel as usize);
    assert_eq!(
        conn,
        word(&clone as *const _ as usize),
        "clones of a client name one connection"
    );
    let open = || word(conn as usize + lay.chan_state as usize) >> 63 == 1;
    assert!(open(), "open while the dispatch task lives");
    drop(canceled);
    drop(pending);
    assert!(!open(), "closed once it ended");
}

/// Where `rpc_call` reads the trace id of tarpc's public `context::Context`.
#[test]
fn the_call_reads_its_trace_id_where_tarpc_keeps_it() {
    let lay = Layout::DEFAULT;
    let trace = std::mem::offset_of!(tarpc::context::Context, trace_context)
        + std::mem::offset_of!(tarpc::trace::Context, trace_id);
    assert_eq!(trace as u64, lay.ctx_trace_id, "trace id in a Context");
    let ctx = tarpc::context::current();
    let id = ctx.trace_context.trace_id;
    assert_eq!(
        format!("{id}"),
        format!("{:02x}", trace_of(&ctx)),
        "trace id bytes"
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
