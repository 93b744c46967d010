//! Faults (issue 7): a listen port in use, the observer or the target killed mid-load, the
//! scrape endpoint hammered, the ring buffer overrun.

use crate::fixture::*;
use observer_common::method;
use std::process::Command;
use std::time::{Duration, Instant};
use testbed_harness::{http_get, load, truth_u64, App, Options, Testbed};

#[test]
fn a_listen_port_in_use_is_named_with_the_fix() {
    require_root();
    let tb = Testbed::start(&Options {
        runtimes: 1,
        load_interval_ms: 0,
        ..Options::default()
    });
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_observer"))
        .args([
            "--pid",
            &tb.proxy_pid().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("running the observer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("port {port} is already in use")),
        "{stderr}"
    );
    assert!(stderr.contains("--listen"), "{stderr}");
}

#[test]
fn the_observer_killed_mid_load_leaves_nothing_behind_and_the_target_unharmed() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let app = App::new("plain");
    let tb = Testbed::start(&Options {
        apps: vec![app.clone()],
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let t0 = tb.settled_truth();
    let n = 3000;
    let loader = {
        let (http, p) = (tb.http, app_paths(&app, "k", n));
        std::thread::spawn(move || load(http, &p, 4))
    };
    wait_until("events from the load", 10, || {
        obs.try_scrape()
            .is_ok_and(|m| m["rusty_workers_observer_events_total"] > 100.0)
    });
    let (ours, gone) = obs.kill9();
    let statuses = loader.join().unwrap();
    eprintln!(
        "e2e: observer SIGKILLed mid-load with {} programs and {} links in the kernel; all gone {:.3} s later; the load: {statuses:?}",
        ours.programs.len(),
        ours.links.len(),
        gone.as_secs_f64()
    );
    // Every request of the load, before and after the kill, was served.
    all_ok(&statuses, n);
    let t1 = tb.settled_truth();
    assert_eq!(
        truth_u64(&t1, &["apps", "plain", "requests"])
            - truth_u64(&t0, &["apps", "plain", "requests"]),
        n as u64,
        "the proxy's own count of the requests it served"
    );
}

#[test]
fn the_proxy_killed_mid_load_is_marked_down_and_taken_up_again() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let app = App::new("plain");
    let mut tb = Testbed::start(&Options {
        apps: vec![app.clone()],
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let loader = {
        let (http, p) = (tb.http, app_paths(&app, "k", 100_000));
        std::thread::spawn(move || load(http, &p, 4))
    };
    wait_until("events from the load", 10, || {
        obs.try_scrape()
            .is_ok_and(|m| m["rusty_workers_observer_events_total"] > 100.0)
    });
    let t_kill = Instant::now();
    tb.kill_proxy();
    let proxy_up = proc_series("up", "proxy", "rusty-workers-proxy", None);
    let down = time_until(&obs, t_kill, 2, "the proxy marked down", |m| {
        m["rusty_workers_observer_target_up"] == 0.0 && m.get(&proxy_up) == Some(&0.0)
    });
    // While it is down the observer keeps serving.
    let mut scrapes = 0;
    while t_kill.elapsed() < Duration::from_secs(2) {
        let m = obs
            .try_scrape()
            .expect("the observer serves while its target is down");
        assert_eq!(m[&proxy_up], 0.0);
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let failed_load = loader.join().unwrap();
    let t_start = Instant::now();
    tb.restart_proxy();
    let back = time_until(&obs, t_start, 2, "the proxy taken up again", |m| {
        m["rusty_workers_observer_reattaches_total{role=\"proxy\"}"] == 1.0
            && m.get(&proxy_up) == Some(&1.0)
            && BASE_PROBES.iter().chain(REQUEST_PROBES).all(|p| {
                m.get(&format!(
                    "rusty_workers_observer_probe_attached{{probe=\"{p}\",reason=\"\"}}"
                )) == Some(&1.0)
            })
    });
    eprintln!(
        "e2e: proxy SIGKILLed mid-load (the load: {failed_load:?}): marked down +{:.3} s, {scrapes} scrapes served while down, taken up again +{:.3} s after its restart",
        down.as_secs_f64(),
        back.as_secs_f64()
    );
    // Counting again, from the new process: its requests equal its own ground truth.
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    let n = 400;
    all_ok(&load(tb.http, &app_paths(&app, "again", n), 4), n);
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m1 = obs.scrape();
    let series = "rusty_workers_app_requests_total{app=\"plain\"}";
    assert_eq!(
        get(&m1, series) - get(&m0, series),
        (truth_u64(&t1, &["apps", "plain", "requests"])
            - truth_u64(&t0, &["apps", "plain", "requests"])) as f64,
        "{series} after the restart"
    );
    obs.lint();
}

#[test]
fn scrapes_hammered_while_events_flow() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (0..20).map(|i| App::new(&format!("app-{i}"))).collect();
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        ..Options::default()
    });
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    warm_up(&tb, &obs, &apps);
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    let n_per_app = 150;
    let paths: Vec<String> = (0..n_per_app)
        .flat_map(|i| apps.iter().map(move |a| format!("{}/h{i}", a.prefix)))
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..8)
        .map(|_| {
            let (addr, done) = (obs.addr, done.clone());
            std::thread::spawn(move || {
                let mut times = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let (status, body) =
                        http_get(addr, "localhost", "/metrics").expect("a scrape under load");
                    assert_eq!(status, 200);
                    assert!(body.contains("rusty_workers_observer_events_total"));
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    let statuses = load(tb.http, &paths, 8);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut times: Vec<Duration> = scrapers
        .into_iter()
        .flat_map(|s| s.join().expect("a scraper failed"))
        .collect();
    times.sort();
    all_ok(&statuses, paths.len());
    eprintln!(
        "e2e: {} scrapes by 8 threads during {} requests: p50 {:.1} ms, max {:.1} ms",
        times.len(),
        paths.len(),
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
    assert!(times.len() >= 50, "only {} scrapes", times.len());
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m1 = obs.scrape();
    assert_eq!(m1["rusty_workers_observer_events_lost_total"], 0.0);
    for a in &apps {
        for (metric, field) in [
            ("app_requests_total", "requests"),
            ("app_loads_total", "loads"),
        ] {
            let series = format!("rusty_workers_{metric}{{app=\"{}\"}}", a.id);
            let want =
                truth_u64(&t1, &["apps", &a.id, field]) - truth_u64(&t0, &["apps", &a.id, field]);
            assert_eq!(
                get(&m1, &series) - get(&m0, &series),
                want as f64,
                "{series}"
            );
        }
        let series = format!(
            "rusty_workers_app_responses_total{{app=\"{}\",outcome=\"ok\"}}",
            a.id
        );
        assert_eq!(
            get(&m1, &series) - get(&m0, &series),
            n_per_app as f64,
            "{series}"
        );
    }
    obs.lint();
}

#[test]
fn a_ring_buffer_overrun_is_counted_and_kernel_counts_stay_exact() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let app = App::new("plain");
    let tb = Testbed::start(&Options {
        apps: vec![app.clone()],
        ..Options::default()
    });
    // 64 KiB hold about 120 requests' records; drained every 500 ms (the daemon's housekeeping
    // drains whatever the drain interval), a burst of requests overruns it.
    let obs = Observer::start_with(
        tb.proxy_pid(),
        &tb.dir,
        false,
        &["--ring-bytes", "65536", "--drain-interval-ms", "1000"],
    );
    let rts: Vec<String> = tb.runtime_addrs.iter().map(|a| a.to_string()).collect();
    wait_until("the runtimes watched", 10, || {
        obs.try_scrape().is_ok_and(|m| {
            rts.iter()
                .all(|r| m.get(&proc_series("up", "runtime", r, None)) == Some(&1.0))
        })
    });
    quiesce(&tb, rts.len());
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();
    let own0: Vec<(f64, f64)> = (0..rts.len()).map(|i| runtime_bytes(&tb, i)).collect();
    let n = 3000;
    all_ok(&load(tb.http, &app_paths(&app, "burst", n), 8), n);
    quiesce(&tb, rts.len());
    std::thread::sleep(Duration::from_millis(1200));
    let t1 = tb.settled_truth();
    let m1 = obs.scrape();
    let lost = get(&m1, "rusty_workers_observer_events_lost_total")
        - get(&m0, "rusty_workers_observer_events_lost_total");
    let received = get(&m1, "rusty_workers_observer_events_total")
        - get(&m0, "rusty_workers_observer_events_total");
    eprintln!("e2e: overrun: {received} events received, {lost} lost and counted");
    assert!(
        lost > 0.0,
        "a 64 KiB ring drained every 500 ms was not overrun"
    );
    // What the kernel counts itself is exact whatever the ring loses: RPCs by method, and
    // every process's socket bytes.
    for method in &method::NAMES[..method::UNKNOWN as usize] {
        let series = format!("rusty_workers_runtime_rpcs_total{{method=\"{method}\"}}");
        let want = truth_u64(&t1, &["rpc_calls", method]) - truth_u64(&t0, &["rpc_calls", method]);
        assert_eq!(
            get(&m1, &series) - get(&m0, &series),
            want as f64,
            "{series}"
        );
    }
    for (i, rt) in rts.iter().enumerate() {
        assert_bytes_agree(
            &format!("overrun, runtime {rt}"),
            minus(runtime_bytes(&tb, i), own0[i]),
            minus(observed_bytes(&m1, rt), observed_bytes(&m0, rt)),
        );
    }
    assert_eq!(m1["rusty_workers_observer_decode_errors_total"], 0.0);
    obs.lint();
}
