//! The proxy's scheduler state read from its memory, py-spy style: which apps are in its app
//! cache and which instances wait in each app's ready pool, exact from the first scrape of an
//! observer attached to a proxy that has run for days (events only say what happens after).
//!
//! Upstream rusty-workers keeps its whole state under one static
//! (`rusty-workers-proxy/src/main.rs`: `static SCHEDULER: OnceCell<Arc<sched::Scheduler>>`,
//! `sched.rs`: `Scheduler { clients: RwLock<BTreeMap<RuntimeId, RtState>>, apps:
//! Mutex<LruCache<AppId, Arc<AppState>>>, .. }`, `AppState { id, ready_instances:
//! Mutex<VecDeque<ReadyInstance>>, .. }`, `ReadyInstance { rtid, last_active, handle, client }`).
//! The release binary has no debug info, so two kinds of layout meet here:
//! - std and crate types (`String`, `VecDeque`, `BTreeMap` nodes, `Arc`, `OnceCell`,
//!   `LruCache`): fixed for one rustc and crate version, in [`StateLayout`], checked against
//!   values built by this compiler (`observer/tests/layout.rs`) and overridable in the catalog;
//! - the proxy's own structs, whose field order is the compiler's: found by a validated search
//!   from what can be recognised (the app map's keys are strings its values' app states hold,
//!   worker handles and runtime ids are 32 hex digits, a BTreeMap's child nodes point back at
//!   their parent), then kept ([`Learnt`]) or given in the catalog.
//!
//! The target runs while it is read: a read may be torn or see freed memory. Everything
//! followed is validated (alignment, bounds, lengths, shapes, parent links, a node cap, a byte
//! budget); a walk that fails is retried and counted by reason, and a half-read state is never
//! returned.

use crate::memory::{self, Read, ReadError};
use observer_common::Layout;
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// B-tree node capacity of std's `BTreeMap` (`alloc/collections/btree/node.rs`: `B = 6`,
/// `CAPACITY = 2 * B - 1`).
const NODE_CAPACITY: u64 = 11;
/// Deepest B-tree followed: 16 levels hold far more entries than any address space.
const MAX_HEIGHT: u64 = 16;
/// Largest collection length believed (apps, pooled instances, runtimes).
const MAX_LEN: u64 = 1 << 24;
/// Bytes of the scheduler and of an app state searched for their fields.
const SCHED_SCAN: usize = 2048;
const APP_SCAN: usize = 1024;
/// Largest struct of the proxy's own searched: a `ReadyInstance` (for its strings and size) or a
/// map value of unknown size (`RtState`).
const MAX_INSTANCE: u64 = 512;
/// Id shapes: handles and runtime ids are `util::rand_hex(16)` (upstream
/// `rusty-workers/src/types.rs`); app ids are bounded only by this.
const APP_ID_MAX: usize = 64 * 1024;
const HEX_ID_LEN: usize = 32;

/// Byte offsets of the std and crate types the walk follows, as rustc lays them out (checked
/// by `observer/tests/layout.rs` for this compiler; the catalog's `[state]` overrides them for a
/// proxy built by another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLayout {
    /// `once_cell::sync::OnceCell<Arc<T>>`: the `Option<Arc<T>>` word (the other is the state).
    pub once_cell_value: u64,
    /// `ArcInner<T>` (`#[repr(C)]`: strong, weak, data): where the data starts.
    pub arc_data: u64,
    /// `BTreeMap`: the root node pointer, the tree's height and its length.
    pub btree_root: u64,
    pub btree_height: u64,
    pub btree_len: u64,
    /// `LeafNode`'s `parent_idx: u16` and `len: u16`, from the end of its parent, key and
    /// value fields (rustc puts the two counts last; the order of the three is found, see
    /// `NODE_ORDERS`).
    pub node_parent_idx: u64,
    pub node_len: u64,
    /// `VecDeque`: buffer capacity, buffer pointer, head index, length.
    pub deque_cap: u64,
    pub deque_ptr: u64,
    pub deque_head: u64,
    pub deque_len: u64,
    /// `lru_time_cache::LruCache` 0.11: its `map: BTreeMap<K, (V, Instant)>`, its
    /// `list: VecDeque<K>` and its `capacity`.
    pub lru_map: u64,
    pub lru_list: u64,
    pub lru_capacity: u64,
    /// `(Arc<AppState>, Instant)`, the app map's value: where the `Arc` is, and its size.
    pub app_value_arc: u64,
    pub app_value_size: u64,
}

impl StateLayout {
    pub const DEFAULT: StateLayout = StateLayout {
        once_cell_value: 8,
        arc_data: 16,
        btree_root: 0,
        btree_height: 8,
        btree_len: 16,
        node_parent_idx: 0,
        node_len: 2,
        deque_cap: 0,
        deque_ptr: 8,
        deque_head: 16,
        deque_len: 24,
        lru_map: 48,
        lru_list: 0,
        lru_capacity: 72,
        app_value_arc: 0,
        app_value_size: 24,
    };
}

/// Offsets inside the proxy's own structs (the compiler's choice): found by the walk, or given
/// by the catalog. `None`: not known yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Learnt {
    /// `Scheduler.apps`'s `LruCache`, from the scheduler's start.
    pub sched_apps: Option<u64>,
    /// `Scheduler.clients`'s `BTreeMap`, from the scheduler's start.
    pub sched_clients: Option<u64>,
    /// `AppState.id` and `AppState.ready_instances`'s `VecDeque`, from the app state's start.
    pub app_id: Option<u64>,
    pub app_ready: Option<u64>,
    /// `ReadyInstance.handle` and `.rtid` (the strings), and its size.
    pub instance_handle: Option<u64>,
    pub instance_rtid: Option<u64>,
    pub instance_size: Option<u64>,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0} not found in the proxy's memory (another proxy version? the catalog's [state] can give its offsets)")]
    NotFound(&'static str),
    #[error("torn read: {0} changed while it was read")]
    Torn(&'static str),
}

impl SnapshotError {
    /// The self-metric's `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            SnapshotError::Read(ReadError::Fault { .. }) => "fault",
            SnapshotError::Read(ReadError::Budget { .. }) => "budget",
            SnapshotError::Read(ReadError::Invalid { .. }) => "invalid",
            SnapshotError::NotFound(_) => "not_found",
            SnapshotError::Torn(_) => "torn",
        }
    }

    /// Worth another try now: the proxy was changing what was read.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SnapshotError::Read(ReadError::Fault { .. } | ReadError::Invalid { .. })
                | SnapshotError::Torn(_)
        )
    }
}

/// Self-metric reasons, for zero-valued series.
pub const REASONS: &[&str] = &["fault", "budget", "invalid", "not_found", "torn"];

/// An instance waiting in an app's ready pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PooledInstance {
    pub handle: String,
    pub runtime_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppEntry {
    pub id: String,
    /// Instances in its ready pool; `None` while the pool's place is not learnt.
    pub ready: Option<u64>,
    /// The pooled instances, when their layout is learnt (else empty).
    pub instances: Vec<PooledInstance>,
}

/// The scheduler's state at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The app cache's address (the `self` of its `insert`/`remove`); 0 before the scheduler
    /// is set.
    pub app_cache: u64,
    pub apps: Vec<AppEntry>,
    /// Runtime ids of the connected runtimes (`Scheduler.clients`'s keys), if found.
    pub runtimes: Option<Vec<String>>,
    /// Every pooled instance's handle and runtime was read (else only the pools' lengths).
    pub instances_complete: bool,
}

impl Snapshot {
    pub fn ready_total(&self) -> Option<u64> {
        self.apps.iter().map(|a| a.ready).sum()
    }
}

fn invalid(what: &'static str, addr: u64, why: String) -> SnapshotError {
    SnapshotError::Read(ReadError::Invalid { what, addr, why })
}

fn word_at(bytes: &[u8], off: u64) -> Option<u64> {
    let o = usize::try_from(off).ok()?;
    let b = bytes.get(o..o.checked_add(8)?)?;
    Some(u64::from_ne_bytes(b.try_into().ok()?))
}

fn u16_at(bytes: &[u8], off: u64) -> Option<u16> {
    let o = usize::try_from(off).ok()?;
    let b = bytes.get(o..o.checked_add(2)?)?;
    Some(u16::from_ne_bytes(b.try_into().ok()?))
}

/// A pointer the allocator could have returned for a `T` of alignment 8 (user space, aligned).
fn is_heap_ptr(p: u64) -> bool {
    (0x1000..1 << 47).contains(&p) && p.is_multiple_of(8)
}

/// An app id as the proxy can hold one: upstream's are 36-character UUIDs, but the app cache
/// holds whatever id a route named (the observer refuses odd ones as labels, not here), so
/// any non-empty UTF-8 string of at most `APP_ID_MAX` bytes.
pub fn is_app_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= APP_ID_MAX && std::str::from_utf8(b).is_ok()
}

/// 32 lowercase hex digits: a worker handle or a runtime id.
pub fn is_hex_id(b: &[u8]) -> bool {
    b.len() == HEX_ID_LEN
        && b.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// Whether the `String` at an address is one `shape` accepts (of at most `max` bytes).
fn shaped<'a, M: Read>(
    mem: &'a M,
    strings: &'a Layout,
    max: usize,
    shape: fn(&[u8]) -> bool,
) -> impl Fn(u64) -> bool + 'a {
    move |at| memory::string(mem, at, strings, max).is_ok_and(|s| shape(&s))
}

/// Reads `len` bytes at `addr`, fewer if the end is unmapped (a struct near the end of a heap
/// mapping); at least `min`.
fn read_upto(mem: &impl Read, addr: u64, len: usize, min: usize) -> Result<Vec<u8>, SnapshotError> {
    let mut n = len;
    loop {
        let mut buf = vec![0u8; n];
        match mem.read(addr, &mut buf) {
            Ok(()) => return Ok(buf),
            Err(ReadError::Fault { .. }) if n / 2 >= min => n /= 2,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A `VecDeque` header, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deque {
    pub cap: u64,
    pub ptr: u64,
    pub head: u64,
    pub len: u64,
}

impl Deque {
    /// The header at `off` of `bytes`, if it is a plausible one.
    pub fn decode(bytes: &[u8], off: u64, l: &StateLayout) -> Option<Deque> {
        let d = Deque {
            cap: word_at(bytes, off + l.deque_cap)?,
            ptr: word_at(bytes, off + l.deque_ptr)?,
            head: word_at(bytes, off + l.deque_head)?,
            len: word_at(bytes, off + l.deque_len)?,
        };
        let ok = d.len <= d.cap
            && d.cap <= MAX_LEN
            && (d.head < d.cap || (d.cap == 0 && d.head == 0))
            && d.ptr.is_multiple_of(8)
            && d.ptr != 0
            && (d.cap == 0 || is_heap_ptr(d.ptr));
        ok.then_some(d)
    }

    /// The address of element `i` (a ring buffer: physical index `(head + i) % cap`).
    pub fn element(&self, i: u64, size: u64) -> u64 {
        self.ptr + ((self.head + i) % self.cap.max(1)) * size
    }
}

/// A `BTreeMap` header, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapHeader {
    pub root: u64,
    pub height: u64,
    pub len: u64,
}

impl MapHeader {
    pub fn decode(bytes: &[u8], off: u64, l: &StateLayout) -> Option<MapHeader> {
        let m = MapHeader {
            root: word_at(bytes, off + l.btree_root)?,
            height: word_at(bytes, off + l.btree_height)?,
            len: word_at(bytes, off + l.btree_len)?,
        };
        // An empty map has no root (`Option<Root>`'s niche is the null node pointer) or an
        // empty leaf root (after its last remove).
        let ok = m.len <= MAX_LEN
            && m.height <= MAX_HEIGHT
            && if m.root == 0 {
                m.len == 0 && m.height == 0
            } else {
                is_heap_ptr(m.root) && m.len >= m.height
            };
        ok.then_some(m)
    }
}

/// Where a B-tree node's parts are for keys and values of these sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodeShape {
    parent: u64,
    keys: u64,
    vals: u64,
    parent_idx: u64,
    len: u64,
    edges: u64,
}

/// The orders rustc may give `LeafNode`'s three 8-aligned fields (parent, keys, values): its
/// choice depends on their sizes (measured with rustc 1.96: keys first with 24-byte keys and
/// values, values then parent then keys with 16-byte values), so every order is tried.
const NODE_ORDERS: [[u8; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

impl NodeShape {
    /// The fields in `order` (0 parent, 1 keys, 2 values) from the node's start, then the two
    /// `u16` counts; an internal node's edges follow, 8-aligned.
    fn new(key_size: u64, val_size: u64, order: [u8; 3], l: &StateLayout) -> NodeShape {
        let sizes = [8, NODE_CAPACITY * key_size, NODE_CAPACITY * val_size];
        let mut at = [0u64; 3];
        let mut off = 0;
        for f in order {
            at[f as usize] = off;
            off += sizes[f as usize];
        }
        NodeShape {
            parent: at[0],
            keys: at[1],
            vals: at[2],
            parent_idx: off + l.node_parent_idx,
            len: off + l.node_len,
            edges: (off + l.node_len.max(l.node_parent_idx) + 2).next_multiple_of(8),
        }
    }
}

/// Walks a `BTreeMap` with keys of `key_size` bytes: the addresses of its keys, and of its
/// values if `val_size` is known. Every child must point back at its parent at its index, so a
/// torn or freed node fails the walk instead of leading it astray; at most `len` entries.
///
/// The node's shape depends on the key and value sizes and on the compiler: it is found from
/// the root, the first shape (value size, when not given, and order) at which the root's count
/// is plausible, its first key is one `key_ok` accepts, and its first children point back at
/// it. (`Scheduler.clients`'s `RtState` is the proxy's own struct, of unknown size.)
pub fn walk_map(
    mem: &impl Read,
    map: MapHeader,
    key_size: u64,
    val_size: Option<u64>,
    key_ok: impl Fn(u64) -> bool,
    l: &StateLayout,
) -> Result<Vec<(u64, Option<u64>)>, SnapshotError> {
    let mut out = Vec::with_capacity(map.len.min(4096) as usize);
    if map.root == 0 {
        return Ok(out);
    }
    let sh = find_shape(mem, map, key_size, val_size, &key_ok, l)?;
    let mut stack = vec![(map.root, map.height, 0u64, 0u16)];
    let mut nodes = 0u64;
    let node_size = sh.edges as usize;
    while let Some((node, height, parent, idx)) = stack.pop() {
        nodes += 1;
        if nodes > map.len + 1 || !is_heap_ptr(node) {
            return Err(invalid(
                "BTreeMap node",
                node,
                format!("node {nodes} of {} entries", map.len),
            ));
        }
        let b = read_upto(mem, node, node_size, node_size)?;
        let len = u16_at(&b, sh.len).unwrap_or(u16::MAX) as u64;
        let parent_at = word_at(&b, sh.parent).unwrap_or(u64::MAX);
        // A root's `parent_idx` is uninitialised (`MaybeUninit`): checked below the root only.
        if parent_at != parent
            || (parent != 0 && u16_at(&b, sh.parent_idx) != Some(idx))
            || len > NODE_CAPACITY
            || (len == 0 && (parent != 0 || height != 0))
        {
            return Err(invalid(
                "BTreeMap node",
                node,
                format!("parent {parent_at:#x} (want {parent:#x}), len {len}"),
            ));
        }
        for i in 0..len {
            let key = node + sh.keys + i * key_size;
            let val = val_size.map(|v| node + sh.vals + i * v);
            out.push((key, val));
            if out.len() as u64 > map.len {
                return Err(SnapshotError::Torn("BTreeMap"));
            }
        }
        if height == 0 {
            continue;
        }
        let mut kids = vec![0u8; ((len + 1) * 8) as usize];
        mem.read(node + sh.edges, &mut kids)?;
        for i in 0..=len {
            let child = word_at(&kids, i * 8).unwrap_or(0);
            stack.push((child, height - 1, node, i as u16));
        }
    }
    if out.len() as u64 != map.len {
        return Err(SnapshotError::Torn("BTreeMap"));
    }
    Ok(out)
}

/// The node shape of a map (see [`walk_map`]), validated on its root.
fn find_shape(
    mem: &impl Read,
    map: MapHeader,
    key_size: u64,
    val_size: Option<u64>,
    key_ok: &impl Fn(u64) -> bool,
    l: &StateLayout,
) -> Result<NodeShape, SnapshotError> {
    let sizes = match val_size {
        Some(v) => v..=v,
        None => 8..=MAX_INSTANCE,
    };
    for v in sizes.step_by(8) {
        for order in NODE_ORDERS {
            let sh = NodeShape::new(key_size, v, order, l);
            let want = sh.edges + if map.height > 0 { 16 } else { 0 };
            let Ok(b) = read_upto(mem, map.root, want as usize, want as usize) else {
                continue;
            };
            let len = u16_at(&b, sh.len).unwrap_or(0) as u64;
            let count_ok = if map.height == 0 {
                len == map.len
            } else {
                (1..=NODE_CAPACITY).contains(&len)
            };
            // A root has no parent (std clears the link when the root changes).
            if !count_ok || word_at(&b, sh.parent) != Some(0) || !key_ok(map.root + sh.keys) {
                continue;
            }
            let links = map.height == 0
                || (0..2u16).all(|i| {
                    let Some(c) = word_at(&b, sh.edges + i as u64 * 8).filter(|c| is_heap_ptr(*c))
                    else {
                        return false;
                    };
                    let mut idx = [0u8; 2];
                    mem.word(c + sh.parent).ok() == Some(map.root)
                        && mem.read(c + sh.parent_idx, &mut idx).is_ok()
                        && u16::from_ne_bytes(idx) == i
                });
            if links {
                return Ok(sh);
            }
        }
    }
    // A spent budget or a freed root fails here as what it is, not as a layout mismatch.
    mem.word(map.root)?;
    Err(invalid(
        "BTreeMap root",
        map.root,
        "no node layout fits its keys, count and children".into(),
    ))
}

/// Where the proxy's state is, for one process.
#[derive(Debug, Clone)]
pub struct Target {
    /// The address of the `SCHEDULER` static in the process (load base + symbol address).
    pub scheduler_static: u64,
    pub layout: StateLayout,
    pub strings: Layout,
    pub learnt: Learnt,
}

impl Target {
    pub fn new(scheduler_static: u64, layout: StateLayout, strings: Layout, given: Learnt) -> Self {
        Target {
            scheduler_static,
            layout,
            strings,
            learnt: given,
        }
    }

    fn string(&self, mem: &impl Read, addr: u64, max: usize) -> Result<Vec<u8>, SnapshotError> {
        Ok(memory::string(mem, addr, &self.strings, max)?)
    }

    /// The scheduler's data address (in its `Arc`); `None` while the static is not set (the
    /// proxy is starting: it has no scheduler, so no apps and no instances, exactly).
    fn scheduler(&self, mem: &impl Read) -> Result<Option<u64>, SnapshotError> {
        let l = &self.layout;
        let arc = mem.word(self.scheduler_static + l.once_cell_value)?;
        if arc == 0 {
            return Ok(None);
        }
        self.arc_data(mem, arc, "the scheduler's Arc").map(Some)
    }

    /// The data of the `ArcInner` at `arc`, if its counts are those of a live `Arc`.
    fn arc_data(
        &self,
        mem: &impl Read,
        arc: u64,
        what: &'static str,
    ) -> Result<u64, SnapshotError> {
        if !is_heap_ptr(arc) {
            return Err(invalid(what, arc, "not a heap pointer".into()));
        }
        let strong = mem.word(arc)?;
        let weak = mem.word(arc + 8)?;
        if strong == 0 || strong > MAX_LEN || weak == 0 || weak > MAX_LEN {
            return Err(invalid(what, arc, format!("strong {strong}, weak {weak}")));
        }
        Ok(arc + self.layout.arc_data)
    }

    /// One walk of the state; not retried (`snapshots::Reader::take` retries a torn one).
    pub fn walk(&mut self, mem: &impl Read) -> Result<Snapshot, SnapshotError> {
        let l = self.layout;
        let Some(sched) = self.scheduler(mem)? else {
            return Ok(Snapshot {
                instances_complete: true,
                ..Snapshot::default()
            });
        };
        let bytes = read_upto(mem, sched, SCHED_SCAN, 256)?;
        let apps_off = match self.learnt.sched_apps {
            Some(o) => o,
            None => self.find_app_cache(mem, &bytes)?,
        };
        let lru = sched + apps_off;
        let map = MapHeader::decode(&bytes, apps_off + l.lru_map, &l)
            .ok_or_else(|| invalid("app cache map", lru, "header".into()))?;
        let list = Deque::decode(&bytes, apps_off + l.lru_list, &l)
            .ok_or_else(|| invalid("app cache list", lru, "header".into()))?;
        if list.len != map.len {
            return Err(SnapshotError::Torn("the app cache"));
        }
        let runtimes = self.runtimes(mem, sched, &bytes, apps_off)?;
        let is_app = shaped(mem, &self.strings, APP_ID_MAX, is_app_id);
        let entries = walk_map(mem, map, 24, Some(l.app_value_size), is_app, &l)?;
        let mut apps = Vec::with_capacity(entries.len());
        let mut complete = true;
        let mut seen = BTreeSet::new();
        for (key, val) in entries {
            let id = self.string(mem, key, APP_ID_MAX)?;
            if !is_app_id(&id) || !seen.insert(id.clone()) {
                return Err(invalid(
                    "app id",
                    key,
                    format!("{:?}", String::from_utf8_lossy(&id)),
                ));
            }
            let arc = mem.word(val.expect("value size given") + l.app_value_arc)?;
            let state = self.arc_data(mem, arc, "an app state's Arc")?;
            let id = String::from_utf8(id).expect("checked: UTF-8");
            let entry = self.app(mem, state, id, runtimes.as_deref())?;
            complete &=
                entry.ready.is_some() && (entry.ready == Some(entry.instances.len() as u64));
            apps.push(entry);
        }
        // Re-read the length: a map that changed under the walk is retried, never returned.
        let mut now = [0u8; 24];
        mem.read_now(lru + l.lru_map, &mut now)?;
        let again = MapHeader::decode(&now, 0, &l);
        if again != Some(map) {
            return Err(SnapshotError::Torn("the app cache"));
        }
        // Learnt only from a cache that held apps (an empty one may be the route cache).
        if map.len > 0 {
            self.learnt.sched_apps = Some(apps_off);
        }
        // The pools' layout was learnt from an app met after others: read them all with it.
        let learnt_now = |e: &AppEntry| e.ready.is_none() && self.learnt.app_ready.is_some();
        let sized_now = |e: &AppEntry| {
            e.ready > Some(e.instances.len() as u64) && self.learnt.instance_size.is_some()
        };
        if apps.iter().any(|e| learnt_now(e) || sized_now(e)) {
            return self.walk(mem);
        }
        Ok(Snapshot {
            app_cache: lru,
            apps,
            runtimes,
            instances_complete: complete,
        })
    }

    /// The app cache: the `LruCache` in the scheduler whose keys are app ids and whose values'
    /// app states hold their key. Both of the scheduler's caches empty: either is exact (no
    /// apps), so the first is taken for this walk and nothing is learnt.
    fn find_app_cache(&mut self, mem: &impl Read, bytes: &[u8]) -> Result<u64, SnapshotError> {
        let l = self.layout;
        let mut empty = None;
        for off in (0..bytes.len() as u64).step_by(8) {
            let (Some(map), Some(list), Some(cap)) = (
                MapHeader::decode(bytes, off + l.lru_map, &l),
                Deque::decode(bytes, off + l.lru_list, &l),
                word_at(bytes, off + l.lru_capacity),
            ) else {
                continue;
            };
            if cap == 0 || cap > MAX_LEN || list.len != map.len || map.len > cap + 1 {
                continue;
            }
            if map.len == 0 {
                empty.get_or_insert(off);
                continue;
            }
            let is_app = shaped(mem, &self.strings, APP_ID_MAX, is_app_id);
            let Ok(entries) = walk_map(mem, map, 24, Some(l.app_value_size), is_app, &l) else {
                continue;
            };
            let (key, val) = entries[0];
            let Ok(id) = self.string(mem, key, APP_ID_MAX) else {
                continue;
            };
            if !is_app_id(&id) {
                continue;
            }
            let state = mem
                .word(val.expect("value size given") + l.app_value_arc)
                .map_err(SnapshotError::from)
                .and_then(|arc| self.arc_data(mem, arc, "an app state's Arc"));
            let Ok(state) = state else { continue };
            if self.learnt.app_id.is_none() {
                self.learn_app_id(mem, state, &id)?;
            }
            if let Some(o) = self.learnt.app_id {
                if self.string(mem, state + o, APP_ID_MAX).ok() == Some(id) {
                    return Ok(off);
                }
            }
        }
        // Not learnt: an empty cache now may be the route cache.
        empty.ok_or(SnapshotError::NotFound("the app cache (Scheduler.apps)"))
    }

    /// The connected runtimes' ids (`Scheduler.clients`): the `BTreeMap` in the scheduler, outside
    /// the app cache, whose keys are 32 hex digits. `None` while not found (no runtime yet).
    fn runtimes(
        &mut self,
        mem: &impl Read,
        sched: u64,
        bytes: &[u8],
        apps_off: u64,
    ) -> Result<Option<Vec<String>>, SnapshotError> {
        let l = self.layout;
        let read_keys = |this: &Self, map: MapHeader| -> Result<Vec<String>, SnapshotError> {
            let mut ids = Vec::new();
            let is_hex = shaped(mem, &this.strings, HEX_ID_LEN, is_hex_id);
            for (k, _) in walk_map(mem, map, 24, None, is_hex, &l)? {
                let s = this.string(mem, k, HEX_ID_LEN)?;
                if !is_hex_id(&s) {
                    return Err(invalid(
                        "runtime id",
                        k,
                        format!("{:?}", String::from_utf8_lossy(&s)),
                    ));
                }
                ids.push(String::from_utf8(s).expect("checked: hex"));
            }
            Ok(ids)
        };
        if let Some(o) = self.learnt.sched_clients {
            let map = MapHeader::decode(bytes, o, &l)
                .ok_or_else(|| invalid("runtime map", sched + o, "header".into()))?;
            return read_keys(self, map).map(Some);
        }
        let cache = apps_off..apps_off + l.lru_capacity + 8;
        for off in (0..bytes.len() as u64).step_by(8) {
            if cache.contains(&off) {
                continue;
            }
            let Some(map) = MapHeader::decode(bytes, off, &l) else {
                continue;
            };
            if map.len == 0 || map.len > 4096 {
                continue;
            }
            if let Ok(ids) = read_keys(self, map) {
                self.learnt.sched_clients = Some(off);
                return Ok(Some(ids));
            }
        }
        Ok(None)
    }

    /// `AppState.id`: the string in the app state equal to its key in the app map.
    fn learn_app_id(
        &mut self,
        mem: &impl Read,
        state: u64,
        id: &[u8],
    ) -> Result<(), SnapshotError> {
        let st = read_upto(mem, state, APP_SCAN, 64)?;
        self.learnt.app_id = (0..st.len() as u64 - 24)
            .step_by(8)
            .find(|o| self.string(mem, state + o, APP_ID_MAX).ok().as_deref() == Some(id));
        Ok(())
    }

    /// One app state: its id (checked against its key) and its ready pool.
    fn app(
        &mut self,
        mem: &impl Read,
        state: u64,
        id: String,
        runtimes: Option<&[String]>,
    ) -> Result<AppEntry, SnapshotError> {
        let l = self.layout;
        if self.learnt.app_id.is_none() {
            self.learn_app_id(mem, state, id.as_bytes())?;
        }
        let id_off = self
            .learnt
            .app_id
            .ok_or(SnapshotError::NotFound("AppState.id"))?;
        if self.string(mem, state + id_off, APP_ID_MAX)? != id.as_bytes() {
            return Err(SnapshotError::Torn("an app state"));
        }
        let mut entry = AppEntry {
            id,
            ready: None,
            instances: Vec::new(),
        };
        let ready_off = match self.learnt.app_ready {
            Some(o) => o,
            None => match self.find_ready(mem, state, runtimes)? {
                Some(o) => o,
                None => return Ok(entry),
            },
        };
        let mut hdr = [0u8; 32];
        mem.read(state + ready_off, &mut hdr)?;
        let pool = Deque::decode(&hdr, 0, &l)
            .ok_or_else(|| invalid("ready pool", state + ready_off, "header".into()))?;
        entry.ready = Some(pool.len);
        if pool.len >= 2 && self.learnt.instance_size.is_none() {
            if let Some((h, r, Some(size))) =
                runtimes.and_then(|rt| self.learn_pool(mem, &pool, rt))
            {
                if self.learnt.instance_handle == Some(h) && self.learnt.instance_rtid == Some(r) {
                    self.learnt.instance_size = Some(size);
                }
            }
        }
        let (Some(h), Some(r)) = (self.learnt.instance_handle, self.learnt.instance_rtid) else {
            return Ok(entry);
        };
        let size = match self.learnt.instance_size {
            Some(s) => s,
            // One element at the buffer's start: its size does not matter.
            None if pool.len == 0 || (pool.len == 1 && pool.head == 0) => 0,
            None => return Ok(entry),
        };
        for i in 0..pool.len {
            let at = pool.element(i, size);
            let handle = self.string(mem, at + h, HEX_ID_LEN)?;
            let rtid = self.string(mem, at + r, HEX_ID_LEN)?;
            if !is_hex_id(&handle) || !is_hex_id(&rtid) {
                return Err(invalid("ready instance", at, "handle or runtime id".into()));
            }
            entry.instances.push(PooledInstance {
                handle: String::from_utf8(handle).expect("checked: hex"),
                runtime_id: String::from_utf8(rtid).expect("checked: hex"),
            });
        }
        Ok(entry)
    }

    /// `AppState.ready_instances`: the deque in the app state whose elements hold two hex-id
    /// strings, one of them a connected runtime's id (that is `rtid`; the other is the handle).
    /// Learnt from the first pool that shows it (`learn_pool`); `None` while none did.
    fn find_ready(
        &mut self,
        mem: &impl Read,
        state: u64,
        runtimes: Option<&[String]>,
    ) -> Result<Option<u64>, SnapshotError> {
        let l = self.layout;
        let Some(runtimes) = runtimes else {
            return Ok(None);
        };
        let st = read_upto(mem, state, APP_SCAN, 64)?;
        for off in (0..st.len() as u64).step_by(8) {
            let Some(pool) = Deque::decode(&st, off, &l) else {
                continue;
            };
            if pool.len == 0 || pool.cap > 1 << 12 {
                continue;
            }
            if let Some((h, r, size)) = self.learn_pool(mem, &pool, runtimes) {
                self.learnt.app_ready = Some(off);
                self.learnt.instance_handle = Some(h);
                self.learnt.instance_rtid = Some(r);
                self.learnt.instance_size = self.learnt.instance_size.or(size);
                return Ok(Some(off));
            }
        }
        Ok(None)
    }

    /// Where a `ReadyInstance`'s handle and runtime id are, and its size, from a non-empty pool
    /// whose buffer is read once. Each candidate size puts the first element at `head * size`
    /// (a ring buffer); the element must hold two 32-byte strings of hex, one a connected
    /// runtime's id, and so must the next ones at the same size. Slots before the head keep
    /// stale copies of popped elements, so a size is only believed when two or more elements
    /// agree (or the head is at the buffer's start, where the size does not matter for one).
    fn learn_pool(
        &self,
        mem: &impl Read,
        pool: &Deque,
        runtimes: &[String],
    ) -> Option<(u64, u64, Option<u64>)> {
        let want = (pool.cap * MAX_INSTANCE).min(32 << 10) as usize;
        let buf = read_upto(mem, pool.ptr, want, 64).ok()?;
        let lay = &self.strings;
        // Offsets in an element (at `at` in `buf`) of plausible 32-byte String headers.
        let headers = |at: usize, size: u64| -> Vec<u64> {
            (0..size.saturating_sub(16))
                .step_by(8)
                .filter(|o| {
                    let w = |f: u64| word_at(&buf, at as u64 + o + f);
                    w(lay.string_len) == Some(HEX_ID_LEN as u64)
                        && w(lay.string_ptr).is_some_and(|p| (0x1000..1 << 47).contains(&p))
                })
                .collect()
        };
        let is_rt = |s: &[u8]| runtimes.iter().any(|r| r.as_bytes() == s);
        let text = |addr: u64| {
            self.string(mem, addr, HEX_ID_LEN)
                .ok()
                .filter(|s| is_hex_id(s))
        };
        // (handle, rtid) offsets of the element at `addr`, given its candidate headers.
        let ids = |addr: u64, cands: &[u64]| -> Option<(u64, u64)> {
            let found: Vec<(u64, bool)> = cands
                .iter()
                .filter_map(|o| text(addr + o).map(|s| (*o, is_rt(&s))))
                .collect();
            let r = found.iter().find(|(_, rt)| *rt)?.0;
            let h = found.iter().find(|(_, rt)| !*rt)?.0;
            Some((h, r))
        };
        let sizes: Vec<u64> = match self.learnt.instance_size {
            Some(s) => vec![s],
            // One element at the buffer's start: where its strings are, not its size.
            None if pool.len == 1 && pool.head == 0 => {
                let cands = headers(0, MAX_INSTANCE.min(buf.len() as u64));
                return ids(pool.ptr, &cands).map(|(h, r)| (h, r, None));
            }
            None if pool.len == 1 => return None,
            None => (40..=MAX_INSTANCE).step_by(8).collect(),
        };
        for size in sizes {
            let at = |i: u64| ((pool.head + i) % pool.cap) * size;
            let n = pool.len.min(4);
            if (0..n).any(|i| at(i) + size > buf.len() as u64) {
                continue;
            }
            let cands = headers(at(0) as usize, size);
            let Some((h, r)) = ids(pool.ptr + at(0), &cands) else {
                continue;
            };
            let mut handles = BTreeSet::new();
            let agree = (0..n).all(|i| {
                let e = pool.ptr + at(i);
                text(e + h).is_some_and(|s| !is_rt(&s) && handles.insert(s))
                    && text(e + r).is_some_and(|s| is_rt(&s))
            });
            if agree {
                return Some((h, r, Some(size)));
            }
        }
        None
    }
}

/// Instances per runtime id in a snapshot.
pub fn pooled_by_runtime(s: &Snapshot) -> BTreeMap<&str, u64> {
    let mut out = BTreeMap::new();
    for a in &s.apps {
        for i in &a.instances {
            *out.entry(i.runtime_id.as_str()).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Region;

    fn words(ws: &[u64]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    const P: u64 = 0x5555_0000_1000;

    /// (name, words at offset 0 in the default layout, decodes)
    #[test]
    fn deque_headers_validate() {
        let l = StateLayout::DEFAULT;
        type Case = (&'static str, [u64; 4], Option<(u64, u64)>);
        let cases: &[Case] = &[
            // [cap, ptr, head, len]
            ("empty, never allocated", [0, 8, 0, 0], Some((0, 0))),
            ("three of eight, wrapped head", [8, P, 6, 3], Some((6, 3))),
            ("full", [4, P, 0, 4], Some((0, 4))),
            ("len over cap: torn", [4, P, 0, 5], None),
            ("head past cap", [4, P, 4, 1], None),
            ("null buffer", [4, 0, 0, 1], None),
            ("unaligned buffer", [4, P + 3, 0, 1], None),
            ("kernel pointer", [4, 0xffff_8000_0000_0000, 0, 1], None),
            ("absurd capacity", [1 << 40, P, 0, 1], None),
        ];
        for (name, ws, want) in cases {
            let got = Deque::decode(&words(ws), 0, &l).map(|d| (d.head, d.len));
            assert_eq!(got, *want, "{name}");
        }
        let d = Deque::decode(&words(&[8, P, 6, 3]), 0, &l).expect("valid");
        assert_eq!(
            (0..3).map(|i| d.element(i, 72)).collect::<Vec<_>>(),
            vec![P + 6 * 72, P + 7 * 72, P],
            "elements wrap around the ring buffer"
        );
    }

    #[test]
    fn btree_map_headers_validate() {
        let l = StateLayout::DEFAULT;
        let cases: &[(&str, [u64; 3], bool)] = &[
            // [root, height, len]
            ("empty", [0, 0, 0], true),
            ("one leaf", [P, 0, 3], true),
            ("two levels", [P, 1, 30], true),
            ("no root but entries: torn", [0, 0, 3], false),
            ("height above length", [P, 5, 3], false),
            ("absurd height", [P, 40, 1 << 20], false),
            ("unaligned root", [P + 4, 0, 1], false),
        ];
        for (name, ws, ok) in cases {
            assert_eq!(
                MapHeader::decode(&words(ws), 0, &l).is_some(),
                *ok,
                "{name}"
            );
        }
    }

    /// A one-leaf map of `n` String keys (keys first: 24-byte keys and values) in a region,
    /// and what a walk of it says.
    fn leaf_map(n: u64, parent: u64, len_field: u16) -> (Region, MapHeader) {
        let base = 0x10_0000u64;
        let l = StateLayout::DEFAULT;
        let sh = NodeShape::new(24, 24, [0, 1, 2], &l);
        let mut bytes = vec![0u8; 0x2000];
        let node = base;
        bytes[sh.parent as usize..sh.parent as usize + 8].copy_from_slice(&parent.to_ne_bytes());
        bytes[sh.len as usize..sh.len as usize + 2].copy_from_slice(&len_field.to_ne_bytes());
        for i in 0..n {
            let text = base + 0x1000 + i * 64;
            let key = (sh.keys + i * 24) as usize;
            bytes[key..key + 24].copy_from_slice(&words(&[5, text, 5]));
            let t = (text - base) as usize;
            bytes[t..t + 5].copy_from_slice(format!("app-{i}").as_bytes());
        }
        let map = MapHeader {
            root: node,
            height: 0,
            len: n,
        };
        (Region { base, bytes }, map)
    }

    #[test]
    fn maps_walk_or_fail_as_torn_or_invalid() {
        let l = StateLayout::DEFAULT;
        let lay = Layout::DEFAULT;
        type Case = (&'static str, u64, u64, u16, Result<u64, &'static str>);
        let cases: &[Case] = &[
            // (name, entries, root's parent, its len field, walked entries or the error)
            ("three entries", 3, 0, 3, Ok(3)),
            (
                "a root with a parent: torn or freed",
                3,
                0x7000,
                3,
                Err("invalid"),
            ),
            ("count disagrees with the length", 3, 0, 2, Err("invalid")),
        ];
        for (name, n, parent, len, want) in cases {
            let (mem, map) = leaf_map(*n, *parent, *len);
            let ok = shaped(&mem, &lay, 64, is_app_id);
            let got = walk_map(&mem, map, 24, Some(24), ok, &l);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g.len() as u64, *w, "{name}"),
                (Err(w), Err(e)) => assert_eq!(e.reason(), *w, "{name}: {e}"),
                (w, g) => panic!("{name}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn ids_have_their_shapes() {
        assert!(is_hex_id(b"0123456789abcdef0123456789abcdef"));
        assert!(!is_hex_id(b"0123456789ABCDEF0123456789abcdef"));
        assert!(!is_hex_id(b"0123"));
        assert!(is_app_id("afb38b70-d0bb-4102-8248-765e6c1d7dde".as_bytes()));
        assert!(is_app_id("app-1".as_bytes()));
        assert!(!is_app_id(b""));
        assert!(!is_app_id(&[0xff, 0xfe]));
    }

    #[test]
    fn random_memory_never_panics_and_is_never_a_state() {
        // A static pointing into noise: every walk fails or finds nothing (the fuzz target
        // does this at length).
        let mut x = 0x1234_5678_9abc_def0u64;
        for round in 0..200 {
            let mut bytes = vec![0u8; 8192];
            for b in bytes.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // The OnceCell's value points into the region.
            let base = 0x40_0000u64;
            bytes[8..16].copy_from_slice(&(base + 64).to_ne_bytes());
            let mem = Region { base, bytes };
            let mut t = Target::new(
                base,
                StateLayout::DEFAULT,
                Layout::DEFAULT,
                Learnt::default(),
            );
            if let Ok(s) = t.walk(&mem) {
                assert!(
                    s.apps.is_empty(),
                    "round {round}: noise read as apps: {s:?}"
                );
            }
        }
    }
}
