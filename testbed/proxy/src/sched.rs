//! The scheduler: app cache, route cache, ready-instance pool with expiry and dropout,
//! runtime RPC. Built with the data structures and control flow rusty-workers' scheduler uses
//! (an `lru_time_cache` app cache, tarpc calls, async poll bodies), so that the observer's
//! probes meet the same mechanisms here as in the real proxy.

use crate::config::LocalConfig;
use crate::db::DataClient;
use crate::truth;
use lru_time_cache::LruCache;
use rand::distributions::Open01;
use rand::Rng;
use rusty_workers::rpc::RuntimeServiceClient;
use rusty_workers::types::*;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex, RwLock as AsyncRwLock};

#[derive(Debug, Error)]
pub enum SchedError {
    #[error("no available instance")]
    NoAvailableInstance,
    #[error("no route mapping found")]
    NoRouteMapping,
    #[error("request body too large")]
    RequestBodyTooLarge,
    #[error("request failed after retries")]
    RequestFailedAfterRetries,
}

impl SchedError {
    /// As rusty-workers' (a plain function in its release build too).
    #[inline(never)]
    pub fn build_response(&self) -> hyper::Response<hyper::Body> {
        let status = match self {
            SchedError::NoAvailableInstance => hyper::StatusCode::SERVICE_UNAVAILABLE,
            SchedError::NoRouteMapping => hyper::StatusCode::BAD_GATEWAY,
            SchedError::RequestBodyTooLarge => hyper::StatusCode::PAYLOAD_TOO_LARGE,
            SchedError::RequestFailedAfterRetries => hyper::StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut res = hyper::Response::new(hyper::Body::from(
            status.canonical_reason().unwrap_or("unknown error"),
        ));
        *res.status_mut() = status;
        res
    }
}

/// Ground truth of the request being served, kept in its task.
#[derive(Default, Clone)]
pub struct RequestTruth {
    /// The app whose state served the request ("" until the app is resolved).
    pub app: String,
    /// A spawn_worker was sent for it.
    pub cold: bool,
    /// A fetch was sent for it.
    pub fetched: bool,
    /// Its last fetch was answered with an execution error other than NoSuchWorker.
    pub execution_error: bool,
}

tokio::task_local! {
    pub static REQUEST: std::cell::RefCell<RequestTruth>;
}

fn note(f: impl FnOnce(&mut RequestTruth)) {
    let _ = REQUEST.try_with(|r| f(&mut r.borrow_mut()));
}

/// The outcome of a request, by the proxy's own error kinds.
pub fn outcome(
    res: &anyhow::Result<hyper::Response<hyper::Body>>,
    t: &RequestTruth,
) -> &'static str {
    let Err(e) = res else { return "ok" };
    match e.downcast_ref::<SchedError>() {
        Some(SchedError::NoAvailableInstance) => "no_instance",
        Some(SchedError::NoRouteMapping) => "no_route",
        Some(SchedError::RequestBodyTooLarge) => "body_too_large",
        Some(SchedError::RequestFailedAfterRetries) if t.execution_error => "execution_error",
        Some(SchedError::RequestFailedAfterRetries) => "retries_exhausted",
        None => "internal_error",
    }
}

pub struct Scheduler {
    local_config: LocalConfig,
    worker_config: WorkerConfiguration,
    clients: AsyncRwLock<BTreeMap<RuntimeId, RtState>>,
    apps: AsyncMutex<LruCache<AppId, Arc<AppState>>>,
    route_cache: AsyncMutex<LruCache<String, BTreeMap<String, AppId>>>,
    terminate_queue: mpsc::Sender<ReadyInstance>,
    kv_client: DataClient,
    lookup_route_tx: mpsc::Sender<(String, oneshot::Sender<()>)>,
    lookup_app_tx: mpsc::Sender<(AppId, oneshot::Sender<()>)>,
}

/// A connected runtime, as rusty-workers keeps it: its client and its last reported load.
#[derive(Clone)]
struct RtState {
    client: RuntimeServiceClient,
    load: Arc<AtomicU16>,
}

/// Where each runtime was found, to find it again after its connection is dropped. Kept out of
/// `Scheduler` so that the scheduler has exactly rusty-workers' fields (the observer reads it
/// from memory, and must meet the same shape here as there).
static RUNTIME_ADDRS: std::sync::Mutex<BTreeMap<RuntimeId, std::net::SocketAddr>> =
    std::sync::Mutex::new(BTreeMap::new());

struct AppState {
    id: AppId,
    config: WorkerConfiguration,
    bundle_id: String,
    bundle: Vec<u8>,
    ready_instances: AsyncMutex<VecDeque<ReadyInstance>>,
}

#[derive(Clone)]
struct ReadyInstance {
    rtid: RuntimeId,
    last_active: Instant,
    handle: WorkerHandle,
    client: RuntimeServiceClient,
}

impl ReadyInstance {
    #[inline(never)]
    fn is_usable(&self, scheduler: &Scheduler) -> bool {
        Instant::now().duration_since(self.last_active)
            <= Duration::from_millis(scheduler.local_config.ready_instance_expiration_ms)
    }
}

impl AppState {
    async fn gc_ready_instances(&self, scheduler: &Scheduler) {
        let mut ready = self.ready_instances.lock().await;
        while ready.len() > scheduler.local_config.max_ready_instances_per_app {
            drop(
                scheduler
                    .terminate_queue
                    .try_send(ready.pop_front().unwrap()),
            );
        }
        while let Some(x) = ready.front() {
            if x.is_usable(scheduler) {
                break;
            }
            drop(
                scheduler
                    .terminate_queue
                    .try_send(ready.pop_front().unwrap()),
            );
        }
    }

    async fn pool_instance(&self, scheduler: &Scheduler, inst: ReadyInstance) {
        if rand::thread_rng().sample::<f32, _>(Open01) > scheduler.local_config.dropout_rate {
            self.ready_instances.lock().await.push_back(inst);
        } else {
            drop(scheduler.terminate_queue.try_send(inst));
        }
        self.gc_ready_instances(scheduler).await;
    }

    async fn get_instance(&self, scheduler: &Scheduler) -> anyhow::Result<ReadyInstance> {
        self.gc_ready_instances(scheduler).await;
        if let Some(mut inst) = self.ready_instances.lock().await.pop_front() {
            inst.last_active = Instant::now();
            return Ok(inst);
        }
        let clients = scheduler.clients.read().await;
        if clients.is_empty() {
            return Err(SchedError::NoAvailableInstance.into());
        }
        let index = rand::thread_rng().gen_range(0..clients.len());
        let (rtid, rt) = clients.iter().nth(index).unwrap();
        let rtid = rtid.clone();
        let mut client = rt.client.clone();
        drop(clients);
        truth::rpc("spawn_worker");
        note(|r| r.cold = true);
        let generation = truth::spawn_attempt(&self.id.0);
        let handle = client
            .spawn_worker(
                tarpc::context::current(),
                self.id.0.clone(),
                self.config.clone(),
                self.bundle.clone(),
            )
            .await??;
        truth::spawned(&self.id.0, &handle.id, generation);
        Ok(ReadyInstance {
            rtid,
            last_active: Instant::now(),
            handle,
            client,
        })
    }
}

impl Scheduler {
    pub fn new(
        worker_config: WorkerConfiguration,
        local_config: LocalConfig,
        kv_client: DataClient,
    ) -> Arc<Self> {
        let (terminate_queue, mut terminate_rx) = mpsc::channel::<ReadyInstance>(1000);
        tokio::spawn(async move {
            while let Some(mut inst) = terminate_rx.recv().await {
                let mut ctx = tarpc::context::current();
                ctx.deadline = std::time::SystemTime::now() + Duration::from_secs(1);
                truth::rpc("terminate_worker");
                truth::terminated(&inst.handle.id);
                let _ = inst.client.terminate_worker(ctx, inst.handle.clone()).await;
            }
        });
        let (lookup_route_tx, lookup_route_rx) = mpsc::channel(100);
        let (lookup_app_tx, lookup_app_rx) = mpsc::channel(100);
        let me = Arc::new(Self {
            apps: AsyncMutex::new(LruCache::with_capacity(local_config.app_cache_size)),
            route_cache: AsyncMutex::new(LruCache::with_capacity(local_config.route_cache_size)),
            local_config,
            worker_config,
            clients: AsyncRwLock::new(BTreeMap::new()),
            terminate_queue,
            kv_client,
            lookup_route_tx,
            lookup_app_tx,
        });
        let (a, b, c, d) = (me.clone(), me.clone(), me.clone(), me.clone());
        tokio::spawn(async move { a.lookup_route_background(lookup_route_rx).await });
        tokio::spawn(async move { b.lookup_app_background(lookup_app_rx).await });
        tokio::spawn(async move { c.apps_gc_task().await });
        tokio::spawn(async move { d.route_cache_gc_task().await });
        me
    }

    /// What the scheduler holds now, read under its locks as the 2021 in-proxy exporter read
    /// it (`apps.len()`, `ready_instances.len()`): the ground truth of a snapshot.
    pub async fn state_truth(&self, t: &mut truth::Truth) {
        let apps: Vec<Arc<AppState>> = self
            .apps
            .lock()
            .await
            .peek_iter()
            .map(|(_, v)| v.clone())
            .collect();
        t.apps_cached = apps.len() as u64;
        for a in apps {
            let ready = a.ready_instances.lock().await;
            t.apps.entry(a.id.0.clone()).or_default().pooled = Some(ready.len() as u64);
            for i in ready.iter() {
                *t.pooled_by_runtime.entry(i.rtid.0.clone()).or_default() += 1;
            }
        }
    }

    pub async fn handle_request(
        &self,
        req: hyper::Request<hyper::Body>,
    ) -> anyhow::Result<hyper::Response<hyper::Body>> {
        let host = req
            .headers()
            .get("host")
            .and_then(|x| x.to_str().ok())
            .unwrap_or("")
            .split(':')
            .next()
            .unwrap()
            .to_string();
        let uri = req.uri().clone();

        let mut appid = self
            .route_cache
            .lock()
            .await
            .get(&host)
            .and_then(|m| lookup_submappings(uri.path(), m))
            .cloned();
        if appid.is_none() {
            let (tx, rx) = oneshot::channel();
            if self.lookup_route_tx.try_send((host.clone(), tx)).is_ok() {
                let _ = rx.await;
                appid = self
                    .route_cache
                    .lock()
                    .await
                    .get(&host)
                    .and_then(|m| lookup_submappings(uri.path(), m))
                    .cloned();
            }
        }
        let appid = appid.ok_or(SchedError::NoRouteMapping)?;

        let method = req.method().as_str().to_string();
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in req.headers() {
            headers
                .entry(k.as_str().to_string())
                .or_default()
                .push(v.to_str()?.to_string());
        }
        let url = format!("https://{}{}", host, uri);
        let body = hyper::body::to_bytes(req.into_body()).await?;
        if body.len() as u64 > self.local_config.max_request_body_size_bytes {
            return Err(SchedError::RequestBodyTooLarge.into());
        }
        let target_req = RequestObject {
            headers,
            method,
            url,
            body: HttpBody::Binary(body.to_vec()),
        };

        let mut app = self.apps.lock().await.get(&appid).cloned();
        if app.is_none() {
            let (tx, rx) = oneshot::channel();
            let loads_before = truth::loads(&appid.0);
            if self.lookup_app_tx.try_send((appid.clone(), tx)).is_ok() {
                let _ = rx.await;
                app = self.apps.lock().await.get(&appid).cloned();
                if app.is_none() && truth::loads(&appid.0) > loads_before {
                    truth::evicted_before_use();
                }
            }
        }
        let app = app.ok_or(SchedError::NoRouteMapping)?;
        note(|r| r.app = appid.0.clone());

        for _ in 0..3usize {
            let mut instance = app.get_instance(self).await?;
            let mut ctx = tarpc::context::current();
            ctx.deadline = std::time::SystemTime::now()
                + Duration::from_millis(self.local_config.request_timeout_ms);
            truth::rpc("fetch");
            truth::request(&appid.0);
            note(|r| r.fetched = true);
            let fetch_res = instance
                .client
                .fetch(ctx, instance.handle.clone(), target_req.clone())
                .await;
            let fetch_res = match fetch_res {
                Ok(x) => x,
                Err(_) => {
                    note(|r| r.execution_error = false);
                    self.clients.write().await.remove(&instance.rtid);
                    truth::discarded(&instance.handle.id);
                    continue;
                }
            };
            let res = match fetch_res {
                Ok(x) => x,
                Err(ExecutionError::NoSuchWorker) => {
                    note(|r| r.execution_error = false);
                    truth::discarded(&instance.handle.id);
                    continue;
                }
                Err(e) => {
                    note(|r| r.execution_error = true);
                    if !e.terminates_worker() {
                        app.pool_instance(self, instance).await;
                    } else {
                        truth::discarded(&instance.handle.id);
                    }
                    break;
                }
            };
            app.pool_instance(self, instance).await;
            let mut out = hyper::Response::new(match res.body {
                HttpBody::Binary(b) => hyper::Body::from(b),
            });
            *out.status_mut() = hyper::StatusCode::from_u16(res.status)?;
            return Ok(out);
        }
        Err(SchedError::RequestFailedAfterRetries.into())
    }

    /// Connects to every configured runtime it has no client for, and asks its id (run again
    /// periodically, as rusty-workers does: a restarted runtime is found again).
    pub async fn discover_runtimes(&self, addrs: &[std::net::SocketAddr]) {
        let connected: Vec<std::net::SocketAddr> = {
            let clients = self.clients.read().await;
            let known = RUNTIME_ADDRS.lock().unwrap();
            known
                .iter()
                .filter(|(id, _)| clients.contains_key(*id))
                .map(|(_, a)| *a)
                .collect()
        };
        for addr in addrs.iter().filter(|a| !connected.contains(a)) {
            let Ok(mut client) = RuntimeServiceClient::connect_noretry(addr).await else {
                eprintln!("cannot connect to runtime {addr}");
                continue;
            };
            truth::rpc("id");
            if let Ok(id) = client.id(tarpc::context::current()).await {
                RUNTIME_ADDRS.lock().unwrap().insert(id.clone(), *addr);
                self.clients.write().await.entry(id).or_insert(RtState {
                    client,
                    load: Arc::new(AtomicU16::new(0)),
                });
            }
        }
    }

    /// Asks every runtime its load; drops the ones that do not answer.
    pub async fn query_runtimes(&self) {
        let clients: Vec<_> = self.clients.read().await.clone().into_iter().collect();
        for (rtid, mut rt) in clients {
            truth::rpc("load");
            match rt.client.load(tarpc::context::current()).await {
                Ok(Ok(load)) => rt.load.store(load, Ordering::Relaxed),
                _ => drop(self.clients.write().await.remove(&rtid)),
            }
        }
    }

    async fn lookup_route_background(&self, mut rx: mpsc::Receiver<(String, oneshot::Sender<()>)>) {
        while let Some((domain, back)) = rx.recv().await {
            if self.route_cache.lock().await.get(&domain).is_none() {
                if let Ok(map) = self.kv_client.route_mapping_list_for_domain(&domain).await {
                    let map: BTreeMap<_, _> = map.into_iter().map(|(k, v)| (k, AppId(v))).collect();
                    self.route_cache.lock().await.insert(domain, map);
                }
            }
            let _ = back.send(());
        }
    }

    async fn lookup_app_background(&self, mut rx: mpsc::Receiver<(AppId, oneshot::Sender<()>)>) {
        while let Some((id, back)) = rx.recv().await {
            self.do_lookup_app_background(id).await;
            let _ = back.send(());
        }
    }

    async fn do_lookup_app_background(&self, id: AppId) {
        if self.apps.lock().await.get(&id).is_some() {
            return;
        }
        let Ok(Some(config)) = self.kv_client.app_metadata_get(&id.0).await else {
            return;
        };
        let Ok(Some(bundle)) = self.kv_client.app_bundle_get(&config.bundle_id).await else {
            return;
        };
        let state = AppState {
            id: id.clone(),
            config: self.worker_config.clone(),
            bundle_id: config.bundle_id,
            bundle,
            ready_instances: AsyncMutex::new(VecDeque::new()),
        };
        truth::app_loaded(&id.0);
        let mut apps = self.apps.lock().await;
        // Ground truth for capacity evictions, which the cache does inside insert.
        let before: Vec<AppId> = apps.peek_iter().map(|(k, _)| k.clone()).collect();
        apps.insert(id, Arc::new(state));
        for gone in before.iter().filter(|k| apps.peek(k).is_none()) {
            truth::app_evicted(&gone.0, true);
        }
    }

    async fn apps_gc_task(&self) {
        loop {
            let apps: Vec<(AppId, String)> = self
                .apps
                .lock()
                .await
                .iter()
                .map(|(k, v)| (k.clone(), v.bundle_id.clone()))
                .collect();
            for (id, bundle_id) in apps {
                let remove = match self.kv_client.app_metadata_get(&id.0).await {
                    Ok(Some(config)) => config.bundle_id != bundle_id,
                    Ok(None) => true,
                    Err(_) => false,
                };
                if remove && self.apps.lock().await.remove(&id).is_some() {
                    truth::app_evicted(&id.0, false);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn route_cache_gc_task(&self) {
        loop {
            let domains: Vec<String> = self
                .route_cache
                .lock()
                .await
                .peek_iter()
                .map(|x| x.0.clone())
                .collect();
            for domain in domains {
                if let Ok(map) = self.kv_client.route_mapping_list_for_domain(&domain).await {
                    let map: BTreeMap<_, _> = map.into_iter().map(|(k, v)| (k, AppId(v))).collect();
                    let mut cache = self.route_cache.lock().await;
                    if cache.peek(&domain).is_some_and(|e| e != &map) {
                        cache.remove(&domain);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn lookup_submappings<'a>(path: &str, m: &'a BTreeMap<String, AppId>) -> Option<&'a AppId> {
    // A prefix of the path sorts at or before it: the keys past it need no look (a test with
    // 100,000 apps routes each request in microseconds, not a scan of them all).
    use std::ops::Bound;
    m.range::<str, _>((Bound::Unbounded, Bound::Included(path)))
        .rev()
        .find(|(k, _)| path.starts_with(k.as_str()))
        .map(|(_, v)| v)
}
