//! A bounded soak: the test target under mixed load for minutes, its apps changing, its cache
//! evicting, its runtimes restarted, the observer attached throughout. At the end every
//! counter must equal the target's ground truth, and the observer's memory must not have
//! grown with time.

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use testbed_harness::{
    http_get, joins_learnt, load, lost_instances, parse_metrics, rss_mib, status_mib, truth_u64,
    App, Options, Testbed, APP_COUNTERS,
};

fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let (status, body) = http_get(addr, "localhost", "/metrics").context("scraping")?;
    if status != 200 {
        bail!("scrape answered {status}");
    }
    Ok(parse_metrics(&body))
}

/// The apps of generation `generation`: their bundles change with it (an app change evicts
/// the app and its instances), the mix does not.
fn apps(generation: u32) -> Vec<App> {
    let v = |extra: &str| format!("v{generation}{extra}");
    let mut apps = Vec::new();
    for i in 0..12 {
        apps.push(App {
            bundle_id: v(""),
            ..App::new(&format!("plain-{i}"))
        });
    }
    for i in 0..3 {
        apps.push(App {
            bundle_id: v(";delay_ms=5"),
            ..App::new(&format!("slow-{i}"))
        });
    }
    for i in 0..2 {
        apps.push(App {
            bundle_id: v(";fail=script"),
            ..App::new(&format!("throws-{i}"))
        });
    }
    apps.push(App {
        bundle_id: v(";fail=runtime_throws"),
        ..App::new("crashes")
    });
    apps
}

pub struct Report {
    pub minutes: f64,
    pub requests: u64,
    pub app_changes: u32,
    pub runtime_restarts: u32,
    pub rss_start_mib: f64,
    pub rss_end_mib: f64,
    pub rss_max_mib: f64,
    /// RSS once the first fifth of the run (at most 2 minutes) is over, and when.
    pub rss_settled_mib: f64,
    pub settled_after_s: f64,
    /// The observer's log (its stderr).
    pub log: std::path::PathBuf,
    pub checked: usize,
    pub mismatches: Vec<String>,
}

pub fn run(observer: &Path, minutes: f64) -> anyhow::Result<Report> {
    let mut generation = 1;
    let mut tb = Testbed::start(&Options {
        runtimes: 2,
        apps: apps(generation),
        // Fewer cache slots than apps: capacity evictions all along.
        app_cache_size: 14,
        ready_instance_expiration_ms: 3000,
        dropout_rate: 0.02,
        ..Options::default()
    });
    let dir = testbed_harness::release_dir();
    let log = dir.canonicalize().unwrap_or(dir).join("soak-observer.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let (child, addr) =
        crate::child::start_observer_logged(observer, tb.proxy_pid(), &[], log_file.into())?;
    let pid = child.0.id();

    // Until the joins are learnt: requests one at a time.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    loop {
        let m = scrape(addr)?;
        if joins_learnt(&m) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the observer did not learn its joins in 60 s");
        }
        let paths: Vec<String> = apps(generation)
            .iter()
            .map(|a| format!("{}/warm{round}", a.prefix))
            .collect();
        load(tb.http, &paths, 1);
        round += 1;
    }
    let t0 = tb.settled_truth();
    let m0 = scrape(addr)?;
    let rss_start = rss_mib(pid);
    eprintln!("soak: joins learnt; observer RSS {rss_start:.1} MiB; {minutes} minutes of load");

    let start = Instant::now();
    let total = Duration::from_secs_f64(minutes * 60.0);
    let (mut requests, mut changes, mut restarts) = (0u64, 0u32, 0u32);
    let mut rss_max = rss_start;
    // Caches, pools and the ring buffer fill in the first minutes; flat means no growth after.
    let settle = (total / 5).min(Duration::from_secs(120));
    let mut rss_settled = None;
    let mut next_change = Duration::from_secs(60);
    let mut next_restart = Duration::from_secs(90);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut batch = 0u64;
    while start.elapsed() < total {
        let app_list = apps(generation);
        let paths: Vec<String> = (0..400)
            .map(|i| {
                let a = &app_list[(i * 7 + batch as usize) % app_list.len()];
                format!("{}/b{batch}-{i}", a.prefix)
            })
            .collect();
        for (s, n) in load(tb.http, &paths, 8) {
            *statuses.entry(s).or_default() += n;
        }
        requests += paths.len() as u64;
        batch += 1;
        if start.elapsed() >= next_change {
            generation += 1;
            tb.set_apps(&apps(generation));
            changes += 1;
            next_change += Duration::from_secs(60);
        }
        if start.elapsed() >= next_restart {
            tb.restart_runtime(restarts as usize % 2);
            restarts += 1;
            next_restart += Duration::from_secs(90);
        }
        let rss = rss_mib(pid);
        rss_max = rss_max.max(rss);
        if rss_settled.is_none() && start.elapsed() >= settle {
            rss_settled = Some((rss, start.elapsed().as_secs_f64()));
        }
        if batch.is_multiple_of(10) {
            let m = scrape(addr)?;
            eprintln!(
                "soak: {:>4.0} s: {requests} requests ({statuses:?}), {changes} app changes, {restarts} runtime restarts; observer RSS {rss:.1} MiB ({:.1} MiB anonymous), {} events, {} lost",
                start.elapsed().as_secs_f64(),
                status_mib(pid, "RssAnon"),
                m.get("rusty_workers_observer_events_total").copied().unwrap_or(0.0),
                m.get("rusty_workers_observer_events_lost_total").copied().unwrap_or(0.0),
            );
        }
    }
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(1200));
    let m1 = scrape(addr)?;
    let rss_end = rss_mib(pid);

    let mut checked = 0;
    let mut mismatches = Vec::new();
    let mut check = |what: String, got: f64, want: f64| {
        checked += 1;
        if got != want {
            mismatches.push(format!("{what}: observer {got}, ground truth {want}"));
        }
    };
    let grew = |series: &str| {
        m1.get(series).copied().unwrap_or(0.0) - m0.get(series).copied().unwrap_or(0.0)
    };
    for a in apps(generation) {
        let id = a.id.as_str();
        for (metric, field) in APP_COUNTERS {
            let series = format!("rusty_workers_{}", metric.replace("{}", id));
            let want = truth_u64(&t1, &["apps", id, field]) - truth_u64(&t0, &["apps", id, field]);
            check(series.clone(), grew(&series), want as f64);
        }
        // The ground truth's count of instances lost steps back when one ends after all.
        check(
            format!("instances of {id} lost (dropped less dropped and ended)"),
            lost_instances(&m1, id) - lost_instances(&m0, id),
            truth_u64(&t1, &["apps", id, "dropped"]) as f64
                - truth_u64(&t0, &["apps", id, "dropped"]) as f64,
        );
        let series = format!("rusty_workers_app_instances{{app=\"{id}\"}}");
        let want = truth_u64(&t1, &["apps", id, "instances_alive"]);
        check(
            series.clone(),
            m1.get(&series).copied().unwrap_or(0.0),
            want as f64,
        );
        // Outcomes per app; no_instance only in total (a request that found no runtime at all
        // sends nothing that names its app).
        for o in [
            "ok",
            "execution_error",
            "retries_exhausted",
            "internal_error",
        ] {
            let series =
                format!("rusty_workers_app_responses_total{{app=\"{id}\",outcome=\"{o}\"}}");
            let want = truth_u64(&t1, &["apps", id, "outcomes", o])
                - truth_u64(&t0, &["apps", id, "outcomes", o]);
            check(series.clone(), grew(&series), want as f64);
        }
    }
    // Every outcome in total, over every label (app="" too: no route, a body too large).
    for o in [
        "ok",
        "execution_error",
        "no_route",
        "no_instance",
        "retries_exhausted",
        "body_too_large",
        "internal_error",
    ] {
        let want: u64 = t1["apps"]
            .as_object()
            .map(|apps| {
                apps.keys()
                    .map(|id| {
                        truth_u64(&t1, &["apps", id, "outcomes", o])
                            - truth_u64(&t0, &["apps", id, "outcomes", o])
                    })
                    .sum()
            })
            .unwrap_or(0);
        let suffix = format!("outcome=\"{o}\"}}");
        let got: f64 = m1
            .keys()
            .filter(|k| k.starts_with("rusty_workers_app_responses_total{") && k.ends_with(&suffix))
            .map(|k| grew(k))
            .sum();
        check(
            format!("responses with outcome {o}, all apps"),
            got,
            want as f64,
        );
    }
    check(
        "rusty_workers_apps_loaded".into(),
        m1.get("rusty_workers_apps_loaded").copied().unwrap_or(-1.0),
        truth_u64(&t1, &["apps_loaded"]) as f64,
    );
    for method in [
        "spawn_worker",
        "terminate_worker",
        "fetch",
        "id",
        "list_workers",
    ] {
        let series = format!("rusty_workers_runtime_rpcs_total{{method=\"{method}\"}}");
        let want = truth_u64(&t1, &["rpc_calls", method]) - truth_u64(&t0, &["rpc_calls", method]);
        check(series.clone(), grew(&series), want as f64);
    }
    for series in [
        "rusty_workers_observer_events_lost_total",
        "rusty_workers_observer_decode_errors_total",
    ] {
        check(series.into(), grew(series), 0.0);
    }
    Ok(Report {
        minutes: start.elapsed().as_secs_f64() / 60.0,
        requests,
        app_changes: changes,
        runtime_restarts: restarts,
        rss_start_mib: rss_start,
        rss_end_mib: rss_end,
        rss_max_mib: rss_max,
        rss_settled_mib: rss_settled.map_or(rss_end, |r| r.0),
        settled_after_s: rss_settled.map_or(0.0, |r| r.1),
        log,
        checked,
        mismatches,
    })
}
