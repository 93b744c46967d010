//! Loading the eBPF object, attaching its programs at the resolved sites, and reading its maps.

use crate::resolve::Resolution;
use anyhow::{anyhow, Context as _};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::{
    UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope,
};
use aya::programs::{BtfTracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use observer_common::{method, netstat, program, stat, HandleKey, Layout, Watched};
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::os::fd::OwnedFd;
use std::path::Path;

/// The compiled eBPF programs (built by `cargo xtask build-ebpf`, embedded by build.rs).
pub static EBPF_OBJECT: &[u8] = include_bytes!(env!("OBSERVER_EBPF_OBJECT"));

/// What became of one catalog probe.
#[derive(Debug, Clone)]
pub struct ProbeStatus {
    pub name: String,
    pub sites: usize,
    pub attached: usize,
    /// Empty when every site is attached; otherwise a bounded reason for a label.
    pub reason: &'static str,
    pub detail: String,
}

/// Counters the programs keep in per-CPU arrays, read at scrape time.
pub struct Counters {
    rpc_calls: PerCpuArray<MapData, u64>,
    app_requests: PerCpuArray<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    proc_net: PerCpuArray<MapData, u64>,
    program_runs: PerCpuArray<MapData, u64>,
}

fn sum(map: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64, aya::maps::MapError> {
    Ok(map.get(&index, 0)?.iter().sum())
}

impl Counters {
    pub fn rpc_calls(&self) -> Result<Vec<u64>, aya::maps::MapError> {
        (0..method::COUNT)
            .map(|m| sum(&self.rpc_calls, m))
            .collect()
    }

    /// Runs of each program, by `program::*` index (counted by the programs).
    pub fn program_runs(&self) -> Result<Vec<u64>, aya::maps::MapError> {
        (0..program::COUNT)
            .map(|p| sum(&self.program_runs, p))
            .collect()
    }

    pub fn app_requests(&self, slot: u32) -> Result<u64, aya::maps::MapError> {
        sum(&self.app_requests, slot)
    }

    /// The socket counters of process slot `slot`, indexed by `netstat::*`.
    pub fn proc_net(
        &self,
        slot: u32,
    ) -> Result<[u64; netstat::COUNT as usize], aya::maps::MapError> {
        let mut out = [0; netstat::COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            *v = sum(&self.proc_net, slot * netstat::COUNT + i as u32)?;
        }
        Ok(out)
    }

    pub fn events_lost(&self) -> Result<u64, aya::maps::MapError> {
        sum(&self.stats, stat::EVENTS_LOST)
    }

    pub fn read_errors(&self) -> Result<u64, aya::maps::MapError> {
        sum(&self.stats, stat::READ_ERRORS)
    }

    pub fn hook_errors(&self) -> Result<u64, aya::maps::MapError> {
        sum(&self.stats, stat::HOOK_ERRORS)
    }

    pub fn wire_resyncs(&self) -> Result<u64, aya::maps::MapError> {
        sum(&self.stats, stat::WIRE_RESYNCS)
    }
}

/// The maps userspace works with: events in, handle -> app slots out, counters to scrape.
pub struct Maps {
    pub events: RingBuf<MapData>,
    pub handles: BpfHashMap<MapData, HandleKey, u32>,
    /// The processes whose sockets the kernel counts, by thread group id.
    pub watched: BpfHashMap<MapData, u32, Watched>,
    pub counters: Counters,
    /// The programs' aya-log records (rare paths: a hook's first errors), for the observer's
    /// log; to be drained while the programs run.
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
}

/// The loaded object. Dropping it detaches every link and unloads the programs: uprobes made
/// through the perf `uprobe` PMU live only as long as their file descriptors.
pub struct Kernel {
    ebpf: Ebpf,
    /// The tracepoints' status (attached once, for the observer's life).
    tracepoints: Vec<ProbeStatus>,
    /// The uprobes of each watched process, by PID.
    processes: BTreeMap<u32, Attached>,
    /// The proxy's probes, shown as `target_down` while no proxy runs.
    proxy_down: Vec<ProbeStatus>,
    /// Per-request events on (request metrics).
    request_metrics: bool,
    /// The bench's floors: empty programs in place of the observer's.
    floor: Floor,
    /// Held while `--bpf-stats` keeps the kernel's BPF run-time statistics on.
    stats_fd: Option<OwnedFd>,
}

/// The floor's one probe (`observer --floor`): the proxy function every proxied request calls
/// once, for its fetch RPC (catalog/rusty-workers-proxy.toml, `runtime_rpc`). One uprobe trap
/// per request is the least a uprobe-based request metric costs; the bench compares every mode
/// with it (issue 15).
pub const FLOOR_PROBE: &str = "runtime_rpc";

/// The default's uprobes on the request path (`FLOOR_PROBE` and hyper's `recv_msg`), attached
/// with the floor's empty program by `observer --floor-probe-set`.
pub const FLOOR_PROBE_SET: &[&str] = &[FLOOR_PROBE, "http_request"];

/// What `cargo xtask bench` compares the observer with: the cost of its probes without their
/// work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// The observer itself.
    Off,
    /// One empty uprobe on `FLOOR_PROBE` and nothing else (`--floor`): one trap per request.
    OneUprobe,
    /// The default's probe set with none of its work (`--floor-probe-set`): the empty program
    /// on `FLOOR_PROBE_SET`, and the socket tracepoints only counting bytes (request metrics
    /// off). What the default costs past it is what its programs and userspace do.
    ProbeSet,
}

/// The uprobes attached in one process.
struct Attached {
    proxy: bool,
    probes: Vec<ProbeStatus>,
    links: Vec<(String, UProbeLinkId)>,
}

/// A program's run time, when the kernel keeps it (BPF_ENABLE_STATS).
#[derive(Debug, Clone)]
pub struct ProgramStats {
    pub program: String,
    pub run_seconds: f64,
}

impl Kernel {
    /// Loads the programs; `request_metrics`: per-request events on; `runtime_calls`: the
    /// runtimes' wire followed too (their served calls). `floor`: the bench's floors
    /// (`Floor`), empty programs in place of the observer's. `ring_bytes`: the event ring
    /// buffer's size. `bpf_stats`: the kernel's run-time statistics on while this lives.
    pub fn load(
        layout: &Layout,
        request_metrics: bool,
        runtime_calls: bool,
        floor: Floor,
        ring_bytes: u32,
        bpf_stats: bool,
    ) -> anyhow::Result<Self> {
        // Run-time statistics cost two clock reads (`sched_clock`, kvm-clock in these VMs) on
        // every run of every program: 0.6% of a saturated test target's CPU with the socket
        // tracepoints (`perf record -a`). Only on request; the programs count their own runs.
        let stats = if bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("--bpf-stats: turning on the kernel's BPF run-time statistics")?,
            )
        } else {
            None
        };
        let ebpf = EbpfLoader::new()
            .override_global("LAYOUT", layout, true)
            .override_global("REQUEST_METRICS", &u32::from(request_metrics), true)
            .override_global("RUNTIME_CALLS", &u32::from(runtime_calls), true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object into the kernel")?;
        Ok(Kernel {
            ebpf,
            tracepoints: Vec::new(),
            processes: BTreeMap::new(),
            proxy_down: Vec::new(),
            request_metrics,
            floor,
            stats_fd: stats,
        })
    }

    /// The socket tracepoints: per-process traffic, and (request metrics) the runtime of each
    /// answer. Attached once, for the observer's life; the `WATCHED` map filters them. They are
    /// BTF tracepoints (`tp_btf`): attached by the event's id in the kernel's BTF
    /// (`/sys/kernel/btf/vmlinux`, which preflight requires), so no tracefs is needed.
    pub fn attach_tracepoints(&mut self) -> anyhow::Result<()> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        if self.floor == Floor::OneUprobe {
            // The floor is one uprobe per request and nothing else (`FLOOR_PROBE`).
            return Ok(());
        }
        // The last column: attached only with request metrics (`sock_close` ends what they
        // follow; without them nothing is followed).
        for (status_name, name, event, for_requests) in [
            ("net_send", "sock_send", "sock_send_length", false),
            ("net_recv", "sock_recv", "sock_recv_length", false),
            ("net_close", "sock_close", "tcp_destroy_sock", true),
        ] {
            if for_requests && !self.request_metrics {
                continue;
            }
            let mut status = ProbeStatus {
                name: status_name.into(),
                sites: 1,
                attached: 0,
                reason: "",
                detail: String::new(),
            };
            let prog: &mut BtfTracePoint = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?
                .try_into()?;
            let res = match prog.load(event, &btf) {
                Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => {
                    prog.attach().map(|_| ()).map_err(|e| ("attach_failed", e))
                }
                Err(e) => Err(("load_failed", e)),
            };
            match res {
                Ok(()) => status.attached = 1,
                Err((reason, e)) => {
                    status.reason = reason;
                    status.detail = format!("BTF tracepoint {event}: {e}");
                }
            }
            self.tracepoints.push(status);
        }
        Ok(())
    }

    /// Takes the uprobe links of process `pid` out (it exited or is being replaced). Dropping
    /// them detaches them: the kernel waits for an RCU grace period per uprobe
    /// (kernel/events/uprobes.c), about 0.1 s each here, so the caller may drop them on
    /// another thread.
    pub fn detach(&mut self, pid: u32) -> Vec<UProbeLink> {
        let Some(a) = self.processes.remove(&pid) else {
            return Vec::new();
        };
        if a.proxy {
            self.proxy_down = a
                .probes
                .iter()
                .map(|p| ProbeStatus {
                    attached: 0,
                    reason: "target_down",
                    detail: String::new(),
                    ..p.clone()
                })
                .collect();
        }
        let mut out = Vec::new();
        for (name, link) in a.links {
            let prog: Option<&mut UProbe> =
                self.ebpf.program_mut(&name).and_then(|p| p.try_into().ok());
            match prog.map(|p| p.take_link(link)) {
                Some(Ok(l)) => out.push(l),
                Some(Err(e)) => log::warn!("detaching a uprobe of {name}: {e}"),
                None => log::warn!("detaching a uprobe of {name}: no such program"),
            }
        }
        out
    }

    /// Uprobe sites attached now in process `pid`.
    pub fn uprobes_attached(&self, pid: u32) -> usize {
        self.processes.get(&pid).map_or(0, |a| a.links.len())
    }

    /// Uprobe sites attached now, in every process.
    pub fn uprobes_attached_total(&self) -> usize {
        self.processes.values().map(|a| a.links.len()).sum()
    }

    /// Every probe's status: the tracepoints, the proxy's probes, and the runtimes' (summed
    /// over the runtimes: sites and attached sites add up, the first failure names the reason).
    pub fn probe_statuses(&self) -> Vec<ProbeStatus> {
        let mut out = self.tracepoints.clone();
        match self.processes.values().find(|a| a.proxy) {
            Some(a) => out.extend(a.probes.iter().cloned()),
            None => out.extend(self.proxy_down.iter().cloned()),
        }
        let mut runtime: BTreeMap<String, ProbeStatus> = BTreeMap::new();
        for a in self.processes.values().filter(|a| !a.proxy) {
            for p in &a.probes {
                let e = runtime
                    .entry(p.name.clone())
                    .or_insert_with(|| ProbeStatus {
                        sites: 0,
                        attached: 0,
                        ..p.clone()
                    });
                e.sites += p.sites;
                e.attached += p.attached;
                if e.reason.is_empty() {
                    e.reason = p.reason;
                    e.detail = p.detail.clone();
                }
            }
        }
        out.extend(runtime.into_values());
        out
    }

    /// Attaches every resolved site of every probe to `target` (a path the kernel resolves;
    /// `/proc/<pid>/exe` reaches the executable inside containers), in process `pid` only.
    /// `proxy`: these are the proxy's probes (else a runtime's). A function two probes share
    /// (folded by the linker) is attached once.
    pub fn attach(
        &mut self,
        resolutions: &[Resolution],
        target: &Path,
        pid: u32,
        proxy: bool,
    ) -> anyhow::Result<()> {
        let nz = NonZeroU32::new(pid).ok_or_else(|| anyhow!("PID 0 is not a process"))?;
        let mut a = Attached {
            proxy,
            probes: Vec::new(),
            links: Vec::new(),
        };
        let mut done: BTreeMap<(String, u64), ()> = BTreeMap::new();
        for r in resolutions {
            let wanted = match self.floor {
                Floor::Off => !r.probe.request_metrics || self.request_metrics,
                Floor::OneUprobe => proxy && r.probe.name == FLOOR_PROBE,
                Floor::ProbeSet => proxy && FLOOR_PROBE_SET.contains(&r.probe.name.as_str()),
            };
            if !wanted {
                continue;
            }
            let mut status = ProbeStatus {
                name: r.probe.name.clone(),
                sites: r.sites().len(),
                attached: 0,
                reason: "",
                detail: String::new(),
            };
            if let crate::resolve::Outcome::Unresolved(why) = &r.outcome {
                status.reason = "unresolved";
                status.detail = why.clone();
                a.probes.push(status);
                continue;
            }
            let name = if self.floor != Floor::Off {
                "floor_uprobe"
            } else {
                r.probe.program.as_str()
            };
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("eBPF object has no program {name:?}"))?
                .try_into()?;
            if let Err(e) = ensure_loaded(prog) {
                status.reason = "load_failed";
                status.detail = format!("{e:#}");
                a.probes.push(status);
                continue;
            }
            for site in r.sites() {
                if done
                    .insert((name.to_string(), site.file_offset), ())
                    .is_some()
                {
                    status.attached += 1;
                    continue;
                }
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(site.file_offset),
                    cookie: Some(r.probe.cookie()),
                };
                match prog.attach(point, target, UProbeScope::OneProcess(nz)) {
                    Ok(link) => {
                        status.attached += 1;
                        a.links.push((name.to_string(), link));
                    }
                    Err(e) => {
                        status.reason = "attach_failed";
                        status.detail = format!("site {:#x}: {e}", site.file_offset);
                    }
                }
            }
            a.probes.push(status);
        }
        self.processes.insert(pid, a);
        Ok(())
    }

    pub fn take_maps(&mut self) -> anyhow::Result<Maps> {
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf)
            .context("the eBPF object's aya-log ring buffer")?;
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("eBPF object has no map {name}"))
        };
        let events = RingBuf::try_from(take("EVENTS")?)?;
        let handles = BpfHashMap::try_from(take("HANDLE_APP")?)?;
        let watched = BpfHashMap::try_from(take("WATCHED")?)?;
        let counters = Counters {
            proc_net: PerCpuArray::try_from(take("PROC_NET")?)?,
            rpc_calls: PerCpuArray::try_from(take("RPC_CALLS")?)?,
            app_requests: PerCpuArray::try_from(take("APP_REQUESTS")?)?,
            stats: PerCpuArray::try_from(take("OBSERVER_STATS")?)?,
            program_runs: PerCpuArray::try_from(take("PROGRAM_RUNS")?)?,
        };
        Ok(Maps {
            events,
            handles,
            watched,
            counters,
            logger,
        })
    }

    /// Whether the kernel keeps BPF run-time statistics: `--bpf-stats`, or the operator's
    /// `kernel.bpf_stats_enabled`.
    pub fn bpf_stats_on(&self) -> bool {
        self.stats_fd.is_some()
            || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .is_ok_and(|v| v.trim() == "1")
    }

    /// Each program's run time, while the kernel keeps it (`bpf_stats_on`); else `None` (its
    /// figures are zeros then, not times).
    pub fn program_stats(&self) -> Option<Vec<ProgramStats>> {
        if !self.bpf_stats_on() {
            return None;
        }
        let stats = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramStats {
                    program: name.to_string(),
                    run_seconds: info.run_time().as_secs_f64(),
                })
            })
            .collect();
        Some(stats)
    }
}

fn ensure_loaded(prog: &mut UProbe) -> Result<(), aya::programs::ProgramError> {
    match prog.load() {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(()),
        Err(e) => Err(e),
    }
}
