//! Ground truth: what the proxy itself did, counted where it does it, served as JSON.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Serialize, Default, Clone)]
pub struct AppTruth {
    pub loads: u64,
    /// Removed because the app changed or was deleted.
    pub evictions: u64,
    /// Dropped by the full app cache (least recently used).
    pub capacity_evictions: u64,
    /// spawn_worker RPCs sent.
    pub spawns: u64,
    pub terminations: u64,
    /// Instances lost: left with their evicted app state and not ended after all (the
    /// observer's dropped less dropped-and-ended).
    pub dropped: u64,
    /// Fetch RPCs sent to an instance of this app.
    pub requests: u64,
    pub loaded: bool,
    pub instances_alive: u64,
    /// Instances the proxy let go after a failed fetch (the runtime lost or ended them).
    pub discarded: u64,
    /// Requests answered, by outcome (`sched::outcome`).
    pub outcomes: BTreeMap<String, u64>,
    /// Requests that sent a spawn_worker (cold), or a fetch and no spawn_worker (warm).
    pub cold: u64,
    pub warm: u64,
    /// Instances in the app's ready pool (`ready_instances.len()`, the 2021 exporter's
    /// READY_INSTANCE), read under the pool's lock when the truth is served; absent when the
    /// app is not in the app cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pooled: Option<u64>,
}

#[derive(Serialize, Default, Clone)]
pub struct Truth {
    pub apps: BTreeMap<String, AppTruth>,
    pub rpc_calls: BTreeMap<String, u64>,
    pub apps_loaded: u64,
    /// The app cache's own length (`apps.len()`, the 2021 exporter's APP_NUM), read under its
    /// lock when the truth is served.
    pub apps_cached: u64,
    /// Instances in each runtime's ready pools (by RuntimeId), read as `pooled`.
    pub pooled_by_runtime: BTreeMap<String, u64>,
    /// Requests answered "no route" although their app was loaded for them: the app left the
    /// cache before the request read it. Upstream's apps gc walks the app cache with
    /// `LruCache::iter`, which moves every entry it visits to the most recent end and so
    /// reverses the order: the app loaded last becomes the least recently used and the next
    /// load evicts it (lru_time_cache 0.11 `Iter::next`; rusty-workers `apps_gc_task`). Only a
    /// full cache shows it.
    pub apps_evicted_before_use: u64,
    /// handle -> (app, dropped with its evicted app)
    #[serde(skip)]
    handles: BTreeMap<String, (String, bool)>,
}

static TRUTH: Mutex<Option<Truth>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Truth) -> R) -> R {
    let mut g = TRUTH.lock().unwrap();
    f(g.get_or_insert_with(Truth::default))
}

pub fn rpc(method: &str) {
    with(|t| *t.rpc_calls.entry(method.to_string()).or_default() += 1);
}

pub fn app_loaded(app: &str) {
    with(|t| {
        let a = t.apps.entry(app.to_string()).or_default();
        a.loads += 1;
        a.loaded = true;
    });
}

/// An app left the cache: its pooled instances go with its state, never terminated.
pub fn app_evicted(app: &str, capacity: bool) {
    with(|t| {
        let a = t.apps.entry(app.to_string()).or_default();
        if capacity {
            a.capacity_evictions += 1;
        } else {
            a.evictions += 1;
        }
        a.loaded = false;
        a.dropped += a.instances_alive;
        a.instances_alive = 0;
        for (owner, dropped) in t.handles.values_mut() {
            if owner == app {
                *dropped = true;
            }
        }
    });
}

/// A spawn_worker RPC is about to be sent for `app`; returns the app's generation (one per
/// load), which names the app state the instance will belong to.
pub fn spawn_attempt(app: &str) -> u64 {
    with(|t| {
        let a = t.apps.entry(app.to_string()).or_default();
        a.spawns += 1;
        a.evictions + a.capacity_evictions
    })
}

/// The runtime answered a spawn with `handle`. If the app state it was spawned for has been
/// evicted meanwhile, the instance goes into that state's pool and is lost with it.
pub fn spawned(app: &str, handle: &str, generation: u64) {
    with(|t| {
        let a = t.apps.entry(app.to_string()).or_default();
        let dropped = a.evictions + a.capacity_evictions != generation;
        if dropped {
            a.dropped += 1;
        } else {
            a.instances_alive += 1;
        }
        t.handles
            .insert(handle.to_string(), (app.to_string(), dropped));
    });
}

/// A terminate RPC for `handle` is about to be sent. An instance dropped with its evicted app
/// and terminated after all was not lost: it counts as terminated, no longer as dropped.
pub fn terminated(handle: &str) {
    with(|t| {
        if let Some(a) = leave(t, handle) {
            a.terminations += 1;
        }
    });
}

/// The proxy let an instance go after a failed fetch: neither pooled nor terminated.
pub fn discarded(handle: &str) {
    with(|t| {
        if let Some(a) = leave(t, handle) {
            a.discarded += 1;
        }
    });
}

/// A known instance leaves its app's live (or dropped) ones; returns its app.
fn leave<'a>(t: &'a mut Truth, handle: &str) -> Option<&'a mut AppTruth> {
    let (app, dropped) = t.handles.remove(handle)?;
    let a = t.apps.entry(app).or_default();
    if dropped {
        a.dropped = a.dropped.saturating_sub(1);
    } else {
        a.instances_alive = a.instances_alive.saturating_sub(1);
    }
    Some(a)
}

/// A request is answered (recorded before its response goes out). `app` is "" when the
/// request never got to an app (no route); `start`: "cold", "warm" or neither (no instance).
pub fn answered(app: &str, outcome: &str, start: Option<&str>) {
    with(|t| {
        let a = t.apps.entry(app.to_string()).or_default();
        *a.outcomes.entry(outcome.to_string()).or_default() += 1;
        match start {
            Some("cold") => a.cold += 1,
            Some(_) => a.warm += 1,
            None => {}
        }
    });
}

/// How many times `app` has been loaded.
pub fn loads(app: &str) -> u64 {
    with(|t| t.apps.get(app).map_or(0, |a| a.loads))
}

/// A request finds its app gone although it was loaded for it (see `apps_evicted_before_use`).
pub fn evicted_before_use() {
    with(|t| t.apps_evicted_before_use += 1);
}

pub fn request(app: &str) {
    with(|t| t.apps.entry(app.to_string()).or_default().requests += 1);
}

pub fn snapshot() -> Truth {
    with(|t| {
        let mut s = t.clone();
        s.apps_loaded = s.apps.values().filter(|a| a.loaded).count() as u64;
        s
    })
}
