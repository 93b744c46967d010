//! The observer's model of the proxy, built from probe events: which apps are loaded, which
//! worker handle belongs to which app, how many instances each app has.
//!
//! The handle -> app pairing is the subtle part. A `spawn_worker` request carries the app id,
//! the worker handle only comes back in its response, and the first `fetch` on that handle is
//! the first place the handle shows up on the request side. Both calls come from the same
//! request future: the spawn is sent on `client` (a local of the inlined `get_instance`, kept in
//! the future's state across the await) and the fetch on `instance.client` (a local of
//! `handle_request`, same future). Their addresses differ by a constant of the compiled
//! future's layout, so a new handle's fetch is paired with the pending spawn whose client sits
//! at that distance. The distance is learned from the first lone cold start (one spawn pending),
//! or, under concurrent cold starts, as the one distance that recurs across the waiting fetches;
//! then it pairs exactly. Fetches that cannot be paired yet wait until it is known.

use crate::decode::{app_label, Bytes, Decoded, Refused};
use observer_common::{HandleKey, HANDLE_KEY_LEN, MAX_APP_SLOTS};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Label of the shared series for apps past the label cap and for refused app ids.
pub const OTHER: &str = "other";

#[derive(Debug, Clone)]
pub struct Config {
    /// Distinct app labels before new apps go to `other`.
    pub max_apps: usize,
    /// A spawn with no fetch after this long failed; a fetch unpaired this long is unattributed.
    pub pending_ttl_ns: u64,
    /// Largest distance between the spawn's and the fetch's client within one request future.
    pub max_pair_distance: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_apps: 1000,
            pending_ttl_ns: 60_000_000_000,
            max_pair_distance: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppStats {
    pub slot: u32,
    pub loaded: bool,
    /// CLOCK_MONOTONIC nanoseconds of the last load.
    pub loaded_at_ns: u64,
    pub loads: u64,
    /// Removed from the app cache because the app changed or was deleted.
    pub evictions: u64,
    /// Dropped by the app cache to make room (least recently used, past its capacity).
    pub capacity_evictions: u64,
    pub spawns: u64,
    pub terminations: u64,
    /// Instances that left with their evicted app state, counted then. One may still end after
    /// all (`dropped_ended`): counting it out here instead would step a counter back, which
    /// Prometheus reads as a reset.
    pub dropped: u64,
    /// Of `dropped`, the instances that ended after all: terminated (from the terminate queue,
    /// or after a request in flight on them) or discarded after a failed fetch.
    pub dropped_ended: u64,
    pub alive: u64,
    /// Fetches attributed here (the kernel counts the rest in `APP_REQUESTS[slot]`).
    pub requests_user: u64,
    /// Instances let go after a failed fetch (seen with request metrics only).
    pub discarded: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last load or eviction event (a snapshot older than
    /// it says nothing new of whether the app is loaded).
    pub changed_ns: u64,
}

impl AppStats {
    /// Which of the app's successive states (one per load) is current.
    fn generation(&self) -> u64 {
        self.evictions + self.capacity_evictions
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelfCounters {
    pub label_refused: BTreeMap<&'static str, u64>,
    pub label_overflow: u64,
    pub unattributed_requests: u64,
    pub unattributed_terminations: u64,
    pub pairings: u64,
    /// Capacity evictions past the first of one insert (the probe names only the first).
    pub unnamed_capacity_evictions: u64,
    /// Removes from the app cache of an app that was not in it (evicted for capacity between
    /// the proxy's check for a changed app and its remove): not evictions.
    pub removes_not_cached: u64,
    /// Differences between the event-built model and a snapshot of the proxy's memory, by
    /// kind (the snapshot wins): see [`Tracker::merge_snapshot`].
    pub snapshot_corrections: BTreeMap<&'static str, u64>,
}

/// Kinds of [`SelfCounters::snapshot_corrections`].
pub const CORRECTIONS: &[&str] = &[
    "app_loaded",
    "app_not_loaded",
    "instance_adopted",
    "instance_app_changed",
];

/// A change to the kernel's `HANDLE_APP` map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    Insert(HandleKey, u32),
    Remove(HandleKey),
}

/// A worker the observer knows the app of.
#[derive(Debug, Clone)]
struct Worker {
    app: String,
    /// Its app was evicted while it was alive: counted as dropped until (if ever) terminated.
    dropped_at_ns: Option<u64>,
}

#[derive(Debug, Clone)]
struct Pending {
    client: u64,
    app: String,
    /// The app's evictions when the spawn was sent: the app state it was sent for.
    generation: u64,
    ktime_ns: u64,
}

#[derive(Debug, Clone)]
struct Deferred {
    client: u64,
    handle: Bytes,
    ktime_ns: u64,
    /// Distances to the pending spawns when it arrived.
    votes: Vec<i64>,
    /// The worker left (terminated or discarded) while this, its latest fetch, waited: it
    /// leaves once paired, so that it is not counted alive for ever.
    left: Option<Leaving>,
    /// It waited to be paired (was deferred at least once).
    waited: bool,
}

/// How a worker left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    Terminated,
    Discarded,
}

#[derive(Debug, Default)]
pub struct Tracker {
    cfg: Config,
    pub apps: BTreeMap<String, AppStats>,
    app_cache: Option<u64>,
    other_caches: BTreeSet<u64>,
    handles: HashMap<Bytes, Worker>,
    /// The dropped workers among `handles`, oldest first (entries of workers that left since
    /// are skipped): at most `MAX_DROPPED` are kept, so that a target churning through app
    /// ids cannot grow the observer.
    dropped_order: VecDeque<(u64, Bytes)>,
    pending: Vec<Pending>,
    deltas: BTreeSet<i64>,
    deferred: Vec<Deferred>,
    /// Workers paired with their app only after their fetch waited (`take_paired_late`), for
    /// the request joins: requests on them named no app when their fetch was sent.
    paired_late: Vec<(Bytes, String)>,
    unclassified_removes: VecDeque<(u64, Bytes)>,
    /// Workers seen leaving (terminated or discarded, known or not), when: a snapshot read
    /// before that must not bring them back. Bounded by `MAX_LEFT`, oldest forgotten first.
    left: HashMap<Bytes, u64>,
    left_order: VecDeque<Bytes>,
    next_slot: u32,
    /// Slot -> label (slot 0: `other`).
    slot_names: Vec<String>,
    pub counters: SelfCounters,
    ops: Vec<MapOp>,
}

const MAX_UNCLASSIFIED: usize = 1024;
/// Workers remembered as gone (a snapshot is merged within a second of its walk: thousands of
/// terminations a second are remembered long enough).
const MAX_LEFT: usize = 16384;
/// Dropped workers remembered (to count them as dropped and ended if they are terminated after
/// all); the oldest are forgotten past it.
const MAX_DROPPED: usize = 8192;

pub fn handle_key(h: &Bytes) -> Option<HandleKey> {
    if h.data.is_empty() || h.data.len() > HANDLE_KEY_LEN || h.full_len as usize != h.data.len() {
        return None;
    }
    let mut key = HandleKey {
        bytes: [0; HANDLE_KEY_LEN],
    };
    key.bytes[..h.data.len()].copy_from_slice(&h.data);
    Some(key)
}

impl Tracker {
    pub fn new(mut cfg: Config) -> Self {
        cfg.max_apps = cfg.max_apps.min(MAX_APP_SLOTS as usize - 1);
        let mut t = Tracker {
            cfg,
            next_slot: 1,
            ..Default::default()
        };
        t.apps.insert(OTHER.to_string(), AppStats::default());
        t.slot_names.push(OTHER.to_string());
        t
    }

    /// Changes to apply to the kernel's handle map, in order.
    pub fn take_map_ops(&mut self) -> Vec<MapOp> {
        std::mem::take(&mut self.ops)
    }

    pub fn pending_spawns(&self) -> usize {
        self.pending.len()
    }

    pub fn deferred_fetches(&self) -> usize {
        self.deferred.len()
    }

    /// Whether a fetch on this worker waits to be paired with its spawn (its app is not known
    /// yet, but will be once the distance is learnt).
    pub fn awaits_pairing(&self, h: &Bytes) -> bool {
        self.deferred.iter().any(|f| f.handle == *h)
    }

    /// Workers paired with their app after their fetch waited, and the app, since the last
    /// call.
    pub fn take_paired_late(&mut self) -> Vec<(Bytes, String)> {
        std::mem::take(&mut self.paired_late)
    }

    pub fn learned_distances(&self) -> Vec<i64> {
        self.deltas.iter().copied().collect()
    }

    pub fn app_cache(&self) -> Option<u64> {
        self.app_cache
    }

    /// The label of an app id now: its own once seen, `other` if it is refused or past the
    /// cap, `None` if it will get its own label but has none yet (a snapshot newer than the
    /// events: not to be counted under `other` meanwhile).
    pub fn label_now(&self, b: &Bytes) -> Option<String> {
        match app_label(b) {
            Ok(s) if self.apps.contains_key(&s) => Some(s),
            Ok(_) if self.apps.len() - 1 < self.cfg.max_apps => None,
            _ => Some(OTHER.to_string()),
        }
    }

    /// The label an app id already has (after `apply` saw it), else `other`.
    pub fn label_of(&self, b: &Bytes) -> String {
        match app_label(b) {
            Ok(s) if self.apps.contains_key(&s) => s,
            _ => OTHER.to_string(),
        }
    }

    /// The proxy was replaced by a new process: its app cache and workers are gone with it.
    /// Apps are no longer loaded and have no instances; counters, labels and slots stay (they
    /// continue over the proxy's restarts), and the kernel forgets the old workers' handles.
    pub fn target_restarted(&mut self) {
        self.dropped_order.clear();
        for h in std::mem::take(&mut self.handles).into_keys() {
            if let Some(k) = handle_key(&h) {
                self.ops.push(MapOp::Remove(k));
            }
        }
        for a in self.apps.values_mut() {
            a.loaded = false;
            a.alive = 0;
        }
        self.app_cache = None;
        self.other_caches.clear();
        self.pending.clear();
        self.deltas.clear();
        self.deferred.clear();
        self.paired_late.clear();
        self.unclassified_removes.clear();
    }

    fn note_left(&mut self, handle: &Bytes, ktime_ns: u64) {
        if self.left.insert(handle.clone(), ktime_ns).is_none() {
            self.left_order.push_back(handle.clone());
            if self.left_order.len() > MAX_LEFT {
                if let Some(old) = self.left_order.pop_front() {
                    self.left.remove(&old);
                }
            }
        }
    }

    /// Merges what a snapshot of the proxy's memory says (its walk began at `taken_ns`,
    /// CLOCK_MONOTONIC, and every event up to its end has been applied): the snapshot wins
    /// where it is newer than the events. Apps in the app cache are loaded (an app loaded
    /// before the attach has no load time: `loaded_at_ns` 0); apps out of it are not; every
    /// pooled instance the model does not know is adopted (its app, into the kernel's handle
    /// map, counted alive), unless it was seen leaving after the walk began. Each difference
    /// is counted in `snapshot_corrections`. Instances the model holds and the pools do not
    /// are not differences: they are in use by a request, or on their way to termination.
    pub fn merge_snapshot(&mut self, snap: &crate::snapshot::Snapshot, taken_ns: u64) {
        if self.app_cache.is_none() && snap.app_cache != 0 {
            self.app_cache = Some(snap.app_cache);
            self.other_caches.remove(&snap.app_cache);
        }
        let correct = |c: &mut SelfCounters, kind: &'static str| {
            *c.snapshot_corrections.entry(kind).or_default() += 1;
        };
        let mut cached = BTreeSet::new();
        for entry in &snap.apps {
            let id = Bytes::new(&entry.id);
            let label = self.label_quietly(&id);
            cached.insert(label.clone());
            if label == OTHER {
                continue;
            }
            let a = self.app(&label);
            let slot = a.slot;
            if !a.loaded && a.changed_ns < taken_ns {
                a.loaded = true;
                a.loaded_at_ns = 0;
                correct(&mut self.counters, "app_loaded");
            }
            for inst in &entry.instances {
                let h = Bytes::new(&inst.handle);
                if self.left.get(&h).is_some_and(|t| *t >= taken_ns) {
                    continue;
                }
                match self.handles.get_mut(&h) {
                    Some(w) if w.app == label => {}
                    Some(w) => {
                        // The model paired it with another app: the proxy's pool says whose
                        // it is.
                        let old = std::mem::replace(&mut w.app, label.clone());
                        let dropped = w.dropped_at_ns.take().is_some();
                        if let Some(o) = self.apps.get_mut(&old) {
                            if !dropped {
                                o.alive = o.alive.saturating_sub(1);
                            }
                        }
                        self.app(&label).alive += 1;
                        if let Some(k) = handle_key(&h) {
                            self.ops.push(MapOp::Insert(k, slot));
                        }
                        correct(&mut self.counters, "instance_app_changed");
                    }
                    None => {
                        if let Some(k) = handle_key(&h) {
                            self.ops.push(MapOp::Insert(k, slot));
                        }
                        self.handles.insert(
                            h,
                            Worker {
                                app: label.clone(),
                                dropped_at_ns: None,
                            },
                        );
                        self.app(&label).alive += 1;
                        correct(&mut self.counters, "instance_adopted");
                    }
                }
            }
        }
        for (label, a) in self.apps.iter_mut() {
            if label != OTHER && a.loaded && !cached.contains(label) && a.changed_ns < taken_ns {
                a.loaded = false;
                correct(&mut self.counters, "app_not_loaded");
            }
        }
    }

    /// The app of a kernel app slot (`APP_REQUESTS` index).
    pub fn app_of_slot(&self, slot: u32) -> Option<&str> {
        self.slot_names.get(slot as usize).map(String::as_str)
    }

    /// The proxy let the worker go after a failed fetch: neither pooled nor terminated.
    pub fn discard(&mut self, handle: &Bytes, ktime_ns: u64) {
        self.note_left(handle, ktime_ns);
        if let Some(a) = self.leave(handle) {
            a.discarded += 1;
        } else {
            self.leaves_once_paired(handle, Leaving::Discarded);
        }
    }

    /// A worker not known yet leaves: if its fetch waits to be paired, it leaves once paired
    /// (marked on its latest waiting fetch: the earlier ones pair first, `retry_deferred`
    /// goes by time). Returns whether one waits.
    fn leaves_once_paired(&mut self, handle: &Bytes, how: Leaving) -> bool {
        match self
            .deferred
            .iter_mut()
            .filter(|f| f.handle == *handle)
            .max_by_key(|f| f.ktime_ns)
        {
            Some(f) => {
                f.left = Some(how);
                true
            }
            None => false,
        }
    }

    /// A worker paired after its fetch waited that left meanwhile leaves now.
    fn settle_leaving(&mut self, handle: &Bytes, how: Leaving) {
        if let Some(a) = self.leave(handle) {
            match how {
                Leaving::Terminated => a.terminations += 1,
                Leaving::Discarded => a.discarded += 1,
            }
        }
    }

    /// A known worker leaves (terminated or discarded): out of its app's instances, or counted
    /// as a dropped one that ended after all if its app was evicted meanwhile (it was not lost:
    /// dropped less dropped-and-ended is independent of how eviction and the worker's end
    /// interleave), and out of the kernel's handle map. Returns its app.
    fn leave(&mut self, handle: &Bytes) -> Option<&mut AppStats> {
        let w = self.handles.remove(handle)?;
        if let Some(k) = handle_key(handle) {
            self.ops.push(MapOp::Remove(k));
        }
        let a = self.app(&w.app);
        if w.dropped_at_ns.is_some() {
            a.dropped_ended += 1;
        } else {
            a.alive = a.alive.saturating_sub(1);
        }
        Some(a)
    }

    /// Whether the worker is one of its app's live instances (paired, not left, not dropped).
    pub fn is_alive(&self, h: &Bytes) -> bool {
        self.handles
            .get(h)
            .is_some_and(|w| w.dropped_at_ns.is_none())
    }

    /// Whether the worker is known (paired, and not left since; alive or dropped).
    pub fn knows(&self, h: &Bytes) -> bool {
        self.handles.contains_key(h)
    }

    /// The app of a worker handle, once paired.
    pub fn app_of_handle(&self, h: &Bytes) -> Option<&str> {
        self.handles.get(h).map(|w| w.app.as_str())
    }

    /// The label of an app a snapshot names: as `label`, but not counted as refused or past
    /// the cap (a snapshot names every cached app again each time; the events count them).
    fn label_quietly(&mut self, b: &Bytes) -> String {
        match app_label(b) {
            Ok(s) if self.apps.contains_key(&s) || self.apps.len() - 1 < self.cfg.max_apps => {
                self.label(b)
            }
            _ => OTHER.to_string(),
        }
    }

    fn label(&mut self, b: &Bytes) -> String {
        match app_label(b) {
            Ok(s) if self.apps.contains_key(&s) => s,
            Ok(s) if self.apps.len() - 1 < self.cfg.max_apps => {
                let slot = self.next_slot;
                self.next_slot += 1;
                self.slot_names.push(s.clone());
                self.apps.insert(
                    s.clone(),
                    AppStats {
                        slot,
                        ..Default::default()
                    },
                );
                s
            }
            Ok(_) => {
                self.counters.label_overflow += 1;
                OTHER.to_string()
            }
            Err(r) => {
                *self
                    .counters
                    .label_refused
                    .entry(Refused::as_str(r))
                    .or_default() += 1;
                OTHER.to_string()
            }
        }
    }

    fn app(&mut self, label: &str) -> &mut AppStats {
        self.apps
            .get_mut(label)
            .expect("labels are created by label()")
    }

    pub fn apply(&mut self, ev: Decoded) {
        match ev {
            Decoded::CacheInsert {
                cache,
                key,
                fresh_arc,
                evicts,
                evicted,
                ktime_ns,
            } => {
                let is_app_cache = match self.app_cache {
                    Some(c) => c == cache,
                    None => fresh_arc && !self.other_caches.contains(&cache),
                };
                if !is_app_cache {
                    self.other_caches.insert(cache);
                    self.unclassified_removes.retain(|(c, _)| *c != cache);
                    return;
                }
                if self.app_cache.is_none() {
                    self.app_cache = Some(cache);
                    let replay: Vec<Bytes> = self
                        .unclassified_removes
                        .iter()
                        .filter(|(c, _)| *c == cache)
                        .map(|(_, k)| k.clone())
                        .collect();
                    self.unclassified_removes.retain(|(c, _)| *c != cache);
                    for k in replay {
                        self.evict(&k, false, ktime_ns);
                    }
                }
                let label = self.label(&key);
                // Re-inserting a present key only refreshes it; a new key past capacity evicts.
                if !self.apps.get(&label).is_some_and(|a| a.loaded) || label == OTHER {
                    if let Some(old) = evicted {
                        self.evict(&old, true, ktime_ns);
                        // `evicts` is read from the target's memory while it changes: a torn
                        // read can make it any number (found by the fuzzer), never a panic.
                        self.counters.unnamed_capacity_evictions = self
                            .counters
                            .unnamed_capacity_evictions
                            .saturating_add(evicts.saturating_sub(1));
                    }
                }
                let a = self.app(&label);
                a.loads += 1;
                a.loaded = true;
                a.loaded_at_ns = ktime_ns;
                a.changed_ns = ktime_ns;
            }
            Decoded::CacheRemove {
                cache,
                key,
                ktime_ns,
            } => {
                if self.app_cache == Some(cache) {
                    self.evict(&key, false, ktime_ns);
                } else if !self.other_caches.contains(&cache) {
                    if self.unclassified_removes.len() == MAX_UNCLASSIFIED {
                        self.unclassified_removes.pop_front();
                    }
                    self.unclassified_removes.push_back((cache, key));
                }
            }
            Decoded::Spawn {
                client,
                app,
                ktime_ns,
            } => {
                let label = self.label(&app);
                let a = self.app(&label);
                a.spawns += 1;
                let generation = a.generation();
                self.pending.push(Pending {
                    client,
                    app: label,
                    generation,
                    ktime_ns,
                });
            }
            Decoded::FetchUnknown {
                client,
                handle,
                ktime_ns,
            } => {
                self.fetch_unknown(Deferred {
                    client,
                    handle,
                    ktime_ns,
                    votes: Vec::new(),
                    left: None,
                    waited: false,
                });
            }
            // An instance of an evicted app can still be terminated (it was in the terminate
            // queue, or in flight).
            Decoded::Terminate { handle, ktime_ns } => {
                self.note_left(&handle, ktime_ns);
                if let Some(a) = self.leave(&handle) {
                    a.terminations += 1;
                } else if !self.leaves_once_paired(&handle, Leaving::Terminated) {
                    // (Else its fetch waits for the distance to be learnt, concurrent cold
                    // starts right after the attach: it is terminated once paired.)
                    self.counters.unattributed_terminations += 1;
                }
            }
        }
    }

    fn evict(&mut self, key: &Bytes, capacity: bool, now_ns: u64) {
        let label = self.label(key);
        let a = self.app(&label);
        // The probe sees `remove` called, not whether the key was there. An app seen loaded
        // and since evicted is not: the proxy's changed-app check (rusty-workers-proxy
        // `apps_gc`) lists the cache, then awaits the database for each app before removing
        // it, and a capacity eviction can come in between. (An app loaded before the attach
        // has no loads here: its remove counts.)
        if !capacity && label != OTHER && !a.loaded && a.loads > 0 {
            self.counters.removes_not_cached += 1;
            return;
        }
        if capacity {
            a.capacity_evictions += 1;
        } else {
            a.evictions += 1;
        }
        a.loaded = false;
        a.changed_ns = now_ns;
        a.dropped += a.alive;
        a.alive = 0;
        // The app's state goes, its pool of instances with it: they will not be terminated,
        // unless one was already on its way out. Requests still in flight on them stay this
        // app's (the kernel keeps their handles).
        for (h, w) in self.handles.iter_mut() {
            if w.app == label && w.dropped_at_ns.is_none() {
                w.dropped_at_ns = Some(now_ns);
                self.dropped_order.push_back((now_ns, h.clone()));
            }
        }
    }

    /// Attributes a fetch on a handle the kernel did not know, now or once it can be paired.
    fn fetch_unknown(&mut self, mut f: Deferred) {
        if let Some(w) = self.handles.get(&f.handle) {
            // The kernel looked the handle up before userspace had added it.
            let label = w.app.clone();
            self.app(&label).requests_user += 1;
            if f.waited {
                self.paired_late.push((f.handle.clone(), label));
            }
            if let Some(how) = f.left {
                self.settle_leaving(&f.handle, how);
            }
            return;
        }
        let known = self.deltas.len();
        match self.pair(&f) {
            Some(spawn) => {
                self.counters.pairings += 1;
                let a = self.app(&spawn.app);
                // Spawned for an app state evicted since: the worker goes into that state's
                // pool and is lost with it, whenever its response came back.
                let dropped = a.generation() != spawn.generation;
                if dropped {
                    a.dropped += 1;
                } else {
                    a.alive += 1;
                }
                a.requests_user += 1;
                let slot = a.slot;
                if let Some(k) = handle_key(&f.handle) {
                    self.ops.push(MapOp::Insert(k, slot));
                }
                if dropped {
                    self.dropped_order.push_back((f.ktime_ns, f.handle.clone()));
                }
                if f.waited {
                    // It waited: requests on it could not be named when they were sent.
                    self.paired_late.push((f.handle.clone(), spawn.app.clone()));
                }
                let (handle, left) = (f.handle.clone(), f.left);
                self.handles.insert(
                    f.handle,
                    Worker {
                        app: spawn.app,
                        dropped_at_ns: dropped.then_some(f.ktime_ns),
                    },
                );
                if let Some(how) = left {
                    self.settle_leaving(&handle, how);
                }
                // A lone cold start just taught the distance: the fetches waiting for it pair now.
                if self.deltas.len() > known {
                    self.retry_deferred();
                }
            }
            None if self.pending.is_empty() => {
                self.counters.unattributed_requests += 1;
                if f.left == Some(Leaving::Terminated) {
                    self.counters.unattributed_terminations += 1;
                }
            }
            None => {
                f.votes = self.candidates(&f).into_iter().map(|(_, d)| d).collect();
                f.waited = true;
                self.deferred.push(f);
                if self.learn_from_votes() {
                    self.retry_deferred();
                }
            }
        }
    }

    /// Pending spawns that could have made this fetch's worker: sent before it, from a client
    /// within one future's reach. (index, distance)
    fn candidates(&self, f: &Deferred) -> Vec<(usize, i64)> {
        self.pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.ktime_ns <= f.ktime_ns)
            .map(|(i, p)| (i, f.client.wrapping_sub(p.client) as i64))
            .filter(|(_, d)| d.unsigned_abs() <= self.cfg.max_pair_distance)
            .collect()
    }

    fn pair(&mut self, f: &Deferred) -> Option<Pending> {
        let near = self.candidates(f);
        // At a known distance, the latest spawn there is this request's: an older one at the
        // same address belonged to an earlier request whose memory this one reuses.
        let exact = near
            .iter()
            .filter(|(_, d)| self.deltas.contains(d))
            .max_by_key(|(i, _)| self.pending[*i].ktime_ns);
        let index = match (exact, near.as_slice()) {
            (Some((i, _)), _) => *i,
            // Before any distance is known, a lone candidate teaches it.
            (None, [(i, d)]) if self.deltas.is_empty() => {
                self.deltas.insert(*d);
                *i
            }
            _ => return None,
        };
        Some(self.pending.remove(index))
    }

    /// Concurrent cold starts: each waiting fetch has several candidate distances, but only the
    /// true one recurs across them. Learns it once it has at least two votes and no tie.
    fn learn_from_votes(&mut self) -> bool {
        let mut tally: BTreeMap<i64, usize> = BTreeMap::new();
        for f in &self.deferred {
            for d in f.votes.iter().collect::<BTreeSet<_>>() {
                *tally.entry(*d).or_default() += 1;
            }
        }
        let mut best: Vec<(i64, usize)> = tally.into_iter().collect();
        best.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        match best.as_slice() {
            [(d, n), rest @ ..] if *n >= 2 && rest.first().is_none_or(|(_, m)| m < n) => {
                self.deltas.insert(*d)
            }
            _ => false,
        }
    }

    fn retry_deferred(&mut self) {
        let mut waiting = std::mem::take(&mut self.deferred);
        waiting.sort_by_key(|f| f.ktime_ns);
        for f in waiting {
            self.fetch_unknown(f);
        }
    }

    /// Ages out spawns that never got a fetch, fetches that never got a pairing, and workers of
    /// evicted apps that were never terminated (leaked in their runtime; no request reaches them).
    pub fn housekeeping(&mut self, now_ns: u64) {
        let ttl = self.cfg.pending_ttl_ns;
        while let Some((t, _)) = self.dropped_order.front() {
            if self.dropped_order.len() <= MAX_DROPPED && now_ns.saturating_sub(*t) < 10 * ttl {
                break;
            }
            let (t, h) = self.dropped_order.pop_front().expect("a front");
            // Still the same dropped worker (not terminated since, its handle not reused).
            if self
                .handles
                .get(&h)
                .is_some_and(|w| w.dropped_at_ns == Some(t))
            {
                self.handles.remove(&h);
                if let Some(k) = handle_key(&h) {
                    self.ops.push(MapOp::Remove(k));
                }
            }
        }
        self.pending
            .retain(|p| now_ns.saturating_sub(p.ktime_ns) < ttl);
        let (keep, mut gone): (Vec<Deferred>, Vec<Deferred>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|f| now_ns.saturating_sub(f.ktime_ns) < ttl);
        self.deferred = keep;
        if !self.deferred.is_empty() && self.pending.is_empty() {
            gone.append(&mut self.deferred);
        }
        for f in gone {
            self.counters.unattributed_requests += 1;
            if f.left == Some(Leaving::Terminated) {
                self.counters.unattributed_terminations += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::new(s)
    }
    fn insert(cache: u64, app: &str, fresh: bool) -> Decoded {
        Decoded::CacheInsert {
            cache,
            key: b(app),
            fresh_arc: fresh,
            evicts: 0,
            evicted: None,
            ktime_ns: 1,
        }
    }
    fn insert_evicting(cache: u64, app: &str, old: &str) -> Decoded {
        Decoded::CacheInsert {
            cache,
            key: b(app),
            fresh_arc: true,
            evicts: 1,
            evicted: Some(b(old)),
            ktime_ns: 1,
        }
    }
    fn remove(cache: u64, app: &str) -> Decoded {
        Decoded::CacheRemove {
            cache,
            key: b(app),
            ktime_ns: 2,
        }
    }
    fn spawn(client: u64, app: &str) -> Decoded {
        Decoded::Spawn {
            client,
            app: b(app),
            ktime_ns: 3,
        }
    }
    fn fetch(client: u64, h: &str) -> Decoded {
        Decoded::FetchUnknown {
            client,
            handle: b(h),
            ktime_ns: 4,
        }
    }
    fn term(h: &str) -> Decoded {
        Decoded::Terminate {
            handle: b(h),
            ktime_ns: 5,
        }
    }

    fn run(events: Vec<Decoded>) -> Tracker {
        let mut t = Tracker::new(Config::default());
        for e in events {
            t.apply(e);
        }
        t
    }

    #[test]
    fn app_cache_is_told_from_route_cache_by_its_value() {
        let t = run(vec![
            insert(0xA00, "example.com", false), // route cache first: its value is no fresh Arc
            remove(0xB00, "app1"),               // unknown cache yet: held back
            insert(0xB00, "app1", true),
            insert(0xB00, "app2", true),
            remove(0xA00, "example.com"),
            remove(0xB00, "app2"),
        ]);
        assert_eq!(t.app_cache(), Some(0xB00));
        let a1 = &t.apps["app1"];
        assert_eq!((a1.loads, a1.evictions, a1.loaded), (1, 1, true));
        let a2 = &t.apps["app2"];
        assert_eq!((a2.loads, a2.evictions, a2.loaded), (1, 1, false));
        assert!(!t.apps.contains_key("example.com"));
    }

    #[test]
    fn a_torn_eviction_count_does_not_overflow() {
        let torn = |app: &str, old: &str| Decoded::CacheInsert {
            cache: 1,
            key: b(app),
            fresh_arc: true,
            evicts: u64::MAX,
            evicted: Some(b(old)),
            ktime_ns: 1,
        };
        let t = run(vec![
            insert(1, "a", true),
            torn("b", "a"),
            insert(1, "a", true),
            torn("c", "a"),
        ]);
        assert_eq!(t.counters.unnamed_capacity_evictions, u64::MAX);
    }

    #[test]
    fn a_full_app_cache_evicts_its_least_recently_used_app() {
        let t = run(vec![
            insert(0xB00, "app1", true),
            spawn(0x1000, "app1"),
            fetch(0x1100, "h1"),
            insert(0xB00, "app2", true),
            insert_evicting(0xB00, "app3", "app1"),
            insert_evicting(0xA00, "example.org", "example.com"), // the route cache: ignored
        ]);
        let a1 = &t.apps["app1"];
        assert_eq!(
            (a1.loaded, a1.capacity_evictions, a1.evictions, a1.dropped),
            (false, 1, 0, 1)
        );
        assert!(t.apps["app3"].loaded);
        assert!(!t.apps.contains_key("example.com"));
        assert_eq!(t.counters.unnamed_capacity_evictions, 0);
    }

    #[test]
    fn lone_cold_start_pairs_and_teaches_the_distance() {
        let mut t = run(vec![
            insert(0xB00, "app1", true),
            spawn(0x1000, "app1"),
            fetch(0x1100, "h1"),
        ]);
        assert_eq!(t.learned_distances(), vec![0x100]);
        let a = &t.apps["app1"];
        assert_eq!((a.spawns, a.alive, a.requests_user), (1, 1, 1));
        let slot = a.slot;
        assert_eq!(
            t.take_map_ops(),
            vec![MapOp::Insert(handle_key(&b("h1")).unwrap(), slot)]
        );
        t.apply(term("h1"));
        let a = &t.apps["app1"];
        assert_eq!((a.terminations, a.alive), (1, 0));
        assert_eq!(
            t.take_map_ops(),
            vec![MapOp::Remove(handle_key(&b("h1")).unwrap())]
        );
    }

    #[test]
    fn concurrent_cold_starts_wait_for_the_distance_then_pair_exactly() {
        let t = run(vec![
            spawn(0x1000, "app1"),
            spawn(0x5000, "app2"),
            fetch(0x5100, "h2"), // two spawns within reach: ambiguous, deferred
            fetch(0x1100, "h1"), // still ambiguous (0x100 and -0x3f00): deferred
            spawn(0x9000, "app3"),
            spawn(0x20000, "app1"),
            fetch(0x20100, "h3"), // app1's second spawn is alone within reach: learns 0x100
            fetch(0x9100, "h4"),
        ]);
        assert_eq!(t.learned_distances(), vec![0x100]);
        assert_eq!(t.deferred_fetches(), 0);
        assert_eq!(t.pending_spawns(), 0);
        assert_eq!(t.handles[&b("h1")].app, "app1");
        assert_eq!(t.handles[&b("h2")].app, "app2");
        assert_eq!(t.handles[&b("h3")].app, "app1");
        assert_eq!(t.handles[&b("h4")].app, "app3");
        assert_eq!(t.apps["app1"].alive, 2);
    }

    /// Workers that end while their fetch waits for the distance (concurrent cold starts
    /// right after an attach, every instance terminated after its request): they end once
    /// paired, and are not counted alive for ever.
    #[test]
    fn workers_leaving_before_they_are_paired_leave_once_paired() {
        for discarded in [false, true] {
            let mut t = run(vec![
                spawn(0x1000, "app1"),
                spawn(0x5000, "app2"),
                fetch(0x5100, "h2"), // two spawns within reach: waits
            ]);
            // Its worker ends before it is paired: terminated, or let go after a failed fetch.
            if discarded {
                t.discard(&b("h2"), 6);
            } else {
                t.apply(term("h2"));
            }
            assert_eq!(t.deferred_fetches(), 1);
            assert_eq!(
                t.counters.unattributed_terminations, 0,
                "held, not given up"
            );
            t.apply(fetch(0x1100, "h1")); // 0x100 twice: learnt, both pair
            assert_eq!(t.deferred_fetches(), 0);
            let a1 = &t.apps["app1"];
            assert_eq!((a1.spawns, a1.alive), (1, 1));
            let a2 = &t.apps["app2"];
            assert_eq!(
                (a2.spawns, a2.alive, a2.terminations, a2.discarded),
                (1, 0, u64::from(!discarded), u64::from(discarded))
            );
            assert!(!t.handles.contains_key(&b("h2")));
            assert_eq!(
                t.take_paired_late(),
                vec![(b("h2"), "app2".to_string()), (b("h1"), "app1".to_string())],
                "the waiting fetches' workers (h1's waited within its own event), for the joins"
            );
            // In the kernel's map only the worker still alive stays.
            let mut map = BTreeMap::new();
            for op in t.take_map_ops() {
                match op {
                    MapOp::Insert(k, slot) => map.insert(k.bytes, slot),
                    MapOp::Remove(k) => map.remove(&k.bytes),
                };
            }
            assert_eq!(
                map.keys().collect::<Vec<_>>(),
                vec![&handle_key(&b("h1")).unwrap().bytes]
            );
        }
        // One that is never paired is given up with its termination.
        let mut t = run(vec![
            spawn(0x1000, "app1"),
            fetch(0x900000, "far"), // not within reach: waits
            term("far"),
        ]);
        t.housekeeping(4 + Config::default().pending_ttl_ns);
        assert_eq!(
            (
                t.counters.unattributed_requests,
                t.counters.unattributed_terminations
            ),
            (1, 1)
        );
    }

    #[test]
    fn a_reused_future_address_pairs_with_the_spawn_before_the_fetch() {
        let at = |e: Decoded, t: u64| match e {
            Decoded::Spawn { client, app, .. } => Decoded::Spawn {
                client,
                app,
                ktime_ns: t,
            },
            Decoded::FetchUnknown { client, handle, .. } => Decoded::FetchUnknown {
                client,
                handle,
                ktime_ns: t,
            },
            e => e,
        };
        let t = run(vec![
            at(spawn(0x1000, "app1"), 10),
            at(spawn(0x1400, "app3"), 11),
            at(fetch(0x1100, "hA"), 12),   // 0x100 or -0x300: waits
            at(spawn(0x1000, "app2"), 20), // request A is done; B reuses its memory
            at(spawn(0x1900, "app4"), 21),
            at(fetch(0x1100, "hB"), 22), // 0x100 and -0x300 tie: still waits
            at(fetch(0x1500, "hC"), 23), // 0x100 now has three votes: learned
        ]);
        assert_eq!(t.learned_distances(), vec![0x100]);
        assert_eq!(t.handles[&b("hA")].app, "app1");
        assert_eq!(t.handles[&b("hB")].app, "app2");
        assert_eq!(t.handles[&b("hC")].app, "app3");
        assert_eq!(t.pending_spawns(), 1);
    }

    #[test]
    fn eviction_drops_the_apps_instances_unless_terminated_after() {
        let events = vec![
            insert(0xB00, "app1", true),
            spawn(0x1000, "app1"),
            fetch(0x1100, "h1"),
            spawn(0x1000, "app1"),
            fetch(0x1100, "h2"),
            remove(0xB00, "app1"),
            term("h1"),
        ];
        let mut t = run(events.clone());
        let a = &t.apps["app1"];
        // Both went with the evicted state; h1 ended after all. No counter steps back.
        assert_eq!(
            (
                a.alive,
                a.dropped,
                a.dropped_ended,
                a.terminations,
                a.loaded
            ),
            (0, 2, 1, 1, false)
        );
        assert_eq!(t.counters.unattributed_terminations, 0);
        assert_eq!(
            t.take_map_ops()
                .iter()
                .filter(|o| matches!(o, MapOp::Remove(_)))
                .count(),
            1
        );
        // The same events with the termination before the eviction: the same instances lost
        // (dropped less dropped-and-ended), the same terminations.
        let mut swapped = events;
        swapped.swap(5, 6);
        let u = run(swapped);
        let b = &u.apps["app1"];
        assert_eq!(
            (b.alive, b.dropped, b.dropped_ended, b.terminations),
            (0, 1, 0, 1)
        );
        // A dropped worker no request reaches is forgotten after a while.
        t.housekeeping(2 + 10 * Config::default().pending_ttl_ns);
        assert!(t.handles.is_empty());
        assert_eq!(t.take_map_ops().len(), 1);
    }

    #[test]
    fn a_remove_of_an_app_no_longer_cached_is_no_eviction() {
        let t = run(vec![
            insert(0xB00, "app1", true),
            insert_evicting(0xB00, "app2", "app1"),
            // The changed-app check listed app1 before its capacity eviction.
            remove(0xB00, "app1"),
            // An app loaded before the attach: its remove is an eviction.
            remove(0xB00, "app0"),
        ]);
        let a1 = &t.apps["app1"];
        assert_eq!((a1.capacity_evictions, a1.evictions), (1, 0));
        assert_eq!(t.apps["app0"].evictions, 1);
        assert_eq!(t.counters.removes_not_cached, 1);
    }

    #[test]
    fn dropped_workers_are_remembered_up_to_a_cap() {
        // App ids churning through the cache, each leaving a dropped worker behind (as 100,000
        // apps passing through a 1,000-app cache do): the oldest are forgotten past the cap,
        // not kept for their ten minutes.
        let mut t = Tracker::new(Config::default());
        let n = MAX_DROPPED + 500;
        for i in 0..n {
            let (app, h) = (format!("a{i}"), format!("h{i}"));
            t.apply(insert(0xB00, &app, true));
            t.apply(spawn(0x1000, &app));
            t.apply(fetch(0x1100, &h));
            t.apply(remove(0xB00, &app));
        }
        assert_eq!(t.handles.len(), n);
        t.housekeeping(10);
        assert_eq!(t.handles.len(), MAX_DROPPED);
        // The youngest are the ones kept: a late termination of one still counts.
        assert!(t.handles.contains_key(&b(&format!("h{}", n - 1))));
        assert!(!t.handles.contains_key(&b("h0")));
        let removes = t
            .take_map_ops()
            .iter()
            .filter(|o| matches!(o, MapOp::Remove(_)))
            .count();
        assert_eq!(removes, 500);
        t.apply(term("h0"));
        assert_eq!(t.counters.unattributed_terminations, 1);
    }

    #[test]
    fn a_lone_cold_start_releases_the_fetches_waiting_for_the_distance() {
        let t = run(vec![
            spawn(0x1000, "app1"),
            spawn(0x5000, "app2"),
            fetch(0x1100, "h1"), // two candidates, no votes yet: waits
            spawn(0x40000, "app3"),
            fetch(0x40100, "h3"), // alone within reach: teaches 0x100
        ]);
        assert_eq!(t.deferred_fetches(), 0);
        assert_eq!(t.handles[&b("h1")].app, "app1");
        assert_eq!(t.handles[&b("h3")].app, "app3");
        assert_eq!(t.pending_spawns(), 1);
    }

    #[test]
    fn a_worker_spawned_for_an_evicted_app_state_is_dropped_with_it() {
        let t = run(vec![
            insert(0xB00, "app1", true),
            spawn(0x1000, "app1"),
            remove(0xB00, "app1"), // evicted while the spawn is in flight
            fetch(0x1100, "h1"),
        ]);
        let a = &t.apps["app1"];
        assert_eq!(
            (a.spawns, a.alive, a.dropped, a.requests_user),
            (1, 0, 1, 1)
        );
    }

    #[test]
    fn unknown_handles_without_spawns_are_unattributed() {
        let mut t = run(vec![fetch(0x1100, "old"), term("old")]);
        assert_eq!(t.counters.unattributed_requests, 1);
        assert_eq!(t.counters.unattributed_terminations, 1);
        t.apply(spawn(0x1000, "app1"));
        t.apply(fetch(0x900000, "far")); // a spawn pending, but not within reach: waits
        assert_eq!(t.deferred_fetches(), 1);
        t.housekeeping(4 + Config::default().pending_ttl_ns);
        assert_eq!(t.deferred_fetches(), 0);
        assert_eq!(t.counters.unattributed_requests, 2);
    }

    #[test]
    fn labels_are_capped_and_refused_ones_go_to_other() {
        let mut t = Tracker::new(Config {
            max_apps: 2,
            ..Config::default()
        });
        for app in ["a", "b", "c", "d\"x"] {
            t.apply(insert(0xB00, app, true));
        }
        assert_eq!(t.apps.len(), 3, "{:?}", t.apps.keys().collect::<Vec<_>>());
        assert_eq!(t.apps[OTHER].loads, 2);
        assert_eq!(t.counters.label_overflow, 1);
        assert_eq!(t.counters.label_refused["bad_char"], 1);
        let slots: BTreeSet<u32> = t.apps.values().map(|a| a.slot).collect();
        assert_eq!(slots, BTreeSet::from([0, 1, 2]));
    }

    fn snap(apps: &[(&str, &[&str])]) -> crate::snapshot::Snapshot {
        use crate::snapshot::{AppEntry, PooledInstance, Snapshot};
        Snapshot {
            app_cache: 0xc0,
            apps: apps
                .iter()
                .map(|(id, pool)| AppEntry {
                    id: id.to_string(),
                    ready: Some(pool.len() as u64),
                    instances: pool
                        .iter()
                        .map(|h| PooledInstance {
                            handle: h.to_string(),
                            runtime_id: "r".repeat(32),
                        })
                        .collect(),
                })
                .collect(),
            runtimes: None,
            instances_complete: true,
        }
    }

    /// (name, events before, snapshot (walk began at 10), events after, expected:
    /// app -> (loaded, alive, loaded_at known), corrections, handles in the kernel map)
    type MergeCase = (
        &'static str,
        Vec<Decoded>,
        Vec<(&'static str, &'static [&'static str])>,
        Vec<Decoded>,
        Vec<(&'static str, bool, u64, bool)>,
        Vec<(&'static str, u64)>,
    );

    #[test]
    fn snapshots_seed_and_correct_the_model() {
        let late = |h: &str| Decoded::Terminate {
            handle: b(h),
            ktime_ns: 20,
        };
        let cases: Vec<MergeCase> = vec![
            (
                "attached late: apps loaded and pooled instances adopted",
                vec![],
                vec![("a", &["h1", "h2"]), ("b", &[])],
                vec![],
                vec![("a", true, 2, false), ("b", true, 0, false)],
                vec![("app_loaded", 2), ("instance_adopted", 2)],
            ),
            (
                "an adopted instance terminated later leaves as any other",
                vec![],
                vec![("a", &["h1", "h2"])],
                vec![term("h1")],
                vec![("a", true, 1, false)],
                vec![("app_loaded", 1), ("instance_adopted", 2)],
            ),
            (
                "an instance seen leaving after the walk began is not brought back",
                vec![late("h1")],
                vec![("a", &["h1", "h2"])],
                vec![],
                vec![("a", true, 1, false)],
                vec![("app_loaded", 1), ("instance_adopted", 1)],
            ),
            (
                "events first: a known app and worker are no differences",
                vec![insert(0xc0, "a", true), spawn(7, "a"), fetch(7, "h1")],
                vec![("a", &["h1"])],
                vec![],
                vec![("a", true, 1, true)],
                vec![],
            ),
        ];
        for (name, before, apps, after, want, corrections) in cases {
            let mut t = run(before);
            t.merge_snapshot(&snap(&apps), 10);
            for ev in after {
                t.apply(ev);
            }
            for (app, loaded, alive, load_time) in want {
                let a = &t.apps[app];
                assert_eq!(
                    (a.loaded, a.alive, a.loaded_at_ns != 0),
                    (loaded, alive, load_time),
                    "{name}: {app}"
                );
            }
            let got: Vec<(&str, u64)> = t
                .counters
                .snapshot_corrections
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect();
            assert_eq!(got, corrections, "{name}: corrections");
            assert_eq!(t.app_cache(), Some(0xc0), "{name}: the app cache is known");
        }
    }

    #[test]
    fn the_snapshot_wins_over_a_model_that_missed_an_eviction() {
        let mut t = run(vec![insert(0xc0, "a", true), insert(0xc0, "b", true)]);
        // The walk began after the loads (ktime 1): b is gone from the cache.
        t.merge_snapshot(&snap(&[("a", &[])]), 10);
        assert!(t.apps["a"].loaded && !t.apps["b"].loaded);
        assert_eq!(
            t.counters.snapshot_corrections.get("app_not_loaded"),
            Some(&1)
        );
        // A walk that began before an event says nothing against it.
        let mut t = run(vec![insert(0xc0, "a", true)]);
        t.merge_snapshot(&snap(&[]), 0);
        assert!(t.apps["a"].loaded, "a snapshot older than the load");
        // Adopted workers reach the kernel's handle map with their app's slot.
        let mut t = Tracker::new(Config::default());
        t.merge_snapshot(&snap(&[("a", &["h1"])]), 10);
        let slot = t.apps["a"].slot;
        assert_eq!(
            t.take_map_ops(),
            vec![MapOp::Insert(handle_key(&b("h1")).unwrap(), slot)]
        );
    }
}
