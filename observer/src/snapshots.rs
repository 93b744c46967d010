//! Taking snapshots of a proxy's state (`crate::snapshot`) beside the events: the reader set
//! up for one proxy process, a thread that walks it every interval (off the event loop: a
//! walk of thousands of apps takes milliseconds), and what the last walks cost and found.
//!
//! Order matters for exactness: a snapshot is merged into the model (`Tracker::merge_snapshot`)
//! only after a drain of the ring buffer that began after its walk ended, so every event of
//! what the walk saw has been applied first.

use crate::memory::{Pages, ProcessMemory};
use crate::snapshot::{Learnt, Snapshot, SnapshotError, StateLayout, Target as Walker};
use crate::symbols::SymbolTable;
use crate::target::Target;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where to find the proxy's state: the catalog's `[state]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSpec {
    /// The static holding the scheduler (demangled path, no hash).
    pub symbol: String,
    pub layout: StateLayout,
    /// Offsets of the proxy's own fields, when given (else found).
    pub given: Learnt,
    /// Bytes one walk may read.
    pub budget: u64,
}

impl Default for StateSpec {
    fn default() -> Self {
        StateSpec {
            symbol: "rusty_workers_proxy::SCHEDULER".to_string(),
            layout: StateLayout::DEFAULT,
            given: Learnt::default(),
            budget: 64 << 20,
        }
    }
}

/// Walks of a consistent state tried before a snapshot is given up for this interval.
const TRIES: usize = 4;

/// The reader of one proxy process.
pub struct Reader {
    pub pid: u32,
    walker: Walker,
    budget: u64,
}

impl Reader {
    /// Sets up the reader of `target`'s state, or says why it cannot be read (the reason is
    /// exported: its gauges then come from events, as before snapshots).
    pub fn new(target: &Target, table: &SymbolTable, spec: &StateSpec) -> Result<Reader, String> {
        let sym = table.data_by_path(&spec.symbol).ok_or_else(|| {
            format!(
                "no data symbol {} in {} (another proxy version: the catalog's [state] symbol names it)",
                spec.symbol,
                target.exe_path.display()
            )
        })?;
        let base = target.load_base().map_err(|e| e.to_string())?;
        let addr = base + sym.address.wrapping_sub(table.offset0_vaddr);
        Ok(Reader {
            pid: target.pid,
            walker: Walker::new(
                addr,
                spec.layout,
                observer_common::Layout::DEFAULT,
                spec.given,
            ),
            budget: spec.budget,
        })
    }

    /// One snapshot (retried while torn), and every failed walk's reason.
    pub fn take(&mut self) -> Outcome {
        let mem = ProcessMemory::new(self.pid, self.budget);
        let taken_ns = crate::monotonic_ns();
        let t0 = Instant::now();
        let mut failures = Vec::new();
        let mut result = Err(SnapshotError::Torn("not walked"));
        // Each try reads its pages afresh.
        for _ in 0..TRIES {
            result = self.walker.walk(&Pages::new(&mem));
            match &result {
                Ok(_) => break,
                Err(e) => {
                    failures.push(e.reason());
                    if !e.is_transient() {
                        break;
                    }
                }
            }
        }
        Outcome {
            pid: self.pid,
            result,
            failures,
            taken_ns,
            duration: t0.elapsed(),
            bytes: mem.bytes_read(),
        }
    }

    pub fn learnt(&self) -> Learnt {
        self.walker.learnt
    }
}

/// What one snapshot attempt gave.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub pid: u32,
    pub result: Result<Snapshot, SnapshotError>,
    /// Reasons of the walks that failed (a torn one retried, then maybe a good one).
    pub failures: Vec<&'static str>,
    /// CLOCK_MONOTONIC when the walk began.
    pub taken_ns: u64,
    pub duration: Duration,
    pub bytes: u64,
}

/// Snapshots' self-metrics (the latest good one is `Snapshots::latest`).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Why the proxy's state cannot be read (no reader): its gauges come from events.
    pub unavailable: Option<String>,
    /// A reader is set up for the proxy.
    pub reading: bool,
    pub snapshots: u64,
    pub failures: BTreeMap<&'static str, u64>,
    pub last_duration: Duration,
    pub last_bytes: u64,
    pub learnt: Learnt,
}

/// The snapshot of `latest` (as `Snapshots::latest` gives it) if it is at most `max_age_ns`
/// old at `now_ns`.
pub fn fresh(latest: Option<&(Snapshot, u64)>, now_ns: u64, max_age_ns: u64) -> Option<&Snapshot> {
    latest
        .filter(|(_, t)| now_ns.saturating_sub(*t) <= max_age_ns)
        .map(|(s, _)| s)
}

impl Stats {
    /// Counts an outcome in; returns the snapshot to merge, if good.
    pub fn record(&mut self, o: Outcome, learnt: Learnt) -> Option<(Snapshot, u64)> {
        for r in &o.failures {
            *self.failures.entry(r).or_default() += 1;
        }
        self.last_duration = o.duration;
        self.last_bytes = o.bytes;
        self.learnt = learnt;
        match o.result {
            Ok(s) => {
                self.snapshots += 1;
                Some((s, o.taken_ns))
            }
            Err(e) => {
                log::debug!("snapshot of proxy PID {}: {e}", o.pid);
                None
            }
        }
    }
}

/// The reader shared between the lifecycle (which sets it at each attach) and the snapshot
/// thread, and the outcomes waiting for the event loop to merge them.
#[derive(Clone, Default)]
pub struct Snapshots {
    reader: Arc<Mutex<Option<Reader>>>,
    outcomes: Arc<Mutex<VecDeque<(Outcome, Learnt)>>>,
    /// The latest good snapshot as soon as it is taken, for the gauges: they do not wait for
    /// the event loop's merge (which a long look at the processes can delay).
    latest: Arc<Mutex<Option<(Snapshot, u64)>>>,
}

impl Snapshots {
    /// A new proxy: its reader replaces the old one (`None`: its state cannot be read).
    pub fn set_reader(&self, r: Option<Reader>) {
        *self.reader.lock().unwrap() = r;
        // An old proxy's outcomes belong to it.
        self.outcomes.lock().unwrap().clear();
        *self.latest.lock().unwrap() = None;
    }

    /// The latest good snapshot (of the current reader) and when its walk began.
    pub fn latest(&self) -> Option<(Snapshot, u64)> {
        self.latest.lock().unwrap().clone()
    }

    /// Takes a snapshot now, on this thread.
    pub fn take_now(&self) {
        let mut g = self.reader.lock().unwrap();
        if let Some(r) = g.as_mut() {
            let o = r.take();
            let l = r.learnt();
            if let Ok(s) = &o.result {
                *self.latest.lock().unwrap() = Some((s.clone(), o.taken_ns));
            }
            self.outcomes.lock().unwrap().push_back((o, l));
        }
    }

    /// The outcomes to count and merge (after a drain of the events).
    pub fn take_outcomes(&self) -> Vec<(Outcome, Learnt)> {
        self.outcomes.lock().unwrap().drain(..).collect()
    }

    /// Starts the thread that takes a snapshot every `interval`.
    pub fn spawn(&self, interval: Duration) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                me.take_now();
            })
            .map(|_| ())
    }
}
