//! Hostile or odd data from the target (issue 7): app ids that never become labels, and the
//! label cap and memory under 100,000 app ids.

use crate::fixture::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use testbed_harness::{http_get, load, parse_metrics, rss_mib, truth_u64, App, Options, Testbed};

#[test]
fn hostile_app_ids_never_become_labels_and_are_counted_under_other() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let long = "x".repeat(5000);
    let cut_mid_char = "é".repeat(40);
    let hostile: Vec<(&str, &str)> = vec![
        ("quo\"te", "bad_char"),
        ("new\nline", "bad_char"),
        ("back\\slash", "bad_char"),
        ("app\"} 1\nrusty_workers_forged_total{a=\"", "bad_char"),
        ("sp ace", "bad_char"),
        ("ünïcödé", "bad_char"),
        (&long, "too_long"),
        // 80 bytes cut at 64 in the kernel (MAX_STR): too long before it could be half a char.
        (&cut_mid_char, "too_long"),
    ];
    let mut apps: Vec<App> = hostile
        .iter()
        .enumerate()
        .map(|(i, (id, _))| App {
            id: id.to_string(),
            bundle_id: "v1".into(),
            prefix: format!("/h{i}"),
        })
        .collect();
    apps.push(App::new("fine"));
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    for a in &apps {
        all_ok(&load(tb.http, &app_paths(a, "r", 20), 2), 20);
    }
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = http_get(obs.addr, "localhost", "/metrics").expect("scrape");
    let labels: std::collections::BTreeSet<&str> = body
        .split("app=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(
        labels.iter().all(|l| ["fine", "other", ""].contains(l)),
        "app labels {labels:?}: a hostile id reached the exposition"
    );
    assert!(
        !body.contains("forged"),
        "a forged series in the exposition"
    );
    let m1 = parse_metrics(&body);
    let grew = |series: &str| get(&m1, series) - get(&m0, series);
    // Every hostile app's loads, spawns and requests are counted, under app="other".
    for (metric, field) in [
        ("app_loads_total", "loads"),
        ("app_instance_spawns_total", "spawns"),
        ("app_requests_total", "requests"),
    ] {
        let want: u64 = hostile
            .iter()
            .map(|(id, _)| {
                truth_u64(&t1, &["apps", id, field]) - truth_u64(&t0, &["apps", id, field])
            })
            .sum();
        assert!(want > 0, "{metric}: the hostile apps did nothing");
        let series = format!("rusty_workers_{metric}{{app=\"other\"}}");
        assert_eq!(grew(&series), want as f64, "{series}");
        let fine = format!("rusty_workers_{metric}{{app=\"fine\"}}");
        let want =
            truth_u64(&t1, &["apps", "fine", field]) - truth_u64(&t0, &["apps", "fine", field]);
        assert_eq!(grew(&fine), want as f64, "{fine}");
    }
    for reason in ["bad_char", "too_long"] {
        let series = format!("rusty_workers_observer_label_refused_total{{reason=\"{reason}\"}}");
        assert!(grew(&series) > 0.0, "{series} did not grow");
    }
    eprintln!(
        "e2e: hostile app ids: refused bad_char {}, too_long {}; under app=\"other\": {} loads, {} requests",
        grew("rusty_workers_observer_label_refused_total{reason=\"bad_char\"}"),
        grew("rusty_workers_observer_label_refused_total{reason=\"too_long\"}"),
        grew("rusty_workers_app_loads_total{app=\"other\"}"),
        grew("rusty_workers_app_requests_total{app=\"other\"}"),
    );
    obs.lint();
}

/// About six minutes on these VMs: the test target cold-starts about 300 apps a second.
#[test]
fn a_hundred_thousand_app_ids_keep_the_label_cap_and_memory_bounded() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 100_000;
    let apps: Vec<App> = (0..n).map(|i| App::new(&format!("a{i:06}"))).collect();
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        // The proxy holds 1,000 apps; instances expire in a second: the target stays small
        // while every app passes through it.
        app_cache_size: 1000,
        ready_instance_expiration_ms: 1000,
        max_ready_instances_per_app: 1,
        dropout_rate: 0.0,
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let rss_start = rss_mib(obs.child.id());
    let t0 = Instant::now();
    let paths: Vec<String> = apps.iter().map(|a| format!("{}/once", a.prefix)).collect();
    let mut rss_each = Vec::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for chunk in paths.chunks(10_000) {
        for (status, count) in load(tb.http, chunk, 16) {
            *statuses.entry(status).or_default() += count;
        }
        rss_each.push(format!("{:.1}", rss_mib(obs.child.id())));
    }
    let took = t0.elapsed();
    let truth = tb.settled_truth();
    // Every request is answered 200, except those whose app the proxy lost before reading it
    // (502 "no route"): with a full app cache upstream's apps gc can make the app loaded last
    // the next one evicted (testbed `truth::Truth::apps_evicted_before_use`). Ground truth
    // counts each of them where it happens; the observer must count them as the proxy did.
    let lost = truth["apps_evicted_before_use"]
        .as_u64()
        .expect("ground truth counts apps evicted before use") as usize;
    let mut want_statuses = BTreeMap::from([(200, n - lost)]);
    if lost > 0 {
        want_statuses.insert(502, lost);
    }
    assert_eq!(
        statuses, want_statuses,
        "every request succeeds but those whose app the proxy evicted before use"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = http_get(obs.addr, "localhost", "/metrics").expect("scrape");
    let rss_end = rss_mib(obs.child.id());
    let m = parse_metrics(&body);
    let series = |metric: &str| -> Vec<f64> {
        m.iter()
            .filter(|(k, _)| k.starts_with(&format!("rusty_workers_{metric}{{app=")))
            .map(|(_, v)| *v)
            .collect()
    };
    let loads = series("app_loads_total");
    eprintln!(
        "e2e: {n} apps loaded once each in {:.0} s ({lost} requests found their app evicted before use): {} app label values, exposition {} KiB; observer RSS {rss_start:.1} MiB at start, after each 10,000 apps {}, {rss_end:.1} MiB at the end",
        took.as_secs_f64(),
        loads.len(),
        body.len() / 1024,
        rss_each.join(", ")
    );
    // The cap: 1,000 app labels (the default --max-apps) and "other".
    assert_eq!(loads.len(), 1001, "app label values");
    assert!(m["rusty_workers_observer_label_overflow_total"] > 0.0);
    // Nothing lost: summed over the labels, every load and request is there.
    let want = |field: &str| -> f64 {
        truth["apps"]
            .as_object()
            .unwrap()
            .values()
            .map(|a| a[field].as_u64().unwrap_or(0) as f64)
            .sum()
    };
    assert_eq!(loads.iter().sum::<f64>(), want("loads"), "loads summed");
    assert_eq!(
        series("app_requests_total").iter().sum::<f64>(),
        want("requests"),
        "requests summed"
    );
    let answered = |outcome: &str| -> (f64, f64) {
        let got = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with("rusty_workers_app_responses_total{")
                    && k.contains(&format!("outcome=\"{outcome}\""))
            })
            .map(|(_, v)| *v)
            .sum();
        let want = truth["apps"]
            .as_object()
            .unwrap()
            .values()
            .map(|a| a["outcomes"][outcome].as_u64().unwrap_or(0) as f64)
            .sum();
        (got, want)
    };
    // Responses: 16 clients from the first request on, so the observer answers for none of
    // the first few while it learns where the target keeps a request's key (those it counts
    // as unmatched, never under a wrong outcome); every other one is there, by its outcome.
    let mut short = 0.0;
    for outcome in ["ok", "no_route"] {
        let (got, want) = answered(outcome);
        assert!(
            got <= want,
            "responses with outcome {outcome} summed: observer {got} > ground truth {want}"
        );
        short += want - got;
    }
    // Every response head is either counted under its outcome or counted as unmatched.
    assert_eq!(m["rusty_workers_observer_events_lost_total"], 0.0);
    let unmatched = m["rusty_workers_observer_unmatched_responses_total"];
    eprintln!("e2e: responses the observer could not join while it learnt: {short}");
    assert_eq!(
        short, unmatched,
        "every response missing from the outcomes is counted as unmatched"
    );
    assert!(
        short < 100.0,
        "the observer learns within the first requests: {short} responses unmatched"
    );
    // Memory bounded: what the observer keeps per app id past the cap is nothing; it grows
    // with the live workers and the joins in flight, which the target bounds.
    assert!(
        rss_end < 80.0,
        "observer RSS {rss_end:.1} MiB after {n} app ids (at start {rss_start:.1} MiB)"
    );
    obs.lint();
}
