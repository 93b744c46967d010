//! The daemon: loads the programs, follows the processes, drains events into the model and
//! serves it (`http`).

use crate::cli::{load_catalog, RunArgs};
use crate::http::bind;
use crate::lifecycle::Lifecycle;
use crate::preflight::{check_proxy, preflight};
use anyhow::{bail, Context as _};
use observer::catalog::Catalog;
use observer::model::Model;
use observer::model::{requests, tracker};
use observer::snapshots::Snapshots;
use observer::target::Target;
use observer::{kernel, monotonic_ns, procs};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub(crate) async fn run(a: RunArgs) -> anyhow::Result<()> {
    if a.pid.is_none() && a.exe.is_none() {
        bail!("missing --pid <PID> of the rusty-workers proxy, or --exe NAME to find it by its executable's name (or use `observer probes`); see --help");
    }
    let catalog = load_catalog(a.catalog.as_deref())?;
    // The runtimes' uprobes count polls only (`--runtime-polls`); their served calls come from
    // their wire, in the socket tracepoints.
    let runtime_catalog = if !a.runtime_polls {
        None
    } else {
        Some(match &a.runtime_catalog {
            None => Catalog::builtin_runtime(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading runtime catalog {}", p.display()))?;
                Catalog::parse(&text, &p.display().to_string())?
            }
        })
    };
    // Privileges first: without them the target's /proc entries cannot be read either, and the
    // message would blame the PID.
    preflight()?;
    if let Some(pid) = a.pid {
        check_proxy(pid, &catalog)?;
    }
    for &pid in &a.runtime_pid {
        Target::open(pid).context("--runtime-pid")?;
    }
    let listener = bind(a.listen).await?;

    let floor = if a.floor_probe_set {
        kernel::Floor::ProbeSet
    } else if a.floor {
        kernel::Floor::OneUprobe
    } else {
        kernel::Floor::Off
    };
    // The probe-set floor's tracepoints count bytes only: none of the default's work.
    let request_metrics = !a.no_request_metrics && floor != kernel::Floor::ProbeSet;
    let mut kernel = kernel::Kernel::load(
        &catalog.layout,
        request_metrics,
        !a.no_runtime_probes,
        floor,
        a.ring_bytes,
        a.bpf_stats,
    )?;
    kernel.attach_tracepoints()?;
    let kernel::Maps {
        events,
        handles: mut handle_map,
        watched,
        counters,
        logger,
    } = kernel.take_maps()?;
    drain_ebpf_log(logger)?;
    let counters = Arc::new(counters);
    let kernel = Arc::new(Mutex::new(Some(kernel)));
    let shared = Arc::new(Mutex::new(Model::new(
        tracker::Tracker::new(tracker::Config {
            max_apps: a.max_apps as usize,
            ..Default::default()
        }),
        request_metrics.then(requests::Requests::new),
        procs::Watcher::new(procs::Config {
            proxy_pid: a.pid,
            proxy_exe: a.exe.clone(),
            runtime_exe: a.runtime_exe.clone(),
            runtime_pids: a.runtime_pid.clone(),
            runtime_peers: !a.no_runtime_peers,
        }),
    )));
    let snaps = Snapshots::default();
    let mut life = Lifecycle {
        catalog,
        runtime_catalog,
        runtime_symbols: HashMap::new(),
        runtime_failures_logged: false,
        kernel: kernel.clone(),
        watched,
        counters: counters.clone(),
        started: std::time::Instant::now(),
        snapshots: snaps.clone(),
        host: procs::ProcHost::default(),
    };
    life.tick(&shared);
    if let Some(pid) = a.pid {
        let k = kernel.lock().unwrap();
        if k.as_ref().is_some_and(|k| k.uprobes_attached(pid) == 0) {
            bail!("no probe could be attached to PID {pid}");
        }
    } else if shared.lock().unwrap().watcher.proxy().is_none() {
        log::info!(
            "no process named like {:?} yet: waiting for the proxy",
            a.exe.as_deref().unwrap_or_default()
        );
    }

    // Events: decode, update the model, push handle -> app slots back into the kernel.
    let loop_shared = shared.clone();
    // The first snapshot (taken at the attach) is merged before the first scrape can come.
    let mut events = events;
    drain(&mut events, &shared, &mut handle_map, &snaps);
    // SAFETY: the AsyncFd owns the RingBuf, which owns the fd: it stays open while registered.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let drain_ms = a.drain_interval_ms;
    snaps
        .spawn(Duration::from_millis(a.state_interval_ms))
        .context("starting the snapshot thread")?;
    let state_max_age_ns = (2 * a.state_interval_ms).max(1000) * 1_000_000;
    let loop_snaps = snaps.clone();
    let event_loop = tokio::spawn(async move {
        let snaps = loop_snaps;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // The probes submit without waking us (one wakeup per event would cost the proxy more
        // than the event): drain in batches.
        let mut drain_tick = tokio::time::interval(Duration::from_millis(drain_ms));
        drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = drain_tick.tick() => {
                    drain(events.get_mut(), &loop_shared, &mut handle_map, &snaps);
                }
                guard = events.readable_mut() => {
                    let mut guard = match guard {
                        Ok(g) => g,
                        Err(e) => {
                            // Without events the metrics would silently freeze: stop instead
                            // (exiting closes every link, so nothing stays attached).
                            log::error!("polling the ring buffer failed: {e}; exiting");
                            std::process::exit(1);
                        }
                    };
                    drain(guard.get_inner_mut(), &loop_shared, &mut handle_map, &snaps);
                    guard.clear_ready();
                }
                _ = tick.tick() => {
                    // Events of a proxy that just ended belong to its state, not its successor's.
                    drain(events.get_mut(), &loop_shared, &mut handle_map, &snaps);
                    life.tick(&loop_shared);
                    let now = monotonic_ns();
                    let mut s = loop_shared.lock().unwrap();
                    s.tracker.housekeeping(now);
                    let s = &mut *s;
                    if let Some(q) = s.requests.as_mut() {
                        q.housekeeping(now);
                        q.prune_placed(&s.tracker, now);
                        q.settle_parked(&s.tracker);
                    }
                }
            }
        }
    });

    crate::http::serve(
        listener,
        a.listen,
        crate::http::Sources {
            model: shared.clone(),
            kernel: kernel.clone(),
            counters,
            snapshots: snaps.clone(),
            state_max_age_ns,
        },
    )
    .await?;
    event_loop.abort();
    // Dropping the object closes the links: the kernel removes every uprobe.
    let detached = kernel
        .lock()
        .unwrap()
        .take()
        .map(|k| k.uprobes_attached_total());
    log::info!("detached {} uprobe sites; bye", detached.unwrap_or(0));
    Ok(())
}

/// Writes the programs' aya-log records into the observer's log as they come (their ring buffer
/// wakes the reader; the programs log only rare paths).
pub(crate) fn drain_ebpf_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the logger, which owns the ring buffer's fd: it stays open
    // while registered.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .context("polling the eBPF log ring buffer")?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    log::warn!("the eBPF log ring buffer failed: {e}; its records are lost");
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Applies every event waiting in the ring buffer, then pushes what the model learnt back into
/// the kernel's maps.
pub(crate) fn drain(
    rb: &mut aya::maps::RingBuf<aya::maps::MapData>,
    shared: &Mutex<Model>,
    handle_map: &mut aya::maps::HashMap<aya::maps::MapData, observer_common::HandleKey, u32>,
    snaps: &Snapshots,
) {
    // Snapshots whose walk ended before this drain began: merged after its events, so that
    // every event of what they saw is applied first.
    let outcomes = snaps.take_outcomes();
    // When a worker was let go is not in the event: the drain's start is later, which only
    // keeps a snapshot from bringing it back (see Tracker::merge_snapshot).
    let now = monotonic_ns();
    let ops = {
        let mut guard_s = shared.lock().unwrap();
        let s = &mut *guard_s;
        while let Some(rec) = rb.next() {
            s.apply(&rec, now);
        }
        for (o, learnt) in outcomes {
            if let Some((snap, taken_ns)) = s.state.record(o, learnt) {
                s.tracker.merge_snapshot(&snap, taken_ns);
            }
        }
        s.tracker.take_map_ops()
    };
    for op in ops {
        let res = match op {
            tracker::MapOp::Insert(k, slot) => handle_map.insert(k, slot, 0),
            tracker::MapOp::Remove(k) => handle_map.remove(&k),
        };
        if let Err(e) = res {
            log::debug!("handle map update: {e}");
        }
    }
}
