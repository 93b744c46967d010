//! The child processes the tasks start: the observer on a free port, killed when dropped.

use anyhow::{bail, Context as _};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testbed_harness::http_get;

/// Sum of a metric's series in a Prometheus exposition.
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The observer attached to `pid` with `extra` arguments, on a free loopback port, once it
/// serves `/metrics`.
pub(crate) fn start_observer(
    observer: &Path,
    pid: u32,
    extra: &[&str],
) -> anyhow::Result<(Killed, std::net::SocketAddr)> {
    start_observer_logged(observer, pid, extra, Stdio::null())
}

/// `start_observer`, its log (stderr) going to `log`.
pub(crate) fn start_observer_logged(
    observer: &Path,
    pid: u32,
    extra: &[&str],
    log: Stdio,
) -> anyhow::Result<(Killed, std::net::SocketAddr)> {
    let addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", testbed_harness::free_port()).parse()?;
    let child = Killed(
        Command::new(observer)
            .process_group(0)
            .args(["--pid", &pid.to_string(), "--listen", &addr.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", observer.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, "localhost", "/metrics").is_err() {
        if Instant::now() > deadline {
            bail!("the observer did not serve http://{addr}/metrics");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((child, addr))
}

/// A child process killed when dropped (an error must not leave an observer attached).
pub(crate) struct Killed(pub(crate) std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

extern "C" {
    pub(crate) fn kill(pid: i32, sig: i32) -> i32;
}
