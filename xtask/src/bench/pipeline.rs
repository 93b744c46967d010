//! How many events per second the observer's pipeline takes: the synthetic proxy calls the
//! function of the `http_request` probe as fast as its threads can, each call one event through
//! the ring buffer to userspace; the kernel counts what it could not queue
//! (`observer_events_lost_total`), userspace what it received (`observer_events_total`).

use anyhow::Context as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use testbed_harness::http_get;

pub struct Pipeline {
    pub calls: f64,
    pub seconds: f64,
    pub received: f64,
    pub lost: f64,
    /// The observer's CPU meanwhile, as a share of one core (user + system).
    pub observer_cpu: f64,
}

fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    Ok(http_get(addr, "localhost", "/metrics")?.1)
}

/// `extra`: more observer arguments (the bench's slow drain).
pub fn measure(
    observer: &Path,
    synthetic: &Path,
    threads: u32,
    seconds: f64,
    extra: &[&str],
) -> anyhow::Result<Pipeline> {
    let mut child = crate::child::Killed(
        Command::new(synthetic)
            .args([threads.to_string(), seconds.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the synthetic proxy")?,
    );
    let mut args = vec!["--no-runtime-probes"];
    args.extend_from_slice(extra);
    let (obs, addr) = crate::child::start_observer(observer, child.0.id(), &args)?;
    let before = scrape(addr)?;
    let cpu0 = crate::bench::fixed::cpu(obs.0.id());
    child
        .0
        .stdin
        .take()
        .context("the synthetic proxy's input")?
        .write_all(b"go\n")?;
    let mut out = String::new();
    if let Some(mut o) = child.0.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut out)?;
    }
    child.0.wait()?;
    let cpu1 = crate::bench::fixed::cpu(obs.0.id());
    // The last events are drained within 10 ms.
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(addr)?;
    let d = |n: &str| crate::child::metric_sum(&after, n) - crate::child::metric_sum(&before, n);
    let calls: f64 = out.trim().parse().context("the synthetic proxy's count")?;
    drop(obs);
    Ok(Pipeline {
        calls,
        seconds,
        received: d("rusty_workers_observer_events_total"),
        lost: d("rusty_workers_observer_events_lost_total"),
        observer_cpu: ((cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1)) / seconds,
    })
}
