//! Per-app request metrics and per-runtime RPC metrics, joined from the request probes.
//!
//! A request lives from hyper's `recv_msg` (its key: the box its service future goes into) to
//! its response head, which the proxy sends on the connection the request came in on.
//! Between them, its RPCs tell its app and how it went:
//!
//! - A call (`Channel::call`) is made on a client (`&mut Channel`) that lives inside the
//!   request's service future, at a distance from the request key fixed by the compiled
//!   future's layout: learnt from the calls of lone requests, then exact. Spawn and fetch are
//!   called from different frames (`get_instance` is inlined into `handle_request`), so each
//!   has its own distance.
//! - A call's request frame on the wire (`wire`) carries its trace id and its request id on
//!   that connection; the answer frame names the request id: that joins answer and call. A
//!   call cancelled on the wire (its deadline passed, or its caller gave up), or whose
//!   connection ended before its answer, failed on the transport.
//! - The request's client connection (the socket its head came in on, from the kernel) is
//!   where its response head goes out: the proxy's next response head on that connection is
//!   its end. HTTP/1 serves one request at a time on a connection.
//! - `SchedError::build_response` runs on the thread that then encodes the response head: the
//!   proxy's own error is the next head's on that thread.

mod learner;
mod metrics;
mod outcome;
pub mod wire;

pub use learner::Learner;
#[cfg(test)]
use learner::MIN_VOTES;
pub use metrics::{AppRequests, Metrics, STARTS};
pub use outcome::{outcome_of, FetchEnd, OUTCOMES};
pub use wire::{decode_answer, decode_sent, peer_name, Answer, AnswerResult, Sent};

use crate::decode::{Bytes, CallId, CallKind, RequestEvent};
use crate::model::tracker::Tracker;
use foldhash::{HashMap, HashMapExt};
use observer_common::{method, Peer};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Calls farther than this from a request key are not its (a service future is smaller).
const MAX_CALL_DISTANCE: u64 = 64 * 1024;
#[derive(Debug, Clone)]
struct Open {
    start_ns: u64,
    app: Option<String>,
    cold: bool,
    fetched: bool,
    last_fetch: Option<FetchEnd>,
    /// A call that may have been its could not be tied to it (while a distance was being
    /// learnt): its app, start and outcome are not known for sure.
    tainted: bool,
    /// The worker of a fetch it sent before the app tracker knew the worker's app (its spawn
    /// not yet paired): the request's app once it is (`paired_late`).
    unnamed_worker: Option<Bytes>,
}

/// A response whose request's worker waits to be paired with its app: counted once it is.
#[derive(Debug, Clone)]
struct Parked {
    worker: Bytes,
    outcome: &'static str,
    secs: f64,
    start: Option<usize>,
}

#[derive(Debug, Clone)]
struct Call {
    method: u32,
    ktime_ns: u64,
    app: Option<String>,
    /// The request it was made for (fetch and spawn).
    request: Option<u64>,
    /// A fetch's worker handle.
    handle: Option<Bytes>,
    /// The runtime its request frame went to (or, before, its connection's).
    runtime: Option<Arc<str>>,
    /// Its connection (`RequestEvent::Call::conn`).
    conn: u64,
    /// Whether its request frame was seen.
    framed: bool,
}

/// The observer's own counts of what it could not join.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JoinCounters {
    /// Ended calls whose start was not seen (in flight at attach) or not matched.
    pub unmatched_calls: u64,
    /// Response heads whose request start was not seen or could not be keyed, or whose calls
    /// could not be tied to it yet (while the observer learns).
    pub unmatched_responses: u64,
    /// Fetches and spawns not tied to a request (before the distance was learnt).
    pub unattributed_calls: u64,
    /// Requests that never saw their response (lost events, or in flight at exit).
    pub abandoned_requests: u64,
    /// Frames on a runtime connection whose head did not decode as tarpc's.
    pub undecoded_frames: u64,
}

/// Open requests, calls and answers, joined into metrics.
pub struct Requests {
    open: HashMap<u64, Open>,
    /// Trace id -> call.
    calls: HashMap<CallId, Call>,
    /// (connection, request id) -> the call its request frame was: awaiting its answer.
    in_flight: HashMap<(u64, u64), CallId>,
    sched_errors: HashMap<u32, (u64, u64)>,
    fetch_distance: Learner,
    spawn_distance: Learner,
    /// Client connection -> the open request whose head came in on it.
    by_sock: HashMap<u64, u64>,
    /// Calls ended lately: a call answered can still be cancelled (its caller dropped it
    /// before taking the answer: tarpc's `DispatchResponse` then sends a cancel).
    ended: EndedCalls,
    /// Workers the proxy let go after a failed fetch, for the tracker (`take_discarded`).
    discarded: Vec<Bytes>,
    /// Runtime connection (its socket) -> runtime name (its address), and the tarpc channel
    /// its calls name (`RequestEvent::Call::conn`).
    connections: HashMap<u64, (Arc<str>, u64)>,
    /// tarpc channel -> the runtime it connects to, from its calls' request frames: every
    /// runtime a call went to.
    conn_runtimes: HashMap<u64, Arc<str>>,
    /// Runtime name -> its RuntimeId, from `id` answers.
    pub runtime_ids: BTreeMap<String, String>,
    /// Worker handle -> the runtime that spawned it and when (from `spawn_worker` answers).
    placed: HashMap<Bytes, (Arc<str>, u64)>,
    pub counters: JoinCounters,
    pub metrics: Metrics,
    parked: Vec<Parked>,
}

/// Slots of `EndedCalls` (a power of two).
const ENDED_SLOTS: usize = 16_384;

/// Ended calls remembered to recognise a second sighting of their end: a direct-mapped table
/// of their trace ids (random per call, so their low bits spread them), where an end is one
/// store, not a queue push with a hash set's insert and remove (`Requests::end` runs for
/// every call; its hash-map removes, of the calls and of that set, were 12% of the drain's
/// CPU at saturation, `perf record --call-graph dwarf` on the observer). An id stays until
/// another takes its slot: after 4,096 further ends, 78% are still there. One lost shows only
/// as an unmatched call (`JoinCounters::unmatched_calls`), never in a metric.
struct EndedCalls(Box<[CallId]>);

impl EndedCalls {
    fn new() -> Self {
        EndedCalls(vec![0; ENDED_SLOTS].into_boxed_slice())
    }

    fn slot(id: CallId) -> usize {
        id as usize & (ENDED_SLOTS - 1)
    }

    /// Id 0 (a trace id that could not be read) is never remembered: it is every such call's.
    fn insert(&mut self, id: CallId) {
        if id != 0 {
            self.0[Self::slot(id)] = id;
        }
    }

    fn contains(&self, id: CallId) -> bool {
        id != 0 && self.0[Self::slot(id)] == id
    }
}

/// Ages after which half-joined state is given up (ns).
const OPEN_TTL_NS: u64 = 300_000_000_000;
const ANSWER_TTL_NS: u64 = 60_000_000_000;
const SCHED_ERROR_TTL_NS: u64 = 10_000_000_000;
/// Past this many waiting requests, calls or answers, they wait `SHORT_TTL_NS` at most.
const MAX_PENDING: usize = 65_536;
const SHORT_TTL_NS: u64 = 10_000_000_000;
/// Longest wait from a proxy error to its response head on the same thread.
const SCHED_ERROR_WINDOW_NS: u64 = 10_000_000;

impl Default for Requests {
    fn default() -> Self {
        Self::new()
    }
}

impl Requests {
    pub fn new() -> Self {
        Requests {
            open: HashMap::new(),
            calls: HashMap::new(),
            in_flight: HashMap::new(),
            sched_errors: HashMap::new(),
            fetch_distance: Learner::default(),
            spawn_distance: Learner::default(),
            by_sock: HashMap::new(),
            ended: EndedCalls::new(),
            discarded: Vec::new(),
            connections: HashMap::new(),
            conn_runtimes: HashMap::new(),
            runtime_ids: BTreeMap::new(),
            placed: HashMap::new(),
            counters: JoinCounters::default(),
            metrics: Metrics::new(),
            parked: Vec::new(),
        }
    }

    /// The proxy was replaced by a new process: what was in flight ended with the old one
    /// (counted as abandoned), and where things are in memory is learnt again. Metrics,
    /// counters and the runtimes' ids continue.
    pub fn target_restarted(&mut self) {
        let mut fresh = Requests::new();
        std::mem::swap(&mut fresh.metrics, &mut self.metrics);
        std::mem::swap(&mut fresh.counters, &mut self.counters);
        std::mem::swap(&mut fresh.runtime_ids, &mut self.runtime_ids);
        fresh.counters.abandoned_requests += self.open.len() as u64;
        // Their workers' spawns will never be paired now: counted without an app.
        for p in std::mem::take(&mut self.parked) {
            fresh.count("", p.outcome, p.secs, p.start);
        }
        *self = fresh;
    }

    pub fn open_requests(&self) -> usize {
        self.open.len()
    }

    pub fn open_calls(&self) -> usize {
        self.calls.len()
    }

    /// Which of the learnt relations are known: (fetch distance, spawn distance).
    pub fn learnt(&self) -> [(&'static str, bool); 2] {
        [
            ("fetch_call", self.fetch_distance.known().is_some()),
            ("spawn_call", self.spawn_distance.known().is_some()),
        ]
    }

    /// Worker handles of instances the proxy discarded after a failed fetch (rusty-workers'
    /// `handle_request`: a lost worker, a terminating execution error or a failed connection
    /// drop the instance, neither pooled nor terminated).
    pub fn take_discarded(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.discarded)
    }

    /// Applies one request-path event (`decode::request_event`).
    pub fn apply(&mut self, ev: RequestEvent, tracker: &Tracker) {
        match ev {
            RequestEvent::Start {
                key,
                sock,
                ktime_ns,
            } => {
                let old = self.open.insert(
                    key,
                    Open {
                        start_ns: ktime_ns,
                        app: None,
                        cold: false,
                        fetched: false,
                        last_fetch: None,
                        tainted: false,
                        unnamed_worker: None,
                    },
                );
                if old.is_some() {
                    self.counters.abandoned_requests += 1;
                }
                if sock != 0 {
                    // An older request still open on the connection never saw its response
                    // (the client left); it stays open until it expires, unanswerable.
                    self.by_sock.insert(sock, key);
                }
            }
            RequestEvent::Call {
                call,
                client,
                conn,
                conn_open,
                id,
                ktime_ns,
            } => {
                self.call(call, client, conn, id, ktime_ns, tracker);
                if !conn_open {
                    // tarpc fails it at once: its connection's dispatch task has ended
                    // (`Channel::send` finds the dispatch channel closed). Nothing reaches
                    // the wire.
                    self.end(id, Err("no_answer"), ktime_ns);
                }
            }
            RequestEvent::Frame {
                sock,
                direction,
                head,
                head_len,
                peer,
                ktime_ns,
            } => {
                let head = &head[..head_len.min(head.len())];
                if direction == observer_common::wire::SENT {
                    self.sent(sock, head, &peer, ktime_ns)
                } else {
                    self.received(sock, head, ktime_ns)
                }
            }
            RequestEvent::WireEnd { sock } => self.connection_ended(sock),
            RequestEvent::SchedError {
                tid,
                error,
                ktime_ns,
            } => {
                self.sched_errors.insert(tid, (error, ktime_ns));
            }
            // An interim head (`100 Continue`, which hyper sends when a client that asked
            // for it is about to send its body) is not the request's end (RFC 9110, 15.2).
            RequestEvent::Response { status, .. } if (100..200).contains(&status) => {}
            RequestEvent::Response {
                sock,
                status: _,
                tid,
                ktime_ns,
            } => self.response(sock, tid, ktime_ns, tracker),
        }
    }

    /// The app tracker paired a worker with its app after its fetch waited: requests on it
    /// take that app, the open ones now, the ended ones as they are counted.
    pub fn paired_late(&mut self, worker: &Bytes, app: &str) {
        for o in self.open.values_mut() {
            if o.app.is_none() && o.unnamed_worker.as_ref() == Some(worker) {
                o.app = Some(app.to_string());
                o.unnamed_worker = None;
            }
        }
        let (named, waiting): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.worker == *worker);
        self.parked = waiting;
        for p in named {
            self.count(app, p.outcome, p.secs, p.start);
        }
    }

    /// Responses waiting for the app of their worker.
    pub fn parked_responses(&self) -> usize {
        self.parked.len()
    }

    /// Counts the waiting responses whose worker is no longer waited for: under its app if a
    /// snapshot adopted it meanwhile, else under none (the tracker gave up pairing it and
    /// counted it unattributed).
    pub fn settle_parked(&mut self, tracker: &Tracker) {
        if self.parked.is_empty() {
            return;
        }
        for p in std::mem::take(&mut self.parked) {
            match tracker.app_of_handle(&p.worker) {
                Some(app) => self.count(app, p.outcome, p.secs, p.start),
                None if tracker.awaits_pairing(&p.worker) => self.parked.push(p),
                None => self.count("", p.outcome, p.secs, p.start),
            }
        }
    }

    fn call(
        &mut self,
        call: CallKind,
        client: u64,
        conn: u64,
        id: CallId,
        t: u64,
        tracker: &Tracker,
    ) {
        let (m, app, handle) = match call {
            CallKind::Spawn { app } => (method::SPAWN_WORKER, Some(tracker.label_of(&app)), None),
            CallKind::Terminate => (method::TERMINATE_WORKER, None, None),
            CallKind::Fetch { slot, handle } => (
                method::FETCH,
                tracker.app_of_slot(slot).map(str::to_string),
                Some(handle),
            ),
            CallKind::FetchUnknown { handle } => (
                method::FETCH,
                tracker.app_of_handle(&handle).map(str::to_string),
                Some(handle),
            ),
            CallKind::Other { method: m } => (m, None, None),
        };
        let request = match m {
            method::FETCH | method::SPAWN_WORKER => self.request_of(client, t, m),
            _ => None,
        };
        if let Some(o) = request.and_then(|r| self.open.get_mut(&r)) {
            if m == method::SPAWN_WORKER {
                o.cold = true;
            } else {
                o.fetched = true;
            }
            if app.is_some() {
                o.app = app.clone();
            } else if let (None, Some(h)) = (&o.app, &handle) {
                o.unnamed_worker = Some(h.clone());
            }
        }
        self.calls.insert(
            id,
            Call {
                method: m,
                ktime_ns: t,
                app,
                request,
                handle,
                runtime: self.conn_runtimes.get(&conn).cloned(),
                conn,
                framed: false,
            },
        );
    }

    /// The open request whose service future holds `client`.
    fn request_of(&mut self, client: u64, t: u64, m: u32) -> Option<u64> {
        let learner = if m == method::SPAWN_WORKER {
            &mut self.spawn_distance
        } else {
            &mut self.fetch_distance
        };
        if let Some(d) = learner.known() {
            let key = client.wrapping_sub(d as u64);
            if self.open.contains_key(&key) {
                return Some(key);
            }
            self.counters.unattributed_calls += 1;
            return None;
        }
        let near: Vec<(u64, i64)> = self
            .open
            .iter()
            .filter(|(_, o)| o.start_ns <= t)
            .map(|(k, _)| (*k, client.wrapping_sub(*k) as i64))
            .filter(|(_, d)| d.unsigned_abs() <= MAX_CALL_DISTANCE)
            .collect();
        let votes: Vec<i64> = near.iter().map(|(_, d)| *d).collect();
        learner.vote(&votes);
        // Every fetch and spawn is made by an open request: a lone one is certainly its.
        match near.as_slice() {
            [(k, _)] => Some(*k),
            _ => {
                self.counters.unattributed_calls += 1;
                for (k, _) in &near {
                    if let Some(o) = self.open.get_mut(k) {
                        o.tainted = true;
                    }
                }
                None
            }
        }
    }

    /// A frame the proxy sent on the runtime connection `sock`: a call's request (which
    /// connection and request id answer it) or its cancel (it failed on the transport).
    fn sent(&mut self, sock: u64, head: &[u8], peer: &Peer, t: u64) {
        let Some(sent) = decode_sent(head) else {
            self.counters.undecoded_frames += 1;
            return;
        };
        match sent {
            Sent::Request {
                trace_id,
                request_id,
                ..
            } => {
                let Some(call) = self.calls.get_mut(&trace_id) else {
                    // Its call was not seen (lost, or sent before the attach): its answer
                    // will find nothing either.
                    return;
                };
                let runtime = match self.connections.get(&sock) {
                    Some((rt, _)) => rt.clone(),
                    None => {
                        let rt: Arc<str> = peer_name(peer).as_deref().unwrap_or("unknown").into();
                        self.connections.insert(sock, (rt.clone(), call.conn));
                        if self.conn_runtimes.len() < MAX_PENDING {
                            self.conn_runtimes.insert(call.conn, rt.clone());
                        }
                        rt
                    }
                };
                call.runtime = Some(runtime);
                call.framed = true;
                self.in_flight.insert((sock, request_id), trace_id);
            }
            Sent::Cancel {
                trace_id,
                request_id,
            } => {
                self.in_flight.remove(&(sock, request_id));
                self.end(trace_id, Err("no_answer"), t);
            }
        }
    }

    /// A frame the proxy received on the runtime connection `sock`: an answer.
    fn received(&mut self, sock: u64, head: &[u8], t: u64) {
        let Some(answer) = decode_answer(head) else {
            self.counters.undecoded_frames += 1;
            return;
        };
        match self.in_flight.remove(&(sock, answer.request_id)) {
            Some(id) => self.end(id, Ok(answer), t),
            // Its request was sent before the attach, or its call was not seen.
            None => self.counters.unmatched_calls += 1,
        }
    }

    /// A runtime connection ended under the proxy: what was in flight on it failed (tarpc
    /// fails every call waiting on a dispatch task that ends), and so did the calls on its
    /// channel not yet written (queued for the dispatch task, dropped with it).
    fn connection_ended(&mut self, sock: u64) {
        let mut gone: Vec<(u64, CallId)> = self
            .in_flight
            .iter()
            .filter(|((s, _), _)| *s == sock)
            .map(|((_, rid), id)| (*rid, *id))
            .collect();
        gone.sort_unstable();
        for (rid, id) in gone {
            self.in_flight.remove(&(sock, rid));
            self.end(id, Err("connection_reset"), 0);
        }
        if let Some((_, conn)) = self.connections.remove(&sock) {
            let mut queued: Vec<CallId> = self
                .calls
                .iter()
                .filter(|(_, c)| c.conn == conn && !c.framed)
                .map(|(id, _)| *id)
                .collect();
            queued.sort_unstable();
            for id in queued {
                self.end(id, Err("connection_reset"), 0);
            }
        }
    }

    /// A call ended: with its answer, or failed on the transport (`Err(reason)`); `t`: when
    /// (0: not known).
    fn end(&mut self, id: CallId, how: Result<Answer, &'static str>, t: u64) {
        let Some(call) = self.calls.remove(&id) else {
            if !self.ended.contains(id) {
                self.counters.unmatched_calls += 1;
            }
            return;
        };
        self.ended.insert(id);
        let rt = call.runtime.unwrap_or_else(|| "unknown".into());
        let mname = method::name(call.method);
        let end = match &how {
            Ok(a) => {
                let secs = t.saturating_sub(call.ktime_ns) as f64 / 1e9;
                self.metrics.rpc_duration.observe(&rt, call.method, secs);
                if call.method == method::SPAWN_WORKER {
                    if let Some(app) = &call.app {
                        self.metrics.app(app).spawn.observe(secs);
                    }
                }
                if call.method == method::SPAWN_WORKER
                    && a.result == AnswerResult::Ok
                    && !a.string.is_empty()
                    && self.placed.len() < MAX_PENDING
                {
                    self.placed.insert(Bytes::whole(&a.string), (rt.clone(), t));
                }
                if call.method == method::ID && a.result == AnswerResult::Ok {
                    // A RuntimeId becomes a label value: validated as app ids are.
                    if let Ok(id) = crate::decode::app_label(&Bytes::whole(&a.string)) {
                        self.runtime_ids.insert(rt.to_string(), id);
                    }
                }
                match a.result {
                    AnswerResult::Ok => FetchEnd::Ok,
                    AnswerResult::Error(kind) => {
                        self.fail(&rt, mname, "error_answer");
                        if kind == "no_such_worker" {
                            FetchEnd::NoSuchWorker
                        } else {
                            FetchEnd::ExecutionError
                        }
                    }
                    AnswerResult::ServerError => {
                        self.fail(&rt, mname, "server_error");
                        FetchEnd::Transport
                    }
                }
            }
            Err(reason) => {
                self.fail(&rt, mname, reason);
                FetchEnd::Transport
            }
        };
        if call.method == method::FETCH {
            if let Some(o) = call.request.and_then(|r| self.open.get_mut(&r)) {
                o.last_fetch = Some(end);
            }
            // A script exception keeps the worker (the proxy pools it back); any other failure
            // loses it.
            let kept = matches!(
                how.as_ref().map(|a| &a.result),
                Ok(AnswerResult::Ok) | Ok(AnswerResult::Error("script_throws"))
            );
            if let (false, Some(h)) = (kept, call.handle) {
                self.placed.remove(&h);
                self.discarded.push(h);
            }
        }
    }

    /// A worker was terminated: where it ran no longer matters.
    pub fn forget_worker(&mut self, handle: &Bytes) {
        self.placed.remove(handle);
    }

    fn fail(&self, rt: &str, m: &str, reason: &str) {
        self.metrics
            .rpc_failures
            .with_label_values(&[rt, m, reason])
            .inc();
    }

    fn response(&mut self, sock: u64, tid: u32, t: u64, tracker: &Tracker) {
        // The error's response head follows it in the same poll of the connection's task:
        // microseconds later. An older one on this thread was not answered (the client left).
        let sched_error = self
            .sched_errors
            .remove(&tid)
            .filter(|(_, at)| *at <= t && t - at < SCHED_ERROR_WINDOW_NS)
            .map(|(e, _)| e);
        // A connection no open request came in on: not one hyper serves now (the kernel keeps
        // a client connection's mark until it sees the connection end, and a closed socket's
        // memory is reused: the test target's admin endpoint answers on such), or its request
        // came before the attach. Nothing to join, nothing lost.
        let Some(key) = self.by_sock.remove(&sock) else {
            return;
        };
        let Some(req) = self.open.remove(&key) else {
            self.counters.unmatched_responses += 1;
            return;
        };
        if req.tainted {
            // One of its calls may have gone unattributed while a distance was being learnt:
            // it is not counted rather than counted wrong (e.g. as an internal error).
            self.counters.unmatched_responses += 1;
            return;
        }
        let outcome = outcome_of(sched_error, req.last_fetch);
        let secs = t.saturating_sub(req.start_ns) as f64 / 1e9;
        let start = if req.cold {
            Some(0)
        } else {
            req.fetched.then_some(1)
        };
        match (req.app, req.unnamed_worker) {
            (Some(app), _) => self.count(&app, outcome, secs, start),
            (None, Some(w)) => match tracker.app_of_handle(&w) {
                Some(app) => self.count(app, outcome, secs, start),
                // Its worker's spawn waits to be paired (concurrent cold starts while the
                // distance is learnt): counted under its app once it is, not under none.
                None if tracker.awaits_pairing(&w) && self.parked.len() < MAX_PENDING => {
                    self.parked.push(Parked {
                        worker: w,
                        outcome,
                        secs,
                        start,
                    })
                }
                None => self.count("", outcome, secs, start),
            },
            (None, None) => self.count("", outcome, secs, start),
        }
    }

    /// Counts a response of `app` (`""`: it named none).
    fn count(&mut self, app: &str, outcome: &'static str, secs: f64, start: Option<usize>) {
        let a = self.metrics.app(app);
        a.duration.observe(secs);
        let o = OUTCOMES
            .iter()
            .position(|x| *x == outcome)
            .expect("outcome_of answers one of OUTCOMES");
        a.responses[o] += 1;
        if let (false, Some(start)) = (app.is_empty(), start) {
            a.starts[start] += 1;
        }
    }

    /// Live instances per runtime: the tracker's live workers, by the runtime that spawned
    /// them. Workers whose spawn was not seen (before the attach) are not counted.
    pub fn instances_by_runtime(&self, tracker: &Tracker) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = self
            .conn_runtimes
            .values()
            .map(|r| (r.to_string(), 0))
            .collect();
        for (h, (rt, _)) in &self.placed {
            if tracker.is_alive(h) {
                *out.entry(rt.to_string()).or_default() += 1;
            }
        }
        out
    }

    /// Forgets where workers that are gone were spawned (the first fetch pairs a worker with
    /// its app within seconds of its spawn; a minute is ample).
    pub fn prune_placed(&mut self, tracker: &Tracker, now_ns: u64) {
        // A worker the tracker knows and not as alive was dropped with its app: gone. One it
        // does not know yet has not been paired by its first fetch.
        self.placed.retain(|h, (_, t)| {
            tracker.is_alive(h) || (!tracker.knows(h) && now_ns.saturating_sub(*t) < ANSWER_TTL_NS)
        });
    }

    /// Gives up on what waited too long for its other half; sooner when too much waits (a
    /// join that fails for every request must not grow the observer for minutes).
    pub fn housekeeping(&mut self, now_ns: u64) {
        let ttl = |n: usize, long: u64| if n > MAX_PENDING { SHORT_TTL_NS } else { long };
        let before = self.open.len();
        let max_age = ttl(before, OPEN_TTL_NS);
        self.open
            .retain(|_, o| now_ns.saturating_sub(o.start_ns) < max_age);
        self.counters.abandoned_requests += (before - self.open.len()) as u64;
        let open = &self.open;
        self.by_sock.retain(|_, k| open.contains_key(k));
        let before = self.calls.len();
        let max_age = ttl(before, OPEN_TTL_NS);
        self.calls
            .retain(|_, c| now_ns.saturating_sub(c.ktime_ns) < max_age);
        self.counters.unmatched_calls += (before - self.calls.len()) as u64;
        // A request frame's call gone (aged out above) leaves nothing to answer.
        let calls = &self.calls;
        self.in_flight.retain(|_, id| calls.contains_key(id));
        self.sched_errors
            .retain(|_, (_, t)| now_ns.saturating_sub(*t) < SCHED_ERROR_TTL_NS);
    }
}

#[cfg(test)]
mod tests {
    use super::wire::encode::{answer, cancel, request};
    use super::*;
    use observer_common::wire::{RECEIVED, SENT};
    use observer_common::{family, Peer, WIRE_HEAD};

    /// The runtime connection of the tests: its socket and peer.
    const SOCK: u64 = 0xffff_8880_0000_1000;

    fn frame(direction: u32, bytes: Vec<u8>, t: u64) -> RequestEvent {
        let mut head = [0u8; WIRE_HEAD];
        let n = bytes.len().min(WIRE_HEAD);
        head[..n].copy_from_slice(&bytes[..n]);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        RequestEvent::Frame {
            sock: SOCK,
            direction,
            head,
            head_len: n,
            peer: Peer {
                addr,
                port: 9000,
                family: family::INET,
                _pad: 0,
            },
            ktime_ns: t,
        }
    }

    fn failures(r: &Requests, method: &str, reason: &str) -> u64 {
        r.metrics
            .rpc_failures
            .with_label_values(&["127.0.0.1:9000", method, reason])
            .get()
    }

    /// An ended call is known again by its id until another id takes its slot; id 0 (an
    /// unread trace id) never is.
    #[test]
    fn ended_calls_are_remembered_by_slot() {
        let mut e = EndedCalls::new();
        let a: CallId = 0x1234_5678_9abc_def0_0000_0000_0000_0007;
        let same_slot = a + ENDED_SLOTS as CallId;
        assert!(!e.contains(a), "nothing ended yet");
        e.insert(a);
        assert!(e.contains(a), "an ended call is remembered");
        assert!(!e.contains(same_slot), "another id in its slot is not it");
        e.insert(same_slot);
        assert!(
            e.contains(same_slot) && !e.contains(a),
            "the later id takes the slot"
        );
        e.insert(0);
        assert!(!e.contains(0), "id 0 is never remembered");
    }

    /// Calls end on the wire three ways besides an answer: cancelled (deadline or caller gone),
    /// their connection ended, or answered and then cancelled (the caller dropped the answer),
    /// which is one end, not two.
    #[test]
    fn calls_end_by_answer_cancel_or_connection_end() {
        let tracker = Tracker::new(Default::default());
        let mut r = Requests::new();
        let other = |m| RequestEvent::Call {
            call: CallKind::Other { method: m },
            client: 0x10,
            conn: 0x77,
            conn_open: true,
            id: 0,
            ktime_ns: 0,
        };
        let call = |r: &mut Requests, id: CallId, m: u32, t: u64| {
            let mut c = other(m);
            if let RequestEvent::Call {
                id: i, ktime_ns, ..
            } = &mut c
            {
                *i = id;
                *ktime_ns = t;
            }
            r.apply(c, &tracker);
            r.apply(
                frame(SENT, request(id, id as u64, m, None), t + 1),
                &tracker,
            );
        };
        call(&mut r, 1, method::LOAD, 10);
        r.apply(
            frame(RECEIVED, answer(1, method::LOAD, &[0, 3]), 2_000_010),
            &tracker,
        );
        r.apply(frame(SENT, cancel(1, 1), 2_000_020), &tracker);
        call(&mut r, 2, method::LOAD, 20);
        r.apply(frame(SENT, cancel(2, 2), 30), &tracker);
        call(&mut r, 3, method::ID, 40);
        call(&mut r, 4, method::LOAD, 50);
        r.apply(RequestEvent::WireEnd { sock: SOCK }, &tracker);
        // An answer to a request sent before the attach.
        r.apply(
            frame(RECEIVED, answer(77, method::LOAD, &[0, 3]), 60),
            &tracker,
        );
        let d = r
            .metrics
            .rpc_duration
            .vec()
            .with_label_values(&["127.0.0.1:9000", "load"]);
        assert_eq!(d.get_sample_count(), 1, "one answered");
        assert!(
            (d.get_sample_sum() - 0.002).abs() < 1e-9,
            "from the call to its answer"
        );
        assert_eq!(failures(&r, "load", "no_answer"), 1, "one cancelled");
        assert_eq!(failures(&r, "load", "connection_reset"), 1);
        assert_eq!(failures(&r, "id", "connection_reset"), 1);
        assert_eq!(r.open_calls(), 0);
        assert_eq!(
            r.counters.unmatched_calls, 1,
            "only the answer from before the attach"
        );
        assert_eq!(r.instances_by_runtime(&tracker).len(), 1);
        // Frames that are not tarpc's are counted, never joined.
        r.apply(frame(RECEIVED, b"HTTP/1.1 200 OK".to_vec(), 70), &tracker);
        r.apply(frame(SENT, vec![9, 9], 70), &tracker);
        assert_eq!(r.counters.undecoded_frames, 2);
    }

    /// A call on a connection whose dispatch task has ended never reaches the wire: it fails
    /// at once, under the runtime its connection went to. Calls queued for the dispatch task
    /// when the connection ends fail with it.
    #[test]
    fn calls_on_an_ended_connection_fail_without_a_frame() {
        let tracker = Tracker::new(Default::default());
        let mut r = Requests::new();
        let call = |id: CallId, open: bool, t: u64| RequestEvent::Call {
            call: CallKind::Other {
                method: method::LOAD,
            },
            client: 0x10,
            conn: 0x77,
            conn_open: open,
            id,
            ktime_ns: t,
        };
        r.apply(call(1, true, 1), &tracker);
        r.apply(frame(SENT, request(1, 1, method::LOAD, None), 2), &tracker);
        r.apply(call(2, true, 3), &tracker);
        r.apply(RequestEvent::WireEnd { sock: SOCK }, &tracker);
        assert_eq!(
            failures(&r, "load", "connection_reset"),
            2,
            "in flight and queued"
        );
        r.apply(call(3, false, 4), &tracker);
        assert_eq!(failures(&r, "load", "no_answer"), 1, "a call after the end");
        assert_eq!(r.open_calls(), 0);
        assert_eq!(r.counters.unmatched_calls, 0);
    }

    /// A spawn's answer places the worker on the runtime it went to; an `id` answer names the
    /// runtime's id.
    #[test]
    fn answers_place_workers_and_name_runtimes() {
        let tracker = Tracker::new(Default::default());
        let mut r = Requests::new();
        let handle = b"0123456789abcdef0123456789abcdef";
        r.apply(
            RequestEvent::Call {
                call: CallKind::Spawn {
                    app: Bytes::new("app1"),
                },
                client: 0x10,
                conn: 0x77,
                conn_open: true,
                id: 5,
                ktime_ns: 1,
            },
            &tracker,
        );
        r.apply(
            frame(SENT, request(5, 0, method::SPAWN_WORKER, None), 2),
            &tracker,
        );
        let spawned = [[0u8].as_slice(), &super::wire::encode::string(handle)].concat();
        r.apply(
            frame(RECEIVED, answer(0, method::SPAWN_WORKER, &spawned), 3),
            &tracker,
        );
        assert_eq!(
            r.placed
                .get(&Bytes::new(std::str::from_utf8(handle).unwrap()))
                .map(|p| &*p.0),
            Some("127.0.0.1:9000")
        );
        r.apply(
            RequestEvent::Call {
                call: CallKind::Other { method: method::ID },
                client: 0x10,
                conn: 0x77,
                conn_open: true,
                id: 6,
                ktime_ns: 4,
            },
            &tracker,
        );
        r.apply(frame(SENT, request(6, 1, method::ID, None), 5), &tracker);
        let id = super::wire::encode::string(b"rt-one");
        r.apply(frame(RECEIVED, answer(1, method::ID, &id), 6), &tracker);
        assert_eq!(
            r.runtime_ids.get("127.0.0.1:9000").map(String::as_str),
            Some("rt-one")
        );
    }

    #[test]
    fn outcomes_follow_the_proxy() {
        use FetchEnd::*;
        let cases = [
            (None, Some(Ok), "ok"),
            (None, None, "internal_error"),
            (None, Some(Transport), "internal_error"),
            (Some(0), None, "no_instance"),
            (Some(0), Some(NoSuchWorker), "no_instance"),
            (Some(1), None, "no_route"),
            (Some(2), None, "body_too_large"),
            (Some(3), Some(ExecutionError), "execution_error"),
            (Some(3), Some(NoSuchWorker), "retries_exhausted"),
            (Some(3), Some(Transport), "retries_exhausted"),
            (Some(9), None, "internal_error"),
        ];
        for (e, f, want) in cases {
            assert_eq!(outcome_of(e, f), want, "{e:?} {f:?}");
            assert!(OUTCOMES.contains(&want));
        }
    }

    /// Before the call distance is known, a call with two requests in flight belongs to one of
    /// them: neither is counted (rather than one wrongly as an internal error).
    #[test]
    fn requests_that_may_have_lost_a_call_are_not_counted() {
        let tracker = Tracker::new(Default::default());
        let mut r = Requests::new();
        for key in [0x1000u64, 0x9000] {
            r.apply(start(key, 1), &tracker);
        }
        r.apply(fetch(0x1000 + 0x608, 0, 2), &tracker);
        assert_eq!(r.counters.unattributed_calls, 1);
        for key in [0x1000u64, 0x9000] {
            r.apply(response(key, 3), &tracker);
        }
        assert_eq!(r.open_requests(), 0);
        assert_eq!(r.counters.unmatched_responses, 2);
        assert!(r.metrics.apps.is_empty());
    }

    /// A warm request on a worker whose spawn waits to be paired (concurrent cold starts
    /// while the tracker learns its distance) names no app when its fetch is sent: it is
    /// counted under its worker's app once the tracker pairs it, never under none.
    #[test]
    fn requests_on_a_worker_not_yet_paired_take_its_app_once_paired() {
        use crate::decode::Decoded;
        let mut tracker = Tracker::new(Default::default());
        for (client, app) in [(0x1000, "app1"), (0x5000, "app2")] {
            tracker.apply(Decoded::Spawn {
                client,
                app: Bytes::new(app),
                ktime_ns: 1,
            });
        }
        let h1 = Bytes::new("h1");
        tracker.apply(Decoded::FetchUnknown {
            client: 0x1100,
            handle: h1.clone(),
            ktime_ns: 2,
        });
        assert!(tracker.awaits_pairing(&h1));
        let mut r = Requests::new();
        let warm = |r: &mut Requests, i: u64, respond: bool| {
            let key = 0x7f00_0000_0000u64 + i * 0x10000;
            r.apply(start(key, 10 * i), &tracker);
            let call = RequestEvent::Call {
                call: CallKind::FetchUnknown { handle: h1.clone() },
                client: key + 0x608,
                conn: 0x77,
                conn_open: true,
                id: i.into(),
                ktime_ns: 10 * i + 1,
            };
            r.apply(call, &tracker);
            if respond {
                r.apply(response(key, 10 * i + 2), &tracker);
            }
        };
        warm(&mut r, 1, true); // ended before the pairing: waits
        warm(&mut r, 2, false); // still open at the pairing
        assert_eq!(r.parked_responses(), 1);
        assert!(r.metrics.apps.is_empty(), "nothing counted under no app");
        r.paired_late(&h1, "app1");
        assert_eq!(r.parked_responses(), 0);
        let key2 = 0x7f00_0000_0000u64 + 2 * 0x10000;
        r.apply(response(key2, 30), &tracker);
        assert_eq!(r.metrics.apps["app1"].duration.count(), 2);
        assert!(!r.metrics.apps.contains_key(""));
        // A worker the tracker gave up pairing: its response goes under no app.
        warm(&mut r, 3, true);
        assert_eq!(r.parked_responses(), 1);
        tracker.housekeeping(3 + crate::model::tracker::Config::default().pending_ttl_ns);
        r.settle_parked(&tracker);
        assert_eq!(r.parked_responses(), 0);
        assert_eq!(r.metrics.apps[""].duration.count(), 1);
    }

    /// A response ends the open request whose head came in on its connection; one on a
    /// connection no open request came in on (another server of the process, or a request
    /// from before the attach) is nobody's and counts nowhere; one for a request that may
    /// have lost a call is counted as unmatched.
    #[test]
    fn responses_end_the_request_of_their_connection() {
        let tracker = Tracker::new(Default::default());
        let mut r = Requests::new();
        r.apply(start(0x1000, 1), &tracker);
        r.apply(start(0x2000, 2), &tracker);
        r.apply(
            RequestEvent::Response {
                sock: 0xdead,
                status: 200,
                tid: 1,
                ktime_ns: 3,
            },
            &tracker,
        );
        assert_eq!(
            r.open_requests(),
            2,
            "a stranger's response ends no request"
        );
        assert_eq!(r.counters.unmatched_responses, 0);
        let interim = RequestEvent::Response {
            sock: sock_of(0x2000),
            status: 100,
            tid: 1,
            ktime_ns: 3,
        };
        r.apply(interim, &tracker);
        assert_eq!(r.open_requests(), 2, "100 Continue is not the end");
        r.apply(response(0x2000, 4), &tracker);
        assert_eq!(r.open_requests(), 1, "the second request ended");
        assert_eq!(r.metrics.apps[""].duration.count(), 1);
        r.apply(response(0x2000, 5), &tracker);
        assert_eq!(
            r.open_requests(),
            1,
            "its connection's next response is no one's"
        );
        // A new request on the first one's connection: the old one never saw its response.
        let again = RequestEvent::Start {
            key: 0x3000,
            sock: sock_of(0x1000),
            ktime_ns: 6,
        };
        r.apply(again, &tracker);
        r.apply(response(0x1000, 7), &tracker);
        assert_eq!(
            r.open_requests(),
            1,
            "the old request stays open, to expire"
        );
        assert_eq!(r.metrics.apps[""].duration.count(), 2);
    }

    #[test]
    fn too_many_waiting_requests_age_out_sooner() {
        let tracker = Tracker::new(Default::default());
        let mut r = Requests::new();
        for i in 0..MAX_PENDING as u64 + 1 {
            r.apply(start(8 * i + 8, i), &tracker);
        }
        r.housekeeping(SHORT_TTL_NS - 1);
        assert_eq!(r.open_requests(), MAX_PENDING + 1, "young ones stay");
        r.housekeeping(SHORT_TTL_NS + MAX_PENDING as u64 + 1);
        assert_eq!(r.open_requests(), 0);
        assert_eq!(r.counters.abandoned_requests, MAX_PENDING as u64 + 1);
    }

    #[test]
    fn learner_takes_the_distance_in_every_sample() {
        let mut l = Learner::default();
        // Noise comes and goes; 0x608 is in every sample.
        for i in 0..MIN_VOTES - 1 {
            assert_eq!(l.vote(&[0x608, 0x1000 + i as i64 * 8]), None);
        }
        // Empty samples (a request whose start was missed) do not count.
        assert_eq!(l.vote(&[]), None);
        assert_eq!(l.vote(&[0x608, 0x608, -0x40]), Some(0x608));
        // Once known, it stays.
        assert_eq!(l.vote(&[5]), Some(0x608));
    }

    #[test]
    fn learner_prefers_the_nearest_of_consistent_distances() {
        // Connections of 1920 bytes side by side, all busy: the true offset 536 and its
        // neighbours' 536 + 1920 and 536 - 1920 are in every sample.
        let mut l = Learner::default();
        for _ in 0..MIN_VOTES {
            l.vote(&[536 - 1920, 536, 536 + 1920]);
        }
        assert_eq!(l.known(), Some(536));
    }

    #[test]
    fn learner_prefers_the_distance_seen_most() {
        let mut l = Learner::default();
        for i in 0..MIN_VOTES {
            // 536 in every sample, 120 in 7 of 8.
            let near = if i == 3 { 8 } else { 120 };
            l.vote(&[near, 536]);
        }
        assert_eq!(l.known(), Some(536));
    }

    #[test]
    fn learner_tolerates_a_missed_sample_and_restarts_on_noise() {
        let mut l = Learner::default();
        for i in 0..MIN_VOTES - 1 {
            l.vote(&[100, i as i64]);
        }
        // One sample without the true distance (7 of 8 is enough).
        assert_eq!(l.vote(&[7, 9]), Some(100));
        let mut noise = Learner::default();
        for i in 0..8 * MIN_VOTES {
            assert_eq!(noise.vote(&[i as i64 * 8]), None);
        }
        assert_eq!((noise.samples, noise.votes.len()), (0, 0), "started over");
    }

    /// The client connection a test request's head comes in on.
    fn sock_of(key: u64) -> u64 {
        key ^ 0x0000_5555_0000_0000
    }

    fn start(key: u64, t: u64) -> RequestEvent {
        RequestEvent::Start {
            key,
            sock: sock_of(key),
            ktime_ns: t,
        }
    }

    /// A fetch on app slot 0 (`other`) from the client at `client`.
    fn fetch(client: u64, id: CallId, t: u64) -> RequestEvent {
        RequestEvent::Call {
            call: CallKind::Fetch {
                slot: 0,
                handle: Bytes::new(""),
            },
            client,
            conn: 0x77,
            conn_open: true,
            id,
            ktime_ns: t,
        }
    }

    /// The response head of the request `key`, on its connection.
    fn response(key: u64, t: u64) -> RequestEvent {
        RequestEvent::Response {
            sock: sock_of(key),
            status: 200,
            tid: 1,
            ktime_ns: t,
        }
    }

    /// Lone requests, one after another: the call distance is learnt, and every request is
    /// measured with its app, outcome and start.
    #[test]
    fn joins_lone_requests_and_learns() {
        let tracker = Tracker::new(Default::default());
        let mut r = Requests::new();
        let n = 2 * MIN_VOTES as u64 + 2;
        for i in 0..n {
            let key = 0x7f00_0000_0000u64 + i * 0x10000;
            let t = i * 1_000_000_000;
            r.apply(start(key, t), &tracker);
            r.apply(fetch(key + 0x608, i.into(), t + 1000), &tracker);
            let fail = i % 2 == 1;
            r.apply(
                frame(SENT, request(i.into(), i, method::FETCH, None), t + 2000),
                &tracker,
            );
            // A fetch's `Ok(ResponseObject)`, or `Err(ExecutionError::RuntimeThrowsException)`.
            let result: &[u8] = if fail { &[1, 1] } else { &[0] };
            r.apply(
                frame(RECEIVED, answer(i, method::FETCH, result), t + 5_000_000),
                &tracker,
            );
            if fail {
                let error = RequestEvent::SchedError {
                    tid: 1,
                    error: 3,
                    ktime_ns: t + 5_200_000,
                };
                r.apply(error, &tracker);
            }
            r.apply(response(key, t + 6_000_000), &tracker);
        }
        assert!(r.learnt().iter().take(1).all(|(_, k)| *k));
        assert_eq!(r.counters, JoinCounters::default());
        // The fetches name app slot 0: `other`.
        let other = &r.metrics.apps["other"];
        let (ok, err) = (other.responses[0], other.responses[1]);
        assert_eq!((OUTCOMES[0], OUTCOMES[1]), ("ok", "execution_error"));
        assert_eq!((ok, err), (n / 2, n / 2));
        assert_eq!(other.duration.count(), n);
        assert_eq!(other.starts, [0, n]);
        assert_eq!(
            r.metrics
                .rpc_failures
                .with_label_values(&["127.0.0.1:9000", "fetch", "error_answer"])
                .get(),
            n / 2
        );
        assert_eq!(
            r.metrics
                .rpc_duration
                .vec()
                .with_label_values(&["127.0.0.1:9000", "fetch"])
                .get_sample_count(),
            n
        );
    }
}
