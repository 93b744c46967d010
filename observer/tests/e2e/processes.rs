//! The processes: procfs and network figures of the proxy and its runtimes, restarts, and
//! a target in its own mount and PID namespace.

use crate::fixture::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use testbed_harness::{load, truth_u64, App, Options, Testbed};

#[test]
fn processes_network_and_restarts() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Every fetch spins 3 ms of CPU in the runtime that serves it.
    let apps: Vec<App> = (1..=3)
        .map(|i| App {
            bundle_id: "v1;spin_ms=3".into(),
            ..App::new(&format!("spin-{i}"))
        })
        .collect();
    let opts = Options {
        apps: apps.clone(),
        // The proxy queries its runtimes and finds lost ones again every 200 ms.
        load_interval_ms: 200,
        ready_instance_expiration_ms: 60_000,
        // No instance is pooled: every request spawns one on a runtime drawn at random, so
        // both runtimes get about half of the load.
        dropout_rate: 1.0,
        ..Options::default()
    };
    let mut tb = Testbed::start(&opts);
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    let rts: Vec<String> = tb.runtime_addrs.iter().map(|a| a.to_string()).collect();
    let proxy = "rusty-workers-proxy";
    time_until(&obs, Instant::now(), 10, "every process watched", |m| {
        get(m, &proc_series("up", "proxy", proxy, None)) == 1.0
            && rts
                .iter()
                .all(|r| get(m, &proc_series("up", "runtime", r, None)) == 1.0)
    });
    let paths = |tag: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("{}/{tag}{i}", apps[i % apps.len()].prefix))
            .collect()
    };

    // Phase 1: load; CPU follows each runtime's fetches, bytes equal its own counts.
    quiesce(&tb, 2);
    let truth0 = tb.truth();
    let m0 = obs.scrape();
    let own0: Vec<_> = (0..2)
        .map(|i| (tb.runtime_stats(i), runtime_bytes(&tb, i)))
        .collect();
    all_ok(&load(tb.http, &paths("a", 600), 4), 600);
    quiesce(&tb, 2);
    let m1 = obs.scrape();
    // The runtimes together served the terminate_worker calls the proxy sent.
    let terminations = |m: &BTreeMap<String, f64>| -> f64 {
        rts.iter()
            .map(|rt| get(m, &format!("rusty_workers_runtime_server_call_duration_seconds_count{{method=\"terminate_worker\",runtime=\"{rt}\"}}")))
            .sum()
    };
    let sent = truth_u64(&tb.truth(), &["rpc_calls", "terminate_worker"])
        - truth_u64(&truth0, &["rpc_calls", "terminate_worker"]);
    assert_eq!(
        terminations(&m1) - terminations(&m0),
        sent as f64,
        "terminate_worker calls the runtimes served"
    );
    assert!(sent > 0);
    for (i, rt) in rts.iter().enumerate() {
        let fetches = tb.runtime_stats(i)["fetches"].as_f64().unwrap()
            - own0[i].0["fetches"].as_f64().unwrap();
        let cpu = |m: &BTreeMap<String, f64>| {
            ["user", "system"]
                .iter()
                .map(|mode| {
                    get(
                        m,
                        &proc_series("cpu_seconds_total", "runtime", rt, Some(("mode", mode))),
                    )
                })
                .sum::<f64>()
        };
        let used = cpu(&m1) - cpu(&m0);
        let spun = fetches * 0.003;
        eprintln!("e2e: runtime {rt}: {fetches} fetches, {spun:.2} s spun, CPU seen {used:.2} s");
        assert!(fetches > 50.0, "runtime {rt} served only {fetches} fetches");
        assert!(
            used >= spun * 0.9 && used <= spun * 1.5 + 0.3,
            "runtime {rt}: {used} s CPU for {fetches} fetches of 3 ms"
        );
        assert_bytes_agree(
            rt,
            minus(runtime_bytes(&tb, i), own0[i].1),
            minus(observed_bytes(&m1, rt), observed_bytes(&m0, rt)),
        );
        // The runtime's wire: one call per fetch served, request received to response sent.
        let served = |m: &BTreeMap<String, f64>, what: &str| {
            get(
                m,
                &format!("rusty_workers_runtime_server_call_duration_seconds_{what}{{method=\"fetch\",runtime=\"{rt}\"}}"),
            )
        };
        let calls = served(&m1, "count") - served(&m0, "count");
        let secs = served(&m1, "sum") - served(&m0, "sum");
        eprintln!(
            "e2e: runtime {rt}: {calls} fetch calls seen in the runtime, {secs:.2} s in them"
        );
        assert_eq!(calls, fetches, "fetch calls the runtime probes saw in {rt}");
        assert!(secs >= spun, "{secs} s in {fetches} fetches of 3 ms CPU");
        for g in [
            "resident_memory_bytes",
            "threads",
            "open_fds",
            "start_time_seconds",
        ] {
            assert!(
                get(&m1, &proc_series(g, "runtime", rt, None)) > 0.0,
                "{g} of {rt}"
            );
        }
    }
    // The kernel splits a process's CPU time between user and system by where its clock ticks
    // fell (kernel/sched/cputime.c, cputime_adjust): a proxy that spends its time in socket
    // syscalls can show all of it as system. CI once saw user = 0.
    let proxy_cpu = ["user", "system"].map(|mode| {
        get(
            &m1,
            &proc_series("cpu_seconds_total", "proxy", proxy, Some(("mode", mode))),
        )
    });
    eprintln!(
        "e2e: proxy CPU since its start: user {:.2} s, system {:.2} s",
        proxy_cpu[0], proxy_cpu[1]
    );
    assert!(
        proxy_cpu[0] + proxy_cpu[1] > 0.0,
        "no CPU seen for the proxy:\n{}",
        m1.iter()
            .filter(|(k, _)| k.contains("role=\"proxy\""))
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(m1
        .keys()
        .any(|k| k.starts_with("rusty_workers_netns_network_bytes_total{device=\"lo\"")));

    // Phase 2: a runtime killed and started again at its address.
    let own_before = runtime_bytes(&tb, 0);
    let m_before = obs.scrape();
    let own_at_kill = runtime_bytes(&tb, 0);
    let t_kill = Instant::now();
    tb.kill_runtime(0);
    let exit_seen = time_until(&obs, t_kill, 2, "the runtime's exit", |m| {
        get(m, &proc_series("up", "runtime", &rts[0], None)) == 0.0
    });
    let t_start = Instant::now();
    tb.restart_runtime(0);
    let back = time_until(&obs, t_start, 2, "the runtime's return", |m| {
        get(m, &proc_series("starts_total", "runtime", &rts[0], None)) == 2.0
            && get(m, &proc_series("up", "runtime", &rts[0], None)) == 1.0
    });
    let at_back = observed_bytes(&obs.scrape(), &rts[0]);
    let first_bytes = time_until(&obs, t_start, 5, "the new runtime's first bytes", |m| {
        observed_bytes(m, &rts[0]).0 > at_back.0
    });
    eprintln!(
        "e2e: runtime restart timeline: killed at 0; exit seen +{:.3} s; restarted, re-attached +{:.3} s after the start; first bytes counted +{:.3} s (the proxy reconnects every 200 ms)",
        exit_seen.as_secs_f64(),
        back.as_secs_f64(),
        first_bytes.as_secs_f64()
    );
    all_ok(&load(tb.http, &paths("b", 600), 4), 600);
    quiesce(&tb, 2);
    let m2 = obs.scrape();
    assert_eq!(
        get(
            &m2,
            "rusty_workers_observer_reattaches_total{role=\"runtime\"}"
        ),
        1.0
    );
    // Counters never go backwards over the restart.
    for (k, v) in &m_before {
        if k.starts_with("rusty_workers_process_") && k.contains("_total{") {
            assert!(
                m2.get(k).is_some_and(|now| now >= v),
                "{k} went from {v} to {:?}",
                m2.get(k)
            );
        }
    }
    // The old process's bytes until its death (load queries, written to its stats file up to
    // 50 ms late), plus the new one's, as the runtimes counted them.
    let own_old = minus(own_at_kill, own_before);
    let own_new = runtime_bytes(&tb, 0);
    assert_bytes_agree(
        "restarted runtime",
        (own_old.0 + own_new.0, own_old.1 + own_new.1),
        minus(
            observed_bytes(&m2, &rts[0]),
            observed_bytes(&m_before, &rts[0]),
        ),
    );

    // Phase 3: the proxy killed and started again: detached, re-attached, counting again.
    let t_kill = Instant::now();
    tb.kill_proxy();
    let exit_seen = time_until(&obs, t_kill, 2, "the proxy's exit", |m| {
        m["rusty_workers_observer_target_up"] == 0.0
            && m.get("rusty_workers_observer_probe_attached{probe=\"runtime_rpc\",reason=\"target_down\"}") == Some(&0.0)
    });
    let t_start = Instant::now();
    tb.restart_proxy();
    let back = time_until(&obs, t_start, 2, "the proxy's re-attach", |m| {
        m["rusty_workers_observer_reattaches_total{role=\"proxy\"}"] == 1.0
            && BASE_PROBES.iter().chain(REQUEST_PROBES).all(|p| {
                m.get(&format!(
                    "rusty_workers_observer_probe_attached{{probe=\"{p}\",reason=\"\"}}"
                )) == Some(&1.0)
            })
    });
    let t0 = tb.settled_truth();
    let m3 = obs.scrape();
    assert_eq!(
        m3["rusty_workers_apps_loaded"], 0.0,
        "the new proxy has loaded nothing yet"
    );
    let events = m3["rusty_workers_observer_events_total"];
    let t_load = Instant::now();
    let loader = {
        let (http, p) = (tb.http, paths("c", 600));
        std::thread::spawn(move || load(http, &p, 4))
    };
    let first_event = time_until(&obs, t_load, 5, "the first event from the new proxy", |m| {
        m["rusty_workers_observer_events_total"] > events
    });
    all_ok(&loader.join().unwrap(), 600);
    eprintln!(
        "e2e: proxy restart timeline: killed at 0; exit seen +{:.3} s; restarted, re-attached +{:.3} s after the start; first event +{:.3} s after load began",
        exit_seen.as_secs_f64(),
        back.as_secs_f64(),
        first_event.as_secs_f64()
    );
    let truth = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m4 = obs.scrape();
    // The new proxy's ground truth counts from its start; the observer's counters continue,
    // so their growth since the re-attach must equal it.
    for a in &apps {
        let t = &truth["apps"][a.id.as_str()];
        for (metric, field) in [
            ("app_loads_total", "loads"),
            ("app_instance_spawns_total", "spawns"),
            ("app_requests_total", "requests"),
        ] {
            let series = format!("rusty_workers_{metric}{{app=\"{}\"}}", a.id);
            let grew = get(&m4, &series) - get(&m3, &series);
            let want = t[field].as_u64().unwrap_or(0) as f64
                - truth_u64(&t0, &["apps", &a.id, field]) as f64;
            assert_eq!(
                grew,
                want,
                "{series} after the proxy's restart\n{}",
                observer_self(&m4)
            );
        }
        let series = format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id);
        assert_eq!(
            get(&m4, &series),
            t["instances_alive"].as_u64().unwrap() as f64,
            "{series}\n{}",
            observer_self(&m4)
        );
    }
    assert_eq!(
        m4["rusty_workers_apps_loaded"],
        truth["apps_loaded"].as_u64().unwrap() as f64
    );
    assert_eq!(
        get(&m4, &proc_series("starts_total", "proxy", proxy, None)),
        2.0
    );
    obs.lint();
}

#[test]
fn a_target_in_its_own_mount_and_pid_namespace() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let apps: Vec<App> = (1..=3).map(|i| App::new(&format!("ct-{i}"))).collect();
    let opts = Options {
        apps: apps.clone(),
        ready_instance_expiration_ms: 60_000,
        // No instance is pooled: each request spawns one on a runtime drawn at random, so both
        // runtimes get load. Pooled (dropout 0), the three apps' few instances all landed on one
        // runtime in a CI run, which left the other's byte counts at 96.
        dropout_rate: 1.0,
        ..Options::default()
    };
    let tb = Testbed::start_contained(&opts);
    let pid = tb.proxy_pid();
    // What the host sees of it: a path that is not there, and another PID inside.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the proxy's exe link");
    assert!(
        !exe.exists(),
        "{} is visible on the host: not a private mount",
        exe.display()
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid: Vec<&str> = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid")
        .split_whitespace()
        .collect();
    assert_eq!(nspid.len(), 2, "in a PID namespace of its own: {nspid:?}");
    assert_ne!(nspid[1], pid.to_string());
    eprintln!(
        "e2e: contained proxy: host PID {pid}, PID {} inside, executable {} (not on the host)",
        nspid[1],
        exe.display()
    );

    // With the runtimes' poll uprobes, attached through their private mounts too.
    let obs = Observer::start_with(pid, &tb.dir, false, &["--runtime-polls"]);
    let rts: Vec<String> = tb.runtime_addrs.iter().map(|a| a.to_string()).collect();
    time_until(&obs, Instant::now(), 10, "the contained runtimes", |m| {
        rts.iter()
            .all(|r| get(m, &proc_series("up", "runtime", r, None)) == 1.0)
            && m.get("rusty_workers_observer_probe_attached{probe=\"server_fetch\",reason=\"\"}")
                == Some(&1.0)
    });
    quiesce(&tb, 2);
    let m0 = obs.scrape();
    let own0: Vec<_> = (0..2).map(|i| runtime_bytes(&tb, i)).collect();
    let paths: Vec<String> = (0..300)
        .map(|i| format!("{}/c{i}", apps[i % apps.len()].prefix))
        .collect();
    all_ok(&load(tb.http, &paths, 4), 300);
    quiesce(&tb, 2);
    let truth = tb.settled_truth();
    let m1 = obs.scrape();
    for a in &apps {
        let series = format!("rusty_workers_app_requests_total{{app=\"{}\"}}", a.id);
        assert_eq!(
            get(&m1, &series),
            truth_u64(&truth, &["apps", &a.id, "requests"]) as f64,
            "{series}\n{}",
            observer_self(&m1)
        );
    }
    let mut fetches = 0.0;
    for (i, rt) in rts.iter().enumerate() {
        assert_bytes_agree(
            &format!("contained {rt}"),
            minus(runtime_bytes(&tb, i), own0[i]),
            minus(observed_bytes(&m1, rt), observed_bytes(&m0, rt)),
        );
        let served = get(
            &m1,
            &format!("rusty_workers_runtime_server_call_duration_seconds_count{{method=\"fetch\",runtime=\"{rt}\"}}"),
        );
        let polls = get(
            &m1,
            &format!(
                "rusty_workers_runtime_server_polls_total{{method=\"fetch\",runtime=\"{rt}\"}}"
            ),
        );
        eprintln!("e2e: contained {rt}: {served} fetches served, {polls} polls of them");
        assert!(
            served > 0.0 && polls >= served,
            "{rt}: every fetch served is polled at least once: {polls} polls, {served} fetches"
        );
        fetches += served;
    }
    assert_eq!(
        fetches,
        truth_u64(&truth, &["rpc_calls", "fetch"]) as f64,
        "fetches the contained runtimes served"
    );
    obs.lint();
}
