//! The Grafana dashboards and the alert rules of `grafana/`, against a real Prometheus (Debian's
//! `prometheus`, installed by scripts/bootstrap.sh) scraping the observer and node_exporter with
//! `grafana/prometheus.yml`, while the test target is under load. Every panel's every query and
//! every alert rule must evaluate without error and return data.

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testbed_harness::{free_port, http_get, http_request, load, App, Options, Request, Testbed};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(what: &'static str, cmd: &mut Command, log: &Path) -> Running {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("starting {what}: {e} (scripts/bootstrap.sh installs prometheus, promtool and prometheus-node-exporter)")
        });
    Running(child)
}

fn wait_http(addr: SocketAddr, path: &str, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(addr, "localhost", path).is_ok_and(|(s, _)| s == 200) {
        assert!(
            Instant::now() < deadline,
            "{what} did not answer on {addr}{path}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/bootstrap.sh installs it)");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A body sent with `Transfer-Encoding: chunked`, joined (Prometheus chunks large answers).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// An instant query through Prometheus' HTTP API: the result vector, or the error.
fn query(prom: SocketAddr, q: &str) -> Result<Vec<Value>, String> {
    let body = format!("query={}", urlencode(q));
    let req = Request {
        host: "localhost".into(),
        path: "/api/v1/query".into(),
        headers: vec![(
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into(),
        )],
        body: body.into_bytes(),
    };
    let (status, text) = http_request(prom, &req).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text)
        .or_else(|_| serde_json::from_str(&dechunk(&text)))
        .map_err(|e| format!("status {status}: {e}: {text}"))?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    let data = &v["data"];
    Ok(match data["resultType"].as_str() {
        Some("vector") | Some("matrix") => data["result"].as_array().cloned().unwrap_or_default(),
        _ => vec![data["result"].clone()],
    })
}

fn api_get(prom: SocketAddr, path: &str) -> Value {
    let (_, text) = http_get(prom, "localhost", path).expect("Prometheus API");
    serde_json::from_str(&text)
        .or_else(|_| serde_json::from_str(&dechunk(&text)))
        .unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}

/// The value side of an alert rule `<value> <comparison> <threshold>`.
fn value_side(expr: &str) -> &str {
    let e = expr.trim();
    for op in [" == ", " != ", " >= ", " <= ", " > ", " < "] {
        if let Some((lhs, rhs)) = e.rsplit_once(op) {
            if rhs.trim().parse::<f64>().is_ok() {
                return lhs.trim();
            }
        }
    }
    panic!("alert rule {expr:?} is not `<value> <comparison> <threshold>`")
}

/// A dashboard query with the variables Grafana would fill in.
fn fill(expr: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut e = expr.replace("$__rate_interval", "8s");
    for (k, v) in vars {
        e = e.replace(&format!("${k}"), v);
    }
    e
}

#[test]
fn dashboards_and_alerts_evaluate_on_a_real_prometheus() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc_geteuid() },
        0,
        "the observer loads eBPF programs: run as root (CI does)"
    );
    let grafana = root().join("grafana");
    promtool(
        &[
            "check",
            "config",
            grafana.join("prometheus.yml").to_str().unwrap(),
        ],
        None,
    );
    promtool(
        &[
            "check",
            "rules",
            grafana.join("alerts.yml").to_str().unwrap(),
        ],
        None,
    );

    // The test target with every kind of traffic: a plain app, a slow one, one whose script
    // throws, instances that expire and drop out (spawns keep coming), and app changes.
    let apps = vec![
        App::new("plain"),
        App::slow("slow", 20),
        App::failing("throws", "script"),
    ];
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        ready_instance_expiration_ms: 1000,
        dropout_rate: 0.3,
        load_interval_ms: 500,
        ..Options::default()
    });
    let dir = tb.dir.clone();
    let obs_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _observer = spawn(
        "the observer",
        Command::new(env!("CARGO_BIN_EXE_observer")).args([
            "--pid",
            &tb.proxy_pid().to_string(),
            "--listen",
            &obs_addr.to_string(),
            // The BPF time panel has data only while the kernel keeps run-time statistics.
            "--bpf-stats",
        ]),
        &dir.join("observer.log"),
    );
    wait_http(
        obs_addr,
        "/metrics",
        "the observer",
        &dir.join("observer.log"),
    );
    let node_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _node = spawn(
        "prometheus-node-exporter",
        Command::new("prometheus-node-exporter").arg(format!("--web.listen-address={node_addr}")),
        &dir.join("node.log"),
    );
    wait_http(
        node_addr,
        "/metrics",
        "node_exporter",
        &dir.join("node.log"),
    );

    // grafana/prometheus.yml as it is, on this test's ports.
    let config = std::fs::read_to_string(grafana.join("prometheus.yml"))
        .unwrap()
        .replace("127.0.0.1:9898", &obs_addr.to_string())
        .replace("127.0.0.1:9100", &node_addr.to_string());
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    std::fs::copy(grafana.join("alerts.yml"), dir.join("alerts.yml")).unwrap();
    promtool(
        &[
            "check",
            "config",
            dir.join("prometheus.yml").to_str().unwrap(),
        ],
        None,
    );
    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _prometheus = spawn(
        "prometheus",
        Command::new("prometheus").args([
            &format!("--config.file={}", dir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            &format!("--web.listen-address={prom}"),
        ]),
        &dir.join("prometheus.log"),
    );
    wait_http(prom, "/-/ready", "prometheus", &dir.join("prometheus.log"));

    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (stop, http, apps) = (stop.clone(), tb.http, apps.clone());
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut paths: Vec<String> = (0..60)
                    .map(|i| format!("{}/r{round}-{i}", apps[i % apps.len()].prefix))
                    .collect();
                paths.push(format!("/no-such-app/{round}"));
                load(http, &paths, 4);
                round += 1;
            }
        })
    };
    // An app change: an eviction and a reload.
    std::thread::sleep(Duration::from_secs(4));
    let mut changed = apps.clone();
    changed[0].bundle_id = "v2".into();
    tb.set_apps(&changed);

    // Every target up, and enough scrapes for the 8 s rate windows.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = query(prom, "up").unwrap_or_default();
        if up.len() == 2 && up.iter().all(|s| s["value"][1] == "1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus' targets are not up: {up:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(16));
    let (_, live) = http_get(obs_addr, "localhost", "/metrics").unwrap();
    promtool(&["check", "metrics"], Some(&live));

    // The dashboard variables, from their own queries' labels.
    let first = |q: &str, label: &str| -> String {
        let mut vals: Vec<String> = query(prom, q)
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .iter()
            .filter_map(|s| s["metric"][label].as_str().map(str::to_string))
            .collect();
        vals.sort();
        vals.into_iter()
            .find(|v| v != "other")
            .unwrap_or_else(|| panic!("no value of {label} in {q}"))
    };
    let mut vars = BTreeMap::new();
    vars.insert(
        "app",
        first("group by (app) (rusty_workers_app_requests_total)", "app"),
    );
    vars.insert(
        "runtime",
        first(
            "group by (process) (rusty_workers_process_up{role=\"runtime\"})",
            "process",
        ),
    );

    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut boards: Vec<PathBuf> = std::fs::read_dir(grafana.join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    boards.sort();
    assert!(boards.len() >= 4, "the four boards: {boards:?}");
    for path in &boards {
        let board: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let title = board["title"].as_str().unwrap_or_default().to_string();
        for v in board["templating"]["list"].as_array().unwrap() {
            if v["type"] == "query" {
                let def = v["definition"].as_str().unwrap();
                assert!(def.starts_with("label_values("), "{title}: variable {def}");
            }
        }
        let mut ids = std::collections::HashSet::new();
        for p in board["panels"].as_array().unwrap() {
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{title}: panel id {} twice",
                p["id"]
            );
            if p["type"] == "row" {
                continue;
            }
            let name = p["title"].as_str().unwrap_or_default();
            assert!(
                p["fieldConfig"]["defaults"]["unit"].is_string(),
                "{title} / {name}: no unit"
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{title} / {name}: the datasource is the board's variable"
            );
            for t in p["targets"].as_array().unwrap() {
                let expr = fill(t["expr"].as_str().unwrap(), &vars);
                match query(prom, &expr) {
                    Ok(r) if !r.is_empty() => report.push(format!(
                        "{title} | {name} | {} | {}",
                        t["refId"].as_str().unwrap(),
                        r.len()
                    )),
                    Ok(_) => failures.push(format!("{title} / {name}: no data: {expr}")),
                    Err(e) => failures.push(format!("{title} / {name}: {e}: {expr}")),
                }
            }
        }
    }
    let rules = api_get(prom, "/api/v1/rules");
    let mut alerts = 0;
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            let expr = r["query"].as_str().unwrap();
            assert_eq!(r["health"], "ok", "rule {name}: {}", r["lastError"]);
            if let Err(e) = query(prom, expr) {
                failures.push(format!("alert {name}: {e}: {expr}"));
            }
            let value = value_side(expr);
            match query(prom, value) {
                Ok(res) if !res.is_empty() => report.push(format!(
                    "alerts | {name} (value side) | {} | {}",
                    r["state"].as_str().unwrap_or("inactive"),
                    res.len()
                )),
                Ok(_) => failures.push(format!("alert {name}: its value has no data: {value}")),
                Err(e) => failures.push(format!("alert {name}: {e}: {value}")),
            }
            alerts += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    eprintln!(
        "dashboards: board | panel | query | series returned (variables: {vars:?})\n{}",
        report.join("\n")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(alerts, 7, "every rule of grafana/alerts.yml loaded");
}
