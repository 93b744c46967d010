//! The bpftrace equivalent of the observer's default probe set, for the bench: the same
//! functions of the proxy (resolved by the observer's own resolver; the default attaches no
//! uprobe in the runtimes) and the same socket tracepoints in the proxy and the runtimes, each
//! counting in a bpftrace map, filtered by process.

use anyhow::{bail, Context as _};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// (probe name, virtual address) of every resolved site, from `observer probes --binary`.
fn sites(observer: &Path, binary: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let out = Command::new(observer)
        .arg("probes")
        .arg("--binary")
        .arg(binary)
        .output()
        .context("observer probes")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut name = String::new();
    let mut sites = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') {
            if let Some(n) = line.split_whitespace().next() {
                name = n.to_string();
            }
        } else if let Some(a) = line.trim().strip_prefix("addr 0x") {
            let hex = a.split_whitespace().next().unwrap_or("");
            sites.push((name.clone(), u64::from_str_radix(hex, 16)?));
        }
    }
    if sites.is_empty() {
        bail!("no site resolved in {}:\n{text}", binary.display());
    }
    Ok(sites)
}

/// The bpftrace program: a count per probe, bytes per process on the socket tracepoints.
pub fn script(observer: &Path, proxy: (&Path, u32), runtimes: &[u32]) -> anyhow::Result<String> {
    let mut s = String::new();
    for (name, addr) in sites(observer, proxy.0)? {
        s.push_str(&format!(
            "uprobe:{}:{addr:#x} /pid == {}/ {{ @calls[\"{name}\"] = count(); }}\n",
            proxy.0.display(),
            proxy.1
        ));
    }
    let rt_filter = runtimes
        .iter()
        .map(|p| format!("pid == {p}"))
        .collect::<Vec<_>>()
        .join(" || ");
    let all = format!("pid == {} || {rt_filter}", proxy.1);
    for (tp, map) in [
        ("sock_send_length", "sent"),
        ("sock_recv_length", "received"),
    ] {
        s.push_str(&format!(
            "tracepoint:sock:{tp} /({all}) && args->ret > 0/ {{ @{map}[pid] = sum(args->ret); @{map}_calls[pid] = count(); }}\n"
        ));
    }
    Ok(s)
}

/// bpftrace running `script`, ready when it says it attached; stopped (SIGINT) when dropped.
pub struct Running(pub crate::child::Killed);

pub fn start(script: &str, dir: &Path) -> anyhow::Result<Running> {
    let file = dir.join("bench.bt");
    std::fs::write(&file, script)?;
    let log = dir.join("bpftrace.log");
    // bpftrace 0.17 attaches `tracepoint:` probes through tracefs, which a fresh host may not
    // have mounted: it runs in a mount namespace of its own with tracefs mounted there, so
    // nothing is left mounted on the host (unshare and sh exec, bpftrace keeps the PID).
    let mut child = Command::new("unshare")
        .process_group(0)
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing \
             || exit 1; exec bpftrace \"$0\"",
        )
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("running bpftrace under unshare (scripts/bootstrap.sh installs both)")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("Attaching") {
                let _ = tx.send(());
            }
        }
    });
    let mut child = crate::child::Killed(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rx.recv_timeout(Duration::from_millis(100)).is_err() {
        let exited = matches!(child.0.try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            bail!(
                "bpftrace did not attach ({}):\n{}",
                if exited { "it exited" } else { "60 s" },
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
    // "Attaching N probes..." comes before the last probe is in.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Running(child))
}
