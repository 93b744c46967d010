//! The observer's `/metrics` scrape time and memory against the number of apps.

use std::path::Path;
use std::time::{Duration, Instant};
use testbed_harness::{http_get, load, rss_mib, App, Options, Testbed};

pub struct Scale {
    pub apps: usize,
    /// Apps the observer named (the rest count under app="other", past --max-apps).
    pub series_apps: usize,
    pub scrape_ms_p50: f64,
    pub scrape_ms_max: f64,
    pub scrape_bytes: usize,
    pub rss_mib: f64,
    /// The observer's own time per collector in the last scrape (ms), slowest first.
    pub collectors: Vec<(String, f64)>,
    /// The last snapshot of the proxy's state: its time (ms) and the bytes it read.
    pub snapshot_ms: f64,
    pub snapshot_bytes: f64,
}

/// The test target with `n` apps, every one loaded and requested once, the observer attached
/// (default probe set) from the start; then 20 scrapes.
pub fn measure(observer: &Path, n: usize) -> anyhow::Result<Scale> {
    let apps: Vec<App> = (0..n).map(|i| App::new(&format!("app-{i:05}"))).collect();
    let tb = Testbed::start(&Options {
        apps: apps.clone(),
        app_cache_size: n + 10,
        load_interval_ms: 0,
        ready_instance_expiration_ms: 600_000,
        dropout_rate: 0.0,
        ..Options::default()
    });
    let (mut child, addr) = crate::child::start_observer(observer, tb.proxy_pid(), &[])?;
    let paths: Vec<String> = apps.iter().map(|a| format!("{}/s", a.prefix)).collect();
    load(tb.http, &paths, 16);
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..20 {
        let t = Instant::now();
        body = http_get(addr, "localhost", "/metrics")?.1;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let series_apps = body
        .lines()
        .filter(|l| l.starts_with("rusty_workers_app_requests_total{"))
        .count();
    let mut collectors: Vec<(String, f64)> = body
        .lines()
        .filter_map(|l| {
            let rest =
                l.strip_prefix("rusty_workers_observer_collector_duration_seconds{collector=\"")?;
            let (name, v) = rest.split_once("\"} ")?;
            Some((name.to_string(), v.trim().parse::<f64>().ok()? * 1e3))
        })
        .collect();
    collectors.sort_by(|a, b| b.1.total_cmp(&a.1));
    let value = |name: &str| {
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    let s = Scale {
        snapshot_ms: value("rusty_workers_observer_state_snapshot_duration_seconds") * 1e3,
        snapshot_bytes: value("rusty_workers_observer_state_snapshot_bytes"),
        collectors,
        apps: n,
        series_apps,
        scrape_ms_p50: times[times.len() / 2],
        scrape_ms_max: times[times.len() - 1],
        scrape_bytes: body.len(),
        rss_mib: rss_mib(child.0.id()),
    };
    // SAFETY: kill(2) on our own child: SIGINT detaches the observer cleanly.
    unsafe { crate::child::kill(child.0.id() as i32, 2) };
    child.0.wait()?;
    Ok(s)
}
