//! The command line: `observer [--pid PID | --exe NAME] ...` runs the daemon, `observer probes`
//! checks a target.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use observer::catalog::Catalog;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Show, for every catalog probe, whether it resolves in the target and where.
    Probes(ProbesArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "binary", "symbols"])))]
pub(crate) struct ProbesArgs {
    /// A running proxy.
    #[arg(long)]
    pub(crate) pid: Option<u32>,
    /// A proxy executable on disk.
    #[arg(long)]
    pub(crate) binary: Option<PathBuf>,
    /// A symbol table dump instead of a binary (tab-separated: address size type mangled
    /// demangled, hex numbers), such as shared/rusty-workers/proxy-release.functions.tsv.
    #[arg(long)]
    pub(crate) symbols: Option<PathBuf>,
    /// With --symbols: file offset = address - this (0x1000 for a Rust PIE's .text).
    #[arg(long, default_value = "0x1000", value_parser = parse_hex)]
    pub(crate) text_bias: u64,
    /// Probe catalog (TOML); default: the built-in rusty-workers proxy catalog.
    #[arg(long)]
    pub(crate) catalog: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// PID of the rusty-workers proxy to observe. When it ends, the observer waits for its
    /// successor (by --exe, or else by the same executable name) and attaches to it.
    #[arg(long)]
    pub(crate) pid: Option<u32>,
    /// Find the proxy by its executable's name instead (a process whose executable's file name
    /// contains NAME, e.g. rusty-workers-proxy); waits for it if none runs yet.
    #[arg(long, value_name = "NAME")]
    pub(crate) exe: Option<String>,
    /// Runtime processes: those whose executable's file name contains NAME.
    #[arg(long, value_name = "NAME", default_value = "rusty-workers-runtime")]
    pub(crate) runtime_exe: String,
    /// Also watch this process as a runtime (repeatable).
    #[arg(long, value_name = "PID")]
    pub(crate) runtime_pid: Vec<u32>,
    /// Runtime probe catalog (TOML, for --runtime-polls); default: the built-in rusty-workers
    /// runtime catalog.
    #[arg(long, value_name = "FILE", requires = "runtime_polls")]
    pub(crate) runtime_catalog: Option<PathBuf>,
    /// Leave out the runtimes' served calls (their tarpc frames, followed in the socket
    /// tracepoints); their procfs and socket figures stay.
    #[arg(long, conflicts_with = "runtime_polls")]
    pub(crate) no_runtime_probes: bool,
    /// Also count the polls of each call a runtime serves (rusty_workers_runtime_server_polls_total):
    /// uprobes on its tarpc method futures, two traps per served call.
    #[arg(long)]
    pub(crate) runtime_polls: bool,
    /// Do not watch, as runtimes, the local processes the proxy holds TCP connections to
    /// (say, when a database runs on the same host).
    #[arg(long)]
    pub(crate) no_runtime_peers: bool,
    /// Address of the Prometheus endpoint (`/metrics`); 9898 is the 2021 exporter's port.
    #[arg(long, default_value = "0.0.0.0:9898")]
    pub(crate) listen: SocketAddr,
    /// Probe catalog (TOML); default: the built-in rusty-workers proxy catalog.
    #[arg(long)]
    pub(crate) catalog: Option<PathBuf>,
    /// Distinct app labels before further apps are counted under app="other".
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..4096))]
    pub(crate) max_apps: u16,
    /// Leave out the per-request probes: no request latency, outcomes or per-runtime RPC
    /// metrics (nor the runtimes' served calls), but the request path pays 1 uprobe instead of 2.
    #[arg(long)]
    pub(crate) no_request_metrics: bool,
    /// Turn on the kernel's BPF run-time statistics while the observer runs, for the time
    /// spent in each program (rusty_workers_observer_bpf_program_run_seconds_total). They cost
    /// two clock reads on every run of every BPF program on the host, the socket tracepoints'
    /// on every socket call (BENCHMARKS.md). Without it that time is exported only when
    /// kernel.bpf_stats_enabled is already 1; the programs count their runs either way.
    #[arg(long)]
    pub(crate) bpf_stats: bool,
    /// For `cargo xtask bench`: attach one empty program on the proxy function every request
    /// calls, and nothing else (the floor of a uprobe-based observer's cost); serves no
    /// meaningful metrics.
    #[arg(long, hide = true)]
    pub(crate) floor: bool,
    /// For `cargo xtask bench`: the default's uprobes on the request path with empty
    /// programs, and the socket tracepoints counting bytes only: what the default's probe set
    /// costs before any of its work; serves no meaningful metrics.
    #[arg(long, hide = true, conflicts_with = "floor")]
    pub(crate) floor_probe_set: bool,
    /// How often the proxy's state is read from its memory (apps loaded, ready instances),
    /// in milliseconds. Its gauges are exported while the last good read is at most a second
    /// old (or two intervals, if longer).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub(crate) state_interval_ms: u64,
    /// For `cargo xtask bench`: how often userspace drains the ring buffer (a slow drain
    /// overruns it, to show that the losses are counted).
    #[arg(long, hide = true, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) drain_interval_ms: u64,
    /// Size of the ring buffer that carries events to userspace, in bytes: a power of two, at
    /// least 4096. The default holds about 5,100 requests' records (six each, ~820 bytes with the ring's
    /// headers), some 50 drains' worth at 10,000 requests/s; events past it are lost and counted
    /// (rusty_workers_observer_events_lost_total).
    #[arg(long, default_value_t = 4 << 20, value_parser = ring_bytes)]
    pub(crate) ring_bytes: u32,
}

/// A ring buffer's size: the kernel wants a power of two and a multiple of the page size
/// (kernel/bpf/ringbuf.c, ringbuf_map_alloc).
pub(crate) fn ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count"))?;
    if n < 4096 || !n.is_power_of_two() || n > 1 << 30 {
        return Err(format!(
            "{n} is not a power of two between 4096 and 1073741824 (e.g. 4194304 for 4 MiB)"
        ));
    }
    Ok(n)
}

pub(crate) fn load_catalog(path: Option<&Path>) -> anyhow::Result<Catalog> {
    match path {
        None => Ok(Catalog::builtin_proxy()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading catalog {}", p.display()))?;
            Ok(Catalog::parse(&text, &p.display().to_string())?)
        }
    }
}

pub(crate) fn parse_hex(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(digits, 16).map_err(|e| format!("{s:?} is not a hex number: {e}"))
}
