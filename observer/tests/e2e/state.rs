//! The proxy's state read from its memory: attaching late, and snapshots racing load.

use crate::fixture::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use testbed_harness::{load, truth_u64, App, Options, Testbed, APP_COUNTERS};

/// A series' value, or `None` when not exported.
fn opt(m: &BTreeMap<String, f64>, series: &str) -> Option<f64> {
    m.get(series).copied()
}

/// The ground truth of the scheduler's state (apps cached, each app's pool), for comparing
/// truths read before and after a scrape.
fn state_of(t: &Value, apps: &[App]) -> (u64, Vec<Option<u64>>, Vec<u64>) {
    (
        truth_u64(t, &["apps_cached"]),
        apps.iter()
            .map(|a| t["apps"][a.id.as_str()]["pooled"].as_u64())
            .collect(),
        apps.iter()
            .map(|a| truth_u64(t, &["apps", &a.id, "instances_alive"]))
            .collect(),
    )
}

/// Sums the series of a family whose labels include `app=""` (requests that never named an
/// app).
fn unnamed(m: &BTreeMap<String, f64>, family: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(family) && k.contains("app=\"\""))
        .map(|(_, v)| v)
        .sum()
}

/// Apps loaded, instances pooled by concurrent traffic and requests in flight, THEN the
/// observer attaches: its first scrape's apps_loaded and ready instances equal the proxy's own
/// (read under its locks, as the 2021 exporter read them), and every later per-app counter
/// grows exactly as ground truth's, with nothing of an app under `app=""`.
fn attached_late_the_state_is_exact(profile: &'static str) {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let missing = unresolved_probes(profile);
    let delay_ms = 8000;
    let mut apps: Vec<App> = (1..=5)
        .map(|i| App::new(&format!("late-{profile}-{i}")))
        .collect();
    apps.push(App::slow(&format!("late-{profile}-slow"), delay_ms));
    let slow = apps.len() - 1;
    let opts = Options {
        apps: apps.clone(),
        load_interval_ms: 0,
        // Pools stay as the traffic left them: nothing expires or drops out meanwhile.
        ready_instance_expiration_ms: 600_000,
        dropout_rate: 0.0,
        max_ready_instances_per_app: 8,
        profile,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);

    // Before the attach: 600 requests from 8 clients over the five fast apps.
    let fast = &apps[..slow];
    let paths: Vec<String> = (0..600)
        .map(|i| format!("{}/before{i}", fast[(i * 7 + i / 3) % fast.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 8), paths.len());
    // And three requests in flight on the slow app (its script holds each for 8 s).
    let http = tb.http;
    let slow_paths: Vec<String> = (0..3)
        .map(|i| format!("{}/inflight{i}", apps[slow].prefix))
        .collect();
    let inflight = std::thread::spawn(move || load(http, &slow_paths, 3));
    wait_until("three fetches in flight on the slow app", 10, || {
        truth_u64(&tb.truth(), &["apps", &apps[slow].id, "requests"]) == 3
    });

    // THEN the attach, and its first scrape, between two readings of ground truth.
    let before = tb.truth();
    let obs = Observer::start_missing(tb.proxy_pid(), &tb.dir, false, &[], &missing);
    let first = obs.scrape();
    let after = tb.truth();
    assert!(
        !inflight.is_finished(),
        "the slow requests must still be in flight at the first scrape (the attach took too long)"
    );
    let (cached, pooled, alive) = state_of(&after, &apps);
    assert_eq!(
        state_of(&before, &apps),
        (cached, pooled.clone(), alive.clone()),
        "the proxy's state is still while the observer attaches and scrapes"
    );
    let mut table = vec![format!(
        "first scrape ({profile}): apps_loaded {:?}, ground truth apps.len() {cached}",
        opt(&first, "rusty_workers_apps_loaded")
    )];
    assert_eq!(
        opt(&first, "rusty_workers_apps_loaded"),
        Some(cached as f64),
        "apps_loaded at the first scrape\n{}",
        observer_self(&first)
    );
    assert_eq!(cached, apps.len() as u64, "every app is in the app cache");
    let instances_exported = has_family(&first, "app_instances");
    for (i, a) in apps.iter().enumerate() {
        let ready = opt(
            &first,
            &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id),
        );
        let held = opt(
            &first,
            &format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id),
        );
        table.push(format!(
            "  {}: ready_instances {ready:?} (truth pooled {:?}), instances {held:?} (truth alive {})",
            a.id, pooled[i], alive[i]
        ));
        assert_eq!(
            ready,
            pooled[i].map(|p| p as f64),
            "{}: ready instances\n{}",
            a.id,
            observer_self(&first)
        );
        if instances_exported {
            // The instances held by the requests in flight at the attach are in no pool: they
            // are counted when they come back to it (below).
            let in_use = if i == slow { 3 } else { 0 };
            assert_eq!(
                held,
                Some((alive[i] - in_use) as f64),
                "{}: instances",
                a.id
            );
        }
    }
    assert!(
        pooled[..slow].iter().all(|p| p.unwrap_or(0) > 0),
        "pools filled: {pooled:?}"
    );
    // The pools by runtime, by its RuntimeId.
    let by_runtime = after["pooled_by_runtime"]
        .as_object()
        .expect("pooled by runtime");
    for (rt, n) in by_runtime {
        let series = format!("rusty_workers_runtime_ready_instances{{runtime_id=\"{rt}\"}}");
        assert_eq!(opt(&first, &series), n.as_f64(), "{series}");
    }
    let first_lines = table.len() + by_runtime.len();
    for (rt, n) in by_runtime {
        let series = format!("rusty_workers_runtime_ready_instances{{runtime_id=\"{rt}\"}}");
        table.push(format!(
            "  {series}: {:?} (truth {n})",
            opt(&first, &series)
        ));
    }
    eprintln!("{}", table.join("\n"));

    // The requests in flight end; their instances go back to the pool and are adopted.
    all_ok(&inflight.join().expect("in-flight requests"), 3);
    let t0 = tb.settled_truth();
    wait_until("the slow app's instances back in a snapshot", 5, || {
        opt(
            &obs.scrape(),
            &format!(
                "rusty_workers_app_ready_instances{{app=\"{}\"}}",
                apps[slow].id
            ),
        ) == Some(3.0)
    });
    let m0 = obs.scrape();

    // N more requests over every app (the slow one's three concurrently, the rest from 8
    // clients, then 16 at once on one app: cold starts past its pool), after one app changed
    // (the proxy evicts it, the next request loads it again): every per-app counter grows as
    // ground truth's.
    let mut changed = apps.clone();
    changed[0].bundle_id = "v2".into();
    tb.set_apps(&changed);
    wait_until("the changed app's eviction", 15, || {
        truth_u64(&tb.truth(), &["apps", &apps[0].id, "evictions"]) == 1
    });
    let http = tb.http;
    let slow_paths: Vec<String> = (0..3)
        .map(|i| format!("{}/after{i}", apps[slow].prefix))
        .collect();
    let slow_load = std::thread::spawn(move || load(http, &slow_paths, 3));
    let paths: Vec<String> = (0..500)
        .map(|i| format!("{}/after{i}", fast[(i * 3 + i / 5) % fast.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 8), paths.len());
    let burst: Vec<String> = (0..64)
        .map(|i| format!("{}/burst{i}", fast[1].prefix))
        .collect();
    all_ok(&load(tb.http, &burst, 16), burst.len());
    all_ok(&slow_load.join().expect("slow requests"), 3);
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(1200));
    let m1 = obs.scrape();
    let mut compared = 0;
    for a in &apps {
        for (metric, field) in APP_COUNTERS {
            let series = format!("rusty_workers_{}", metric.replace("{}", &a.id));
            let family = metric.split('{').next().unwrap();
            if !has_family(&m1, family) {
                assert!(
                    !missing.is_empty(),
                    "{family} is withheld on the release build\n{}",
                    observer_self(&m1)
                );
                continue;
            }
            let got = delta(&m1, &m0, &series);
            let want = truth_delta(&t1, &t0, &a.id, &[field]);
            assert_eq!(
                got,
                want,
                "{series} grew by {got}, ground truth by {want}\n{}",
                observer_self(&m1)
            );
            if want > 0 {
                table.push(format!("  {series}: +{got} (ground truth +{want})"));
            }
            compared += 1;
        }
        let (cached, pooled, alive) = state_of(&t1, std::slice::from_ref(a));
        assert_eq!(cached, apps.len() as u64);
        assert_eq!(
            opt(
                &m1,
                &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id)
            ),
            pooled[0].map(|p| p as f64),
            "{}: ready instances after the requests",
            a.id
        );
        if instances_exported {
            assert_eq!(
                opt(
                    &m1,
                    &format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id)
                ),
                Some(alive[0] as f64),
                "{}: instances after the requests\n{}",
                a.id,
                observer_self(&m1)
            );
        }
    }
    for family in [
        "rusty_workers_app_responses_total",
        "rusty_workers_app_request_duration_seconds_count",
        "rusty_workers_app_requests_total",
    ] {
        let grew = unnamed(&m1, family) - unnamed(&m0, family);
        assert_eq!(
            grew,
            0.0,
            "{family}{{app=\"\"}} grew by {grew}: a request of an app went unnamed\n{}",
            observer_self(&m1)
        );
    }
    assert_eq!(
        delta(
            &m1,
            &m0,
            "rusty_workers_observer_unattributed_requests_total"
        ),
        0,
        "every request attributed\n{}",
        observer_self(&m1)
    );
    eprintln!("{}", table[first_lines..].join("\n"));
    let adopted = opt(
        &m1,
        "rusty_workers_observer_state_corrections_total{kind=\"instance_adopted\"}",
    );
    eprintln!(
        "attach late ({profile}): {compared} per-app counters grew as ground truth's over {} requests; snapshot: {:?} s, {:?} bytes, {adopted:?} instances adopted",
        truth_u64(&t1, &["rpc_calls", "fetch"]) - truth_u64(&t0, &["rpc_calls", "fetch"]),
        opt(&m1, "rusty_workers_observer_state_snapshot_duration_seconds"),
        opt(&m1, "rusty_workers_observer_state_snapshot_bytes"),
    );
    assert!(compared > 0, "some counters compared");
    obs.lint();
}

#[test]
fn attached_late_the_state_is_exact_from_the_first_scrape() {
    attached_late_the_state_is_exact(testbed_harness::RELEASE);
}

#[test]
fn attached_late_to_the_fat_lto_build_the_state_is_exact() {
    attached_late_the_state_is_exact("release-fat-lto");
}

/// Snapshots every 50 ms race 16 clients and apps changing under them (each change evicts an
/// app and loads it again): no scrape ever shows an impossible state (more apps than exist, a
/// pool larger than the app's spawns), failed walks are counted, and once the load stops the
/// gauges equal the proxy's own state again.
#[test]
fn snapshots_racing_heavy_load_and_app_changes_never_export_a_wrong_state() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (1..=8).map(|i| App::new(&format!("race-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        load_interval_ms: 0,
        ..Options::default()
    };
    let tb = Testbed::start(&opts);
    let obs = Observer::start_with(
        tb.proxy_pid(),
        &tb.dir,
        true,
        &["--state-interval-ms", "50"],
    );
    let http = tb.http;
    let paths: Vec<String> = (0..6000)
        .map(|i| format!("{}/race{i}", apps[(i * 5 + i / 7) % apps.len()].prefix))
        .collect();
    let loader = std::thread::spawn(move || load(http, &paths, 16));
    let mut changed = apps.clone();
    let mut scrapes = 0;
    let mut changes = 0;
    while !loader.is_finished() {
        if scrapes % 5 == 0 {
            let i = changes % changed.len();
            changed[i].bundle_id = format!("v{}", changes + 2);
            tb.set_apps(&changed);
            changes += 1;
        }
        let m = obs.scrape();
        let t = tb.truth();
        scrapes += 1;
        if let Some(n) = opt(&m, "rusty_workers_apps_loaded") {
            assert!(n <= apps.len() as f64, "{n} apps loaded of {}", apps.len());
        }
        for a in &apps {
            let ready = opt(
                &m,
                &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id),
            );
            let spawns = truth_u64(&t, &["apps", &a.id, "spawns"]) as f64;
            assert!(
                ready.unwrap_or(0.0) <= spawns,
                "{}: {ready:?} ready instances, {spawns} ever spawned",
                a.id
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let statuses = loader.join().expect("load");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 5000,
        "{statuses:?}"
    );
    // Quiet now (the proxy's gc evicts an app changed after its last request within a cycle
    // over the cached apps, about a second): the state read equals the proxy's own.
    std::thread::sleep(Duration::from_millis(2500));
    let t = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m = obs.scrape();
    let after = tb.truth();
    let (cached, pooled, _) = state_of(&after, &apps);
    assert_eq!(state_of(&t, &apps).1, pooled, "the pools are still");
    assert_eq!(
        opt(&m, "rusty_workers_apps_loaded"),
        Some(cached as f64),
        "apps loaded"
    );
    for (i, a) in apps.iter().enumerate() {
        assert_eq!(
            opt(
                &m,
                &format!("rusty_workers_app_ready_instances{{app=\"{}\"}}", a.id)
            ),
            pooled[i].map(|p| p as f64),
            "{}: ready instances\n{}",
            a.id,
            observer_self(&m)
        );
    }
    let failed: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_observer_state_snapshot_failures_total"))
        .map(|(_, v)| v)
        .sum();
    let good = m["rusty_workers_observer_state_snapshots_total"];
    eprintln!(
        "racing snapshots: {scrapes} scrapes during the load, {changes} app changes, {good} good snapshots, {failed} failed walks (retried or counted)"
    );
    assert!(good > scrapes as f64, "snapshots kept being taken: {good}");
}
