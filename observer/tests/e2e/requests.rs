//! Request metrics: per app requests, outcomes, latency and cold/warm starts, per runtime
//! RPC latency and failures, each EQUAL to ground truth.

use crate::fixture::*;
use std::collections::BTreeMap;
use std::time::Duration;
use testbed_harness::{load_requests, truth_u64, App, Options, Request, Testbed};

#[test]
fn request_metrics_equal_ground_truth() {
    require_root();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let slow = [("lat-5", 5u64), ("lat-50", 50), ("lat-200", 200)];
    let mut apps: Vec<App> = slow.iter().map(|(id, ms)| App::slow(id, *ms)).collect();
    // Failure injection by the apps' scripts: an execution error that ends the worker, one
    // that does not, and a worker the runtime has lost (the proxy retries, then gives up).
    apps.push(App::failing("crashes", "runtime_throws"));
    apps.push(App::failing("throws", "script"));
    apps.push(App::failing("lost", "no_such_worker"));
    apps.push(App::new("plain"));
    let opts = Options {
        apps: apps.clone(),
        // The proxy drops a runtime that does not answer its load query.
        load_interval_ms: 300,
        // Expiry off the test's time scale: instances stay pooled.
        ready_instance_expiration_ms: 60_000,
        dropout_rate: 0.0,
        max_request_body_size_bytes: 1024,
        ..Options::default()
    };
    let mut tb = Testbed::start(&opts);
    let obs = Observer::start(tb.proxy_pid(), &tb.dir, false);
    warm_up(&tb, &obs, &apps);
    let t0 = tb.settled_truth();
    let m0 = obs.scrape();

    // Latency: 200 requests per slow app from 8 clients; the client measures each. (Its p99
    // is then the 198th: one scheduling hiccup at the client does not move it.)
    let per_app = 200;
    let mut latency_reqs = Vec::new();
    for i in 0..per_app {
        for (id, _) in &slow {
            latency_reqs.push((id.to_string(), Request::get(&format!("/{id}/l{i}"))));
        }
    }
    let reqs: Vec<Request> = latency_reqs.iter().map(|(_, r)| r.clone()).collect();
    let answers = load_requests(tb.http, &reqs, 8);
    // Every outcome: failures, no route, a body too large, alongside plain traffic.
    let mut mixed = Vec::new();
    for i in 0..40 {
        mixed.push(Request::get(&format!("/crashes/c{i}")));
        mixed.push(Request::get(&format!("/throws/t{i}")));
        mixed.push(Request::get(&format!("/plain/p{i}")));
        if i % 4 == 0 {
            mixed.push(Request::get(&format!("/lost/n{i}")));
            mixed.push(Request::get(&format!("/no-such-app/x{i}")));
            mixed.push(Request {
                body: vec![b'x'; 4096],
                ..Request::get(&format!("/plain/big{i}"))
            });
        }
    }
    load_requests(tb.http, &mixed, 6);
    // A runtime that disappears: its instances' fetches fail, the proxy drops the runtime and
    // retries elsewhere; spawns sent to it fail.
    tb.kill_runtime(0);
    let after_kill: Vec<Request> = (0..60)
        .map(|i| Request::get(&format!("/{}/k{i}", ["plain", "lat-5", "throws"][i % 3])))
        .collect();
    load_requests(tb.http, &after_kill, 3);
    // No runtime left: the proxy fails the fetches on its pooled instances, drops the runtime,
    // then has no instance to offer.
    tb.kill_runtime(1);
    std::thread::sleep(Duration::from_millis(1000));
    let none: Vec<Request> = (0..8)
        .map(|i| Request::get(&format!("/plain/z{i}")))
        .collect();
    load_requests(tb.http, &none, 1);
    let t1 = tb.settled_truth();
    std::thread::sleep(Duration::from_millis(300));
    let m1 = obs.scrape();
    obs.lint();
    // Every request here came on its own connection, closed by the proxy after its response
    // (`Connection: close`), and the proxy closed its connections to runtimes that failed its
    // load query: the kernel sees neither as a receive of 0 or an error. Only the socket's
    // end (`net_close`) takes their marks away, before the kernel can put a new socket at the
    // same address (a client's taken for tarpc's, or the other way round). Both runtimes are
    // gone: no connection is left to follow or to answer on.
    let conns = connections_by_state();
    assert!(
        !conns.contains_key(&1) && !conns.contains_key(&3),
        "connections still marked after they closed: {conns:?} (1 = tarpc's, 3 = a client's)"
    );

    // Per app (and app="" for requests that never reached one), every outcome counter equals
    // the proxy's count, cold and warm starts too, and the histogram counts every request.
    let mut names: Vec<String> = apps.iter().map(|a| a.id.clone()).collect();
    names.push(String::new());
    let outcomes = observer::model::requests::OUTCOMES;
    let mut checked = 0;
    let mut seen = BTreeMap::new();
    let mut no_instance = (0, 0);
    for app in &names {
        let mut requests = 0;
        for o in outcomes {
            let want = truth_delta(&t1, &t0, app, &["outcomes", o]);
            let got = delta(
                &m1,
                &m0,
                &format!("rusty_workers_app_responses_total{{app=\"{app}\",outcome=\"{o}\"}}"),
            );
            *seen.entry(*o).or_insert(0) += want;
            if *o == "no_instance" {
                // A request that finds no runtime at all sends no RPC: nothing on the wire
                // names its app, and the observer counts it under app="". Per app the
                // observer sees at most the truth; the totals are equal.
                assert!(
                    app.is_empty() || got <= want,
                    "app {app:?} no_instance: {got} > {want}"
                );
                no_instance.0 += got;
                no_instance.1 += want;
                requests += got;
                continue;
            }
            assert_eq!(
                got,
                want,
                "app {app:?} outcome {o}: observer {got}, ground truth {want}\n{}\n{}\n{}",
                t1["apps"][app.as_str()],
                m1.iter()
                    .filter(|(k, _)| k.starts_with("rusty_workers_app_responses_total"))
                    .map(|(k, v)| format!("{k} {v}\n"))
                    .collect::<String>(),
                observer_self(&m1)
            );
            requests += want;
            checked += 1;
        }
        let count = delta(
            &m1,
            &m0,
            &format!("rusty_workers_app_request_duration_seconds_count{{app=\"{app}\"}}"),
        );
        assert_eq!(count, requests, "histogram count of app {app:?}");
        if !app.is_empty() {
            for start in ["cold", "warm"] {
                let want = truth_delta(&t1, &t0, app, &[start]);
                let got = delta(
                    &m1,
                    &m0,
                    &format!(
                        "rusty_workers_app_request_starts_total{{app=\"{app}\",start=\"{start}\"}}"
                    ),
                );
                assert_eq!(got, want, "app {app:?} {start} starts");
                checked += 1;
            }
        }
    }
    assert_eq!(no_instance.0, no_instance.1, "no_instance, all apps");
    // Instances: failed fetches make the proxy let workers go; the observer follows them.
    let mut discarded = 0;
    for a in &apps {
        let want = truth_delta(&t1, &t0, &a.id, &["discarded"]);
        let got = delta(
            &m1,
            &m0,
            &format!(
                "rusty_workers_app_instances_discarded_total{{app=\"{}\"}}",
                a.id
            ),
        );
        assert_eq!(
            got,
            want,
            "{}: instances discarded\n{}{}",
            a.id,
            m1.iter()
                .filter(|(k, _)| k.starts_with("rusty_workers_runtime_rpc_failures_total"))
                .map(|(k, v)| format!("{k} {v}\n"))
                .collect::<String>(),
            observer_self(&m1)
        );
        let alive = truth_u64(&t1, &["apps", &a.id, "instances_alive"]) as f64;
        let got = m1[&format!("rusty_workers_app_instances{{app=\"{}\"}}", a.id)];
        assert_eq!(got, alive, "{}: instances", a.id);
        discarded += want;
        checked += 2;
    }
    assert!(discarded > 0, "the scenario must discard instances");
    // The same instances by the runtime that spawned them (every spawn was after the attach).
    let alive: f64 = apps
        .iter()
        .map(|a| truth_u64(&t1, &["apps", &a.id, "instances_alive"]) as f64)
        .sum();
    let on_runtimes: f64 = m1
        .iter()
        .filter(|(k, _)| k.starts_with("rusty_workers_runtime_instances{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(on_runtimes, alive, "instances by runtime");
    assert!(alive > 0.0, "the scenario must leave instances pooled");
    // Every outcome but the catch-all.
    for o in outcomes.iter().filter(|o| **o != "internal_error") {
        assert!(
            seen[*o] > 0,
            "the scenario must produce outcome {o}: {seen:?}"
        );
    }

    // Latency: the observer's p50 and p99 fall between the bucket of the injected delay (no
    // request is shorter) and the bucket of the client's quantile (the observer times a part of
    // what the client waits: the client adds its connect and the scheduling of a busy machine,
    // which at p99 can push it past a bucket bound, as 5 ms + 5.8 ms once did).
    for (id, ms) in &slow {
        let lat: Vec<Duration> = latency_reqs
            .iter()
            .zip(&answers)
            .filter(|((app, _), (status, _))| app == id && *status == 200)
            .map(|(_, (_, d))| *d)
            .collect();
        assert_eq!(lat.len(), per_app, "{id}: every latency request succeeds");
        for q in [0.5, 0.99] {
            let client = client_quantile(lat.clone(), q);
            let want = bucket_of(client);
            let floor = bucket_of(*ms as f64 / 1e3 + 1e-4);
            let got = bucket_of_quantile(&m1, &m0, id, q);
            eprintln!(
                "e2e: {id}: client p{} {:.1} ms, observer's in bucket {got} (le {})",
                q * 100.0,
                client * 1e3,
                observer::expo::LATENCY_BUCKETS
                    .get(got)
                    .map_or("+Inf".to_string(), |b| b.to_string())
            );
            let mut slowest = lat.clone();
            slowest.sort();
            slowest.reverse();
            slowest.truncate(5);
            assert!(
                (floor..=want).contains(&got),
                "{id} ({ms} ms injected, bucket {floor}): observer p{} in bucket {got}, client's {client:.4} s in bucket {want}; slowest at the client: {slowest:?}",
                q * 100.0
            );
        }
    }

    // Per runtime: every fetch is either answered (timed) or failed without an answer.
    let by_method = |m: &BTreeMap<String, f64>, name: &str, method: &str| -> u64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(name) && k.contains(&format!("method=\"{method}\"")))
            .map(|(_, v)| *v as u64)
            .sum()
    };
    for method in ["fetch", "spawn_worker"] {
        let answered = by_method(
            &m1,
            "rusty_workers_runtime_rpc_duration_seconds_count",
            method,
        ) - by_method(
            &m0,
            "rusty_workers_runtime_rpc_duration_seconds_count",
            method,
        );
        let unanswered = ["connection_reset", "no_answer"]
            .iter()
            .map(|r| {
                let f = |m: &BTreeMap<String, f64>| -> u64 {
                    m.iter()
                        .filter(|(k, _)| {
                            k.starts_with("rusty_workers_runtime_rpc_failures_total")
                                && k.contains(&format!("method=\"{method}\""))
                                && k.contains(&format!("reason=\"{r}\""))
                        })
                        .map(|(_, v)| *v as u64)
                        .sum()
                };
                f(&m1) - f(&m0)
            })
            .sum::<u64>();
        let want = truth_u64(&t1, &["rpc_calls", method]) - truth_u64(&t0, &["rpc_calls", method]);
        assert_eq!(
            answered + unanswered,
            want,
            "{method} RPCs: answered + unanswered"
        );
        checked += 1;
    }
    let errors: u64 = m1
        .iter()
        .filter(|(k, _)| {
            k.starts_with("rusty_workers_runtime_rpc_failures_total")
                && k.contains("reason=\"error_answer\"")
                && k.contains("method=\"fetch\"")
        })
        .map(|(_, v)| *v as u64)
        .sum();
    assert!(errors > 0, "execution errors are failed fetches");
    let dead: u64 = m1
        .iter()
        .filter(|(k, _)| {
            k.starts_with("rusty_workers_runtime_rpc_failures_total")
                && (k.contains("reason=\"connection_reset\"") || k.contains("reason=\"no_answer\""))
        })
        .map(|(_, v)| *v as u64)
        .sum();
    assert!(dead > 0, "the killed runtime's calls fail on the transport");
    assert!(
        m1.keys().all(|k| !k.contains("runtime=\"unknown\"")),
        "every runtime is named:\n{}",
        m1.keys()
            .filter(|k| k.contains("runtime=\"unknown\""))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Spawn latency per app: one observation per spawn (of the apps that never met the
    // killed runtime, whose spawns all got an answer).
    for id in ["lat-50", "lat-200", "crashes"] {
        let spawns = truth_delta(&t1, &t0, id, &["spawns"]);
        let got = delta(
            &m1,
            &m0,
            &format!("rusty_workers_app_spawn_duration_seconds_count{{app=\"{id}\"}}"),
        );
        assert!(spawns > 0, "{id} spawns");
        assert_eq!(got, spawns, "{id}: spawn durations");
    }
    for c in [
        "rusty_workers_observer_unmatched_rpc_calls_total",
        "rusty_workers_observer_unmatched_responses_total",
        "rusty_workers_observer_unattributed_calls_total",
    ] {
        assert_eq!(delta(&m1, &m0, c), 0, "{c}\n{}", observer_self(&m1));
    }
    assert_eq!(m1["rusty_workers_observer_events_lost_total"], 0.0);
    eprintln!("e2e: {checked} request series equal ground truth; outcomes {seen:?}");
    obs.stop(2);
}
