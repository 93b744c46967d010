//! The apps: loads, evictions (changed, capacity), instances, RPC counts, each EQUAL to
//! ground truth; and the request-path budget.

use crate::fixture::*;
use std::time::Duration;
use testbed_harness::{load, truth_u64, App, Options, Testbed};

#[test]
fn metrics_equal_ground_truth() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (1..=5).map(|i| App::new(&format!("app-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        load_interval_ms: 0,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);
    // Without request metrics: the metrics that do not need them, and the request-path budget.
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, true);
    let t0 = tb.truth();

    // N requests over K apps from 8 concurrent clients: concurrent cold starts included.
    let n = 1000;
    let paths: Vec<String> = (0..n)
        .map(|i| format!("{}/r{i}", apps[(i * 7 + i / 3) % apps.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 8), n);

    // Change one app: the proxy's gc evicts it from the app cache.
    let mut changed = apps.clone();
    changed[1].bundle_id = "v2".into();
    tb.set_apps(&changed);
    wait_until("the eviction of app-2", 15, || {
        truth_u64(&tb.truth(), &["apps", "app-2", "evictions"]) == 1
    });

    // Let pooled instances expire, then touch every app: the gc terminates expired instances.
    std::thread::sleep(Duration::from_millis(
        opts.ready_instance_expiration_ms + 500,
    ));
    let touch: Vec<String> = apps
        .iter()
        .flat_map(|a| [format!("{}/t1", a.prefix), format!("{}/t2", a.prefix)])
        .collect();
    all_ok(&load(tb.http, &touch, 1), touch.len());
    let truth = tb.settled_truth();
    let settled = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let m = scrape_after_snapshot(&obs, settled);

    let checked = assert_metrics_equal_truth(&m, &truth, &t0, &apps);
    obs.lint();
    // Without request metrics: at most 2 runs per request in steady state: the fetch is one; spawns,
    // terminations and loads are the rest.
    let runs = bpf_runs_per_request(&m, &truth);
    assert!(runs <= 2.0, "{runs} BPF runs per request");
    let terminations: u64 = apps
        .iter()
        .map(|a| truth_u64(&truth, &["apps", &a.id, "terminations"]))
        .sum();
    assert!(
        terminations > 0,
        "the scenario must produce terminations: {truth}"
    );
    eprintln!(
        "e2e: {checked} series equal ground truth; {} requests, {} spawns, {terminations} terminations, {runs:.3} BPF runs per request",
        truth_u64(&truth, &["rpc_calls", "fetch"]),
        truth_u64(&truth, &["rpc_calls", "spawn_worker"]),
    );
    obs.stop(2);
}

#[test]
fn capacity_evictions_equal_ground_truth() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Six apps through an app cache of three: every new app pushes out the least recently used.
    let apps: Vec<App> = (1..=6).map(|i| App::new(&format!("cap-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        app_cache_size: 3,
        load_interval_ms: 0,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);
    // With request metrics on: the metrics that do not need them are the same.
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let t0 = tb.truth();
    for round in 0..3 {
        // Sequential sweeps (each app reloaded after being pushed out) then a concurrent mix.
        let sweep: Vec<String> = apps
            .iter()
            .map(|a| format!("{}/s{round}", a.prefix))
            .collect();
        all_ok(&load(tb.http, &sweep, 1), sweep.len());
        // A cache this small thrashes: an app can be pushed out between its load and the
        // request's second look-up, which rusty-workers answers 502. Not every request succeeds.
        let mix: Vec<String> = (0..300)
            .map(|i| format!("{}/m{i}", apps[(i * 5 + round) % apps.len()].prefix))
            .collect();
        let statuses = load(tb.http, &mix, 6);
        assert!(
            statuses.get(&200).copied().unwrap_or(0) * 10 >= mix.len() * 9,
            "{statuses:?}"
        );
    }
    let truth = tb.settled_truth();
    let settled = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let m = scrape_after_snapshot(&obs, settled);
    let capacity: u64 = apps
        .iter()
        .map(|a| truth_u64(&truth, &["apps", &a.id, "capacity_evictions"]))
        .sum();
    assert!(capacity > 0, "the scenario must evict by capacity: {truth}");
    let checked = assert_metrics_equal_truth(&m, &truth, &t0, &apps);
    eprintln!("e2e: {checked} series equal ground truth; {capacity} capacity evictions");
    obs.stop(15);
}
