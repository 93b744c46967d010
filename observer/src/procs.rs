//! The processes of a rusty-workers deployment on this host: the proxy and its runtimes.
//!
//! The watcher finds them (by executable name, by PID, and as the local listeners the proxy's
//! TCP connections lead to), reads procfs for each, and notices when one exits, restarts or is
//! upgraded in place. Each is shown under a stable instance name, never its PID: a runtime by
//! the address the proxy reaches it at (as the `runtime` label of the RPC metrics), the proxy
//! by its executable's name. A process that replaces another under the same name continues
//! its series: counters add the ended processes' last readings, so they never go backwards.
//!
//! procfs is read through [`Host`], so the lifecycle is tested on scripted hosts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::sockets::{StateFlags, TcpSocket};
use observer_common::{role, MAX_PROCS};

/// How long an instance with no process keeps its series (up = 0) before they are retired.
pub const RETIRE_AFTER: Duration = Duration::from_secs(300);
/// How long a runtime found by name may run without listening before it is named without an
/// address (a runtime binds its port a moment after it starts).
const LISTEN_GRACE: Duration = Duration::from_secs(2);
/// How often the proxy's connections are matched to local listeners (it reads every socket of
/// the proxy, and of the host when a listener's owner is unknown).
const PEER_SCAN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Proxy,
    Runtime,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Runtime => "runtime",
        }
    }

    /// The kernel's code for it (`observer_common::role`).
    pub fn code(self) -> u32 {
        match self {
            Role::Proxy => role::PROXY,
            Role::Runtime => role::RUNTIME,
        }
    }
}

/// What identifies one run of a process: a PID is reused, (PID, start time) is not, and the
/// executable's inode changes when the process is upgraded in place (exec of a new file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub pid: u32,
    pub start_ticks: u64,
    pub exe_dev: u64,
    pub exe_ino: u64,
}

/// One reading of a process from procfs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    /// Unix time.
    pub start_time_seconds: f64,
    /// The network namespace's inode (`/proc/<pid>/ns/net`).
    pub netns: u64,
}

/// The counters of a [`Sample`], which add up over the processes of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

impl Totals {
    fn add(&mut self, s: &Sample) {
        self.cpu_user_seconds += s.cpu_user_seconds;
        self.cpu_system_seconds += s.cpu_system_seconds;
        self.voluntary_switches += s.voluntary_switches;
        self.involuntary_switches += s.involuntary_switches;
    }

    fn plus(mut self, s: &Sample) -> Totals {
        self.add(s);
        self
    }
}

/// What the watcher reads of the host (procfs on a real one).
pub trait Host {
    /// Thread group ids of every process.
    fn pids(&self) -> Vec<u32>;
    /// `/proc/<pid>/exe`'s target (None for kernel threads and vanished processes).
    fn exe(&self, pid: u32) -> Option<PathBuf>;
    fn identity(&self, pid: u32) -> Option<Identity>;
    fn sample(&self, pid: u32) -> Option<Sample>;
    /// The TCP addresses the process listens on.
    fn listeners(&self, pid: u32) -> Vec<SocketAddr>;
    /// The remote addresses of the process's established TCP connections.
    fn peers(&self, pid: u32) -> Vec<SocketAddr>;
    /// Every TCP listener in the network namespace of process `near`: address and socket inode.
    fn listening(&self, near: u32) -> Vec<(SocketAddr, u64)>;
    /// The process holding socket `inode`.
    fn socket_owner(&self, inode: u64) -> Option<u32>;
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The proxy given by `--pid`: watched first; when it ends, its successor is found by
    /// `proxy_exe`, or else by its executable's name.
    pub proxy_pid: Option<u32>,
    /// Executable name of the proxy (`--exe`): a process whose executable's file name contains it.
    pub proxy_exe: Option<String>,
    /// Executable name of the runtimes (`--runtime-exe`).
    pub runtime_exe: String,
    /// Runtimes given by hand (`--runtime-pid`), watched as long as they run.
    pub runtime_pids: Vec<u32>,
    /// Also watch the local processes the proxy holds TCP connections to, as runtimes.
    pub runtime_peers: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy_pid: None,
            proxy_exe: None,
            runtime_exe: "rusty-workers-runtime".into(),
            runtime_pids: Vec::new(),
            runtime_peers: true,
        }
    }
}

/// Why a watched process stopped being watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited,
    /// Same PID, a new executable (exec of an upgraded binary).
    Replaced,
}

/// What changed in one [`Watcher::tick`].
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A process is watched: count its sockets in kernel slot `slot`. `again`: its instance had
    /// a process before (a restart: a re-attach).
    Started {
        role: Role,
        instance: String,
        pid: u32,
        slot: u32,
        again: bool,
    },
    Ended {
        role: Role,
        instance: String,
        pid: u32,
        why: Ended,
    },
}

#[derive(Debug, Clone)]
struct Running {
    id: Identity,
    last: Sample,
}

/// A named process and its history: the processes that held the name one after another.
#[derive(Debug, Clone)]
pub struct Instance {
    pub role: Role,
    pub name: String,
    /// Its kernel counter slot (`observer_common::Watched::slot`).
    pub slot: u32,
    running: Option<Running>,
    /// Counters of the processes that ended.
    ended: Totals,
    /// Processes that held this name.
    pub starts: u64,
    down_since: Option<Instant>,
}

impl Instance {
    pub fn up(&self) -> bool {
        self.running.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.id.pid)
    }

    /// The counters over every process of this instance.
    pub fn totals(&self) -> Totals {
        match &self.running {
            Some(r) => self.ended.plus(&r.last),
            None => self.ended,
        }
    }

    /// The current process's last reading (gauges).
    pub fn current(&self) -> Option<&Sample> {
        self.running.as_ref().map(|r| &r.last)
    }
}

/// Finds and follows the watched processes.
pub struct Watcher {
    cfg: Config,
    instances: Vec<Instance>,
    free_slots: Vec<u32>,
    /// The proxy's executable name, once known (to find its successor).
    proxy_name: Option<String>,
    /// `--pid` is used once: a PID later reused by another program is not the proxy.
    proxy_pid_used: bool,
    /// Runtimes found by name that do not listen yet: first seen.
    not_listening: HashMap<u32, Instant>,
    /// Listeners (socket inodes) the proxy is connected to that are the proxy's own or have
    /// no owner to watch.
    foreign: HashSet<u64>,
    last_peer_scan: Option<Instant>,
    /// Re-attaches per role (a process under a name that had one before).
    pub reattaches: BTreeMap<Role, u64>,
    /// Runtimes not watched because every kernel slot is taken.
    pub slots_exhausted: u64,
}

/// Whether an executable's path matches a name pattern: its file name contains it.
pub fn exe_matches(exe: &std::path::Path, pattern: &str) -> bool {
    !pattern.is_empty()
        && exe
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(pattern))
}

/// A runtime's instance name: the address the proxy reaches it at, if the proxy is connected
/// to one of its listeners; else its first listener (lowest port).
pub fn runtime_name(listeners: &[SocketAddr], proxy_peers: &[SocketAddr]) -> Option<String> {
    for p in proxy_peers {
        if listeners
            .iter()
            .any(|l| l.port() == p.port() && (l.ip() == p.ip() || l.ip().is_unspecified()))
        {
            return Some(p.to_string());
        }
    }
    listeners
        .iter()
        .min_by_key(|l| (l.port(), l.ip()))
        .map(|l| l.to_string())
}

impl Watcher {
    pub fn new(cfg: Config) -> Self {
        Watcher {
            cfg,
            instances: Vec::new(),
            free_slots: (0..MAX_PROCS).rev().collect(),
            proxy_name: None,
            proxy_pid_used: false,
            not_listening: HashMap::new(),
            foreign: HashSet::new(),
            last_peer_scan: None,
            reattaches: BTreeMap::new(),
            slots_exhausted: 0,
        }
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// The running proxy's PID.
    pub fn proxy(&self) -> Option<u32> {
        self.instances
            .iter()
            .find(|i| i.role == Role::Proxy && i.up())
            .and_then(|i| i.pid())
    }

    /// The instance a running watched process holds.
    pub fn instance_of(&self, pid: u32) -> Option<&Instance> {
        self.instances.iter().find(|i| i.pid() == Some(pid))
    }

    fn watching(&self, pid: u32) -> bool {
        self.instances.iter().any(|i| i.pid() == Some(pid))
    }

    /// Looks at the host once: ends what ended, starts what appeared, reads every process.
    pub fn tick(&mut self, host: &dyn Host, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        self.check_running(host, now, &mut changes);
        self.find_proxy(host, &mut changes);
        self.find_runtimes(host, now, &mut changes);
        for inst in &mut self.instances {
            if let Some(r) = &mut inst.running {
                if let Some(mut s) = host.sample(r.id.pid) {
                    // Context switches are summed over the live threads: a thread that exits
                    // takes its own away. A counter must not go back.
                    s.voluntary_switches = s.voluntary_switches.max(r.last.voluntary_switches);
                    s.involuntary_switches =
                        s.involuntary_switches.max(r.last.involuntary_switches);
                    r.last = s;
                }
            }
        }
        let before = self.instances.len();
        self.instances.retain(|i| {
            i.up()
                || i.down_since
                    .is_none_or(|t| now.duration_since(t) < RETIRE_AFTER)
        });
        if self.instances.len() != before {
            let used: HashSet<u32> = self.instances.iter().map(|i| i.slot).collect();
            self.free_slots = (0..MAX_PROCS).rev().filter(|s| !used.contains(s)).collect();
        }
        changes
    }

    fn check_running(&mut self, host: &dyn Host, now: Instant, changes: &mut Vec<Change>) {
        for inst in &mut self.instances {
            let Some(r) = &inst.running else { continue };
            let why = match host.identity(r.id.pid) {
                Some(id) if id == r.id => continue,
                Some(id) if id.start_ticks == r.id.start_ticks => Ended::Replaced,
                _ => Ended::Exited,
            };
            let r = inst.running.take().expect("checked above");
            // A PID given by hand names that process only: not whatever reuses the PID later.
            self.cfg.runtime_pids.retain(|p| *p != r.id.pid);
            inst.ended.add(&r.last);
            inst.down_since = Some(now);
            changes.push(Change::Ended {
                role: inst.role,
                instance: inst.name.clone(),
                pid: r.id.pid,
                why,
            });
        }
    }

    fn find_proxy(&mut self, host: &dyn Host, changes: &mut Vec<Change>) {
        if self.proxy().is_some() {
            return;
        }
        let mut candidate = None;
        if let (Some(pid), false) = (self.cfg.proxy_pid, self.proxy_pid_used) {
            self.proxy_pid_used = true;
            candidate = host.exe(pid).map(|exe| (pid, exe));
        }
        if candidate.is_none() {
            let pattern = self.cfg.proxy_exe.clone().or(self.proxy_name.clone());
            if let Some(pattern) = pattern {
                // The oldest match: a proxy that forks helpers stays the one watched.
                candidate = host
                    .pids()
                    .into_iter()
                    .filter(|&p| !self.watching(p))
                    .filter_map(|p| Some((p, host.exe(p)?)))
                    .filter(|(_, exe)| exe_matches(exe, &pattern))
                    .min_by_key(|(p, _)| host.identity(*p).map(|i| i.start_ticks));
            }
        }
        let Some((pid, exe)) = candidate else { return };
        let name = exe
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            })
            .unwrap_or_else(|| "proxy".into());
        self.proxy_name.get_or_insert(name.clone());
        self.start(host, Role::Proxy, name, pid, changes);
    }

    fn find_runtimes(&mut self, host: &dyn Host, now: Instant, changes: &mut Vec<Change>) {
        let proxy = self.proxy();
        let mut found: Vec<u32> = self.cfg.runtime_pids.clone();
        for pid in host.pids() {
            if self.watching(pid) || Some(pid) == proxy {
                continue;
            }
            if host
                .exe(pid)
                .is_some_and(|exe| exe_matches(&exe, &self.cfg.runtime_exe))
            {
                found.push(pid);
            }
        }
        let scan_due = self
            .last_peer_scan
            .is_none_or(|t| now.duration_since(t) >= PEER_SCAN_EVERY);
        let scan = self.cfg.runtime_peers && scan_due && proxy.is_some();
        // The proxy's connections (all its sockets, read from procfs) only when they are
        // needed: a busy proxy holds thousands.
        let new = found
            .iter()
            .any(|p| !self.watching(*p) && Some(*p) != proxy);
        let peers = match proxy {
            Some(p) if scan || new => host.peers(p),
            _ => Vec::new(),
        };
        if let (true, Some(proxy)) = (scan, proxy) {
            self.last_peer_scan = Some(now);
            let known: HashSet<String> = self
                .instances
                .iter()
                .filter(|i| i.up())
                .map(|i| i.name.clone())
                .collect();
            let listening = host.listening(proxy);
            // Bounded by the listeners of the namespace, not by the proxy's clients.
            self.foreign
                .retain(|ino| listening.iter().any(|(_, i)| i == ino));
            for peer in &peers {
                if known.contains(&peer.to_string()) {
                    continue;
                }
                let Some(&(_, ino)) = listening.iter().find(|(l, _)| {
                    l.port() == peer.port() && (l.ip() == peer.ip() || l.ip().is_unspecified())
                }) else {
                    continue;
                };
                if self.foreign.contains(&ino) {
                    continue;
                }
                match host.socket_owner(ino) {
                    Some(owner) if owner != proxy && !self.watching(owner) => found.push(owner),
                    Some(owner) if self.watching(owner) => {}
                    _ => {
                        self.foreign.insert(ino);
                    }
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        self.not_listening.retain(|pid, _| found.contains(pid));
        for pid in found {
            if self.watching(pid) || Some(pid) == proxy || host.identity(pid).is_none() {
                continue;
            }
            let name = match runtime_name(&host.listeners(pid), &peers) {
                Some(n) => n,
                None => {
                    let first = *self.not_listening.entry(pid).or_insert(now);
                    if now.duration_since(first) < LISTEN_GRACE {
                        continue;
                    }
                    let base = host
                        .exe(pid)
                        .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .unwrap_or_else(|| "runtime".into());
                    let base = base.trim_end_matches(" (deleted)").to_string();
                    (1..)
                        .map(|k| format!("{base}#{k}"))
                        .find(|n| {
                            !self
                                .instances
                                .iter()
                                .any(|i| &i.name == n && (i.up() || i.role != Role::Runtime))
                        })
                        .expect("an unused ordinal")
                }
            };
            self.not_listening.remove(&pid);
            self.start(host, Role::Runtime, name, pid, changes);
        }
    }

    fn start(
        &mut self,
        host: &dyn Host,
        role: Role,
        name: String,
        pid: u32,
        changes: &mut Vec<Change>,
    ) {
        let Some(id) = host.identity(pid) else { return };
        let last = host.sample(pid).unwrap_or_default();
        let again = match self
            .instances
            .iter_mut()
            .find(|i| i.role == role && i.name == name)
        {
            Some(inst) if inst.up() => return,
            Some(inst) => {
                inst.running = Some(Running { id, last });
                inst.down_since = None;
                inst.starts += 1;
                *self.reattaches.entry(role).or_insert(0) += 1;
                changes.push(Change::Started {
                    role,
                    instance: name,
                    pid,
                    slot: inst.slot,
                    again: true,
                });
                return;
            }
            None => false,
        };
        let Some(slot) = self.free_slots.pop() else {
            self.slots_exhausted += 1;
            return;
        };
        self.instances.push(Instance {
            role,
            name: name.clone(),
            slot,
            running: Some(Running { id, last }),
            ended: Totals::default(),
            starts: 1,
            down_since: None,
        });
        changes.push(Change::Started {
            role,
            instance: name,
            pid,
            slot,
            again,
        });
    }
}

/// The host as procfs and sock_diag show it.
#[derive(Default)]
pub struct ProcHost {
    /// The sock_diag socket of the proxy's network namespace, made again when that changes.
    diag: std::sync::Mutex<Option<crate::sockets::Diag>>,
    diag_failure_logged: std::sync::atomic::AtomicBool,
}

fn process(pid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(pid).ok()?).ok()
}

fn socket_inodes(p: &procfs::process::Process) -> HashSet<u64> {
    let Ok(fds) = p.fd() else {
        return HashSet::new();
    };
    fds.filter_map(|fd| match fd.ok()?.target {
        procfs::process::FDTarget::Socket(ino) => Some(ino),
        _ => None,
    })
    .collect()
}

/// The TCP sockets of `pid`'s network namespace as `/proc/<pid>/net/tcp{,6}` list them: every
/// socket formatted as text (TIME_WAIT ones too), so only where sock_diag is unavailable.
fn procfs_tcp(pid: u32, states: &StateFlags) -> Vec<TcpSocket> {
    let Some(p) = process(pid) else {
        return Vec::new();
    };
    let mut all = p.tcp().unwrap_or_default();
    all.extend(p.tcp6().unwrap_or_default());
    all.into_iter()
        .filter(|e| {
            let bit = match e.state {
                procfs::net::TcpState::Established => StateFlags::ESTABLISHED,
                procfs::net::TcpState::Listen => StateFlags::LISTEN,
                _ => return false,
            };
            states.contains(bit)
        })
        .map(|e| TcpSocket {
            local: e.local_address,
            remote: e.remote_address,
            inode: e.inode,
        })
        .collect()
}

impl ProcHost {
    /// The TCP sockets in one of `states` of `pid`'s network namespace: from sock_diag, which
    /// filters by state in the kernel (`crate::sockets`), else from procfs.
    fn tcp(&self, pid: u32, states: StateFlags) -> Vec<TcpSocket> {
        let netns = crate::sockets::netns_of(pid);
        if netns == 0 {
            return Vec::new(); // the process is gone
        }
        let mut diag = self.diag.lock().unwrap_or_else(|e| e.into_inner());
        if diag.as_ref().is_none_or(|d| d.netns() != netns) {
            *diag = match crate::sockets::Diag::open(pid) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.diag_failed(&e);
                    None
                }
            };
        }
        if let Some(d) = diag.as_mut() {
            match d.tcp(states.clone()) {
                Ok(v) => return v,
                Err(e) => {
                    self.diag_failed(&e);
                    *diag = None;
                }
            }
        }
        procfs_tcp(pid, &states)
    }

    fn diag_failed(&self, e: &crate::sockets::Error) {
        use std::sync::atomic::Ordering;
        if !self.diag_failure_logged.swap(true, Ordering::Relaxed) {
            log::warn!(
                "sock_diag: {e}; reading /proc/<pid>/net/tcp instead, which costs time in proportion to every socket of the namespace (TIME_WAIT ones too)"
            );
        }
    }
}

impl Host for ProcHost {
    fn pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    fn exe(&self, pid: u32) -> Option<PathBuf> {
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    }

    fn identity(&self, pid: u32) -> Option<Identity> {
        use std::os::unix::fs::MetadataExt as _;
        let stat = process(pid)?.stat().ok()?;
        // Through the link: the inode that runs, also in another mount namespace.
        let meta = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        Some(Identity {
            pid,
            start_ticks: stat.starttime,
            exe_dev: meta.dev(),
            exe_ino: meta.ino(),
        })
    }

    fn sample(&self, pid: u32) -> Option<Sample> {
        let p = process(pid)?;
        let stat = p.stat().ok()?;
        // /proc/<pid>/status counts the switches of the main thread only: add every thread's.
        let (mut voluntary, mut involuntary) = (0, 0);
        if let Ok(tasks) = p.tasks() {
            for t in tasks.flatten() {
                if let Ok(st) = t.status() {
                    voluntary += st.voluntary_ctxt_switches.unwrap_or(0);
                    involuntary += st.nonvoluntary_ctxt_switches.unwrap_or(0);
                }
            }
        }
        let tps = procfs::ticks_per_second() as f64;
        let boot = procfs::boot_time_secs().unwrap_or(0) as f64;
        Some(Sample {
            cpu_user_seconds: stat.utime as f64 / tps,
            cpu_system_seconds: stat.stime as f64 / tps,
            voluntary_switches: voluntary,
            involuntary_switches: involuntary,
            resident_bytes: stat.rss * procfs::page_size(),
            virtual_bytes: stat.vsize,
            threads: stat.num_threads.max(0) as u64,
            open_fds: p.fd_count().unwrap_or(0) as u64,
            start_time_seconds: boot + stat.starttime as f64 / tps,
            netns: crate::sockets::netns_of(pid),
        })
    }

    fn listeners(&self, pid: u32) -> Vec<SocketAddr> {
        let Some(p) = process(pid) else {
            return Vec::new();
        };
        let mine = socket_inodes(&p);
        self.tcp(pid, StateFlags::LISTEN)
            .into_iter()
            .filter(|e| mine.contains(&e.inode))
            .map(|e| e.local)
            .collect()
    }

    fn peers(&self, pid: u32) -> Vec<SocketAddr> {
        let Some(p) = process(pid) else {
            return Vec::new();
        };
        let mine = socket_inodes(&p);
        let mut out: Vec<SocketAddr> = self
            .tcp(pid, StateFlags::ESTABLISHED)
            .into_iter()
            .filter(|e| mine.contains(&e.inode))
            .map(|e| e.remote)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn listening(&self, near: u32) -> Vec<(SocketAddr, u64)> {
        self.tcp(near, StateFlags::LISTEN)
            .into_iter()
            .map(|e| (e.local, e.inode))
            .collect()
    }

    fn socket_owner(&self, inode: u64) -> Option<u32> {
        self.pids()
            .into_iter()
            .find(|&pid| process(pid).is_some_and(|p| socket_inodes(&p).contains(&inode)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// sock_diag and procfs list the same sockets of this process's namespace (the ones of
    /// this test: other tests open sockets meanwhile), and the host uses sock_diag.
    #[test]
    fn sock_diag_lists_what_procfs_lists() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(at).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        let host = ProcHost::default();
        let pid = std::process::id();
        let ours = |v: Vec<TcpSocket>| -> Vec<TcpSocket> {
            let mut v: Vec<_> = v
                .into_iter()
                .filter(|s| s.local == at || s.remote == at)
                .collect();
            v.sort();
            v
        };
        for (states, n) in [(StateFlags::LISTEN, 1), (StateFlags::ESTABLISHED, 2)] {
            let diag = ours(host.tcp(pid, states.clone()));
            assert_eq!(diag.len(), n, "{states:?}: {diag:?}");
            assert_eq!(diag, ours(procfs_tcp(pid, &states)), "{states:?}");
        }
        assert!(
            host.diag.lock().unwrap().is_some(),
            "sock_diag answered (no fallback)"
        );
        assert!(host.listeners(pid).contains(&at));
        assert!(host.peers(pid).contains(&at));
        assert!(host.listening(pid).iter().any(|(a, _)| *a == at));
    }

    #[derive(Clone)]
    struct Proc {
        exe: &'static str,
        start: u64,
        ino: u64,
        cpu: f64,
        switches: u64,
        listen: Vec<SocketAddr>,
        peers: Vec<SocketAddr>,
    }

    #[derive(Default)]
    struct Fake {
        procs: RefCell<BTreeMap<u32, Proc>>,
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    impl Fake {
        fn add(&self, pid: u32, exe: &'static str, listen: &[&str]) {
            self.procs.borrow_mut().insert(
                pid,
                Proc {
                    exe,
                    start: pid as u64 * 10,
                    ino: 1,
                    cpu: 0.0,
                    switches: 0,
                    listen: listen.iter().map(|a| addr(a)).collect(),
                    peers: Vec::new(),
                },
            );
        }
        fn with(&self, pid: u32, f: impl FnOnce(&mut Proc)) {
            f(self
                .procs
                .borrow_mut()
                .get_mut(&pid)
                .expect("a fake process"))
        }
        fn kill(&self, pid: u32) {
            self.procs.borrow_mut().remove(&pid);
        }
    }

    impl Host for Fake {
        fn pids(&self) -> Vec<u32> {
            self.procs.borrow().keys().copied().collect()
        }
        fn exe(&self, pid: u32) -> Option<PathBuf> {
            self.procs.borrow().get(&pid).map(|p| PathBuf::from(p.exe))
        }
        fn identity(&self, pid: u32) -> Option<Identity> {
            self.procs.borrow().get(&pid).map(|p| Identity {
                pid,
                start_ticks: p.start,
                exe_dev: 1,
                exe_ino: p.ino,
            })
        }
        fn sample(&self, pid: u32) -> Option<Sample> {
            self.procs.borrow().get(&pid).map(|p| Sample {
                cpu_user_seconds: p.cpu,
                voluntary_switches: p.switches,
                ..Default::default()
            })
        }
        fn listeners(&self, pid: u32) -> Vec<SocketAddr> {
            self.procs
                .borrow()
                .get(&pid)
                .map(|p| p.listen.clone())
                .unwrap_or_default()
        }
        fn peers(&self, pid: u32) -> Vec<SocketAddr> {
            self.procs
                .borrow()
                .get(&pid)
                .map(|p| p.peers.clone())
                .unwrap_or_default()
        }
        fn listening(&self, _near: u32) -> Vec<(SocketAddr, u64)> {
            self.procs
                .borrow()
                .iter()
                .flat_map(|(pid, p)| p.listen.iter().map(move |a| (*a, *pid as u64)))
                .collect()
        }
        fn socket_owner(&self, inode: u64) -> Option<u32> {
            let pid = inode as u32;
            self.procs.borrow().contains_key(&pid).then_some(pid)
        }
    }

    fn started(c: &[Change]) -> Vec<(Role, String, u32, bool)> {
        c.iter()
            .filter_map(|c| match c {
                Change::Started {
                    role,
                    instance,
                    pid,
                    again,
                    ..
                } => Some((*role, instance.clone(), *pid, *again)),
                _ => None,
            })
            .collect()
    }

    fn ended(c: &[Change]) -> Vec<(String, Ended)> {
        c.iter()
            .filter_map(|c| match c {
                Change::Ended { instance, why, .. } => Some((instance.clone(), *why)),
                _ => None,
            })
            .collect()
    }

    fn watcher(proxy_pid: u32) -> Watcher {
        Watcher::new(Config {
            proxy_pid: Some(proxy_pid),
            ..Config::default()
        })
    }

    #[test]
    fn names_match_the_executable_file_name() {
        for (exe, pattern, want) in [
            (
                "/usr/bin/rusty-workers-runtime",
                "rusty-workers-runtime",
                true,
            ),
            (
                "/app/rusty-workers-runtime (deleted)",
                "rusty-workers-runtime",
                true,
            ),
            (
                "/opt/rusty-workers-runtime/bin/other",
                "rusty-workers-runtime",
                false,
            ),
            (
                "/usr/bin/rusty-workers-proxy",
                "rusty-workers-runtime",
                false,
            ),
            ("/usr/bin/anything", "", false),
        ] {
            assert_eq!(
                exe_matches(std::path::Path::new(exe), pattern),
                want,
                "{exe} ~ {pattern}"
            );
        }
    }

    #[test]
    fn runtimes_are_named_by_the_address_the_proxy_uses() {
        let cases: [(&[&str], &[&str], Option<&str>); 5] = [
            (
                &["0.0.0.0:7000"],
                &["127.0.0.1:7000"],
                Some("127.0.0.1:7000"),
            ),
            (
                &["127.0.0.1:7000"],
                &["10.0.0.1:7000", "127.0.0.1:7000"],
                Some("127.0.0.1:7000"),
            ),
            (
                &["127.0.0.1:9000", "127.0.0.1:7000"],
                &[],
                Some("127.0.0.1:7000"),
            ),
            (&["[::]:7000"], &["[::1]:7000"], Some("[::1]:7000")),
            (&[], &["127.0.0.1:7000"], None),
        ];
        for (listen, peers, want) in cases {
            let l: Vec<_> = listen.iter().map(|a| addr(a)).collect();
            let p: Vec<_> = peers.iter().map(|a| addr(a)).collect();
            assert_eq!(
                runtime_name(&l, &p).as_deref(),
                want,
                "{listen:?} {peers:?}"
            );
        }
    }

    #[test]
    fn finds_the_proxy_and_runtimes_by_name_and_by_connection() {
        let host = Fake::default();
        host.add(100, "/bin/rusty-workers-proxy", &["127.0.0.1:8080"]);
        host.add(200, "/bin/rusty-workers-runtime", &["127.0.0.1:7001"]);
        host.add(300, "/opt/custom-runtime", &["127.0.0.1:7002"]);
        host.add(400, "/bin/bash", &[]);
        host.with(100, |p| {
            p.peers = vec![addr("127.0.0.1:7001"), addr("127.0.0.1:7002")]
        });
        let mut w = watcher(100);
        let t0 = Instant::now();
        let got = started(&w.tick(&host, t0));
        assert_eq!(
            got,
            vec![
                (Role::Proxy, "rusty-workers-proxy".into(), 100, false),
                (Role::Runtime, "127.0.0.1:7001".into(), 200, false),
                (Role::Runtime, "127.0.0.1:7002".into(), 300, false),
            ]
        );
        assert!(w.tick(&host, t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn a_runtime_that_does_not_listen_is_named_after_a_grace() {
        let host = Fake::default();
        host.add(100, "/bin/rusty-workers-proxy", &[]);
        host.add(200, "/bin/rusty-workers-runtime", &[]);
        let mut w = watcher(100);
        let t0 = Instant::now();
        assert_eq!(started(&w.tick(&host, t0)).len(), 1, "the proxy only");
        let got = started(&w.tick(&host, t0 + LISTEN_GRACE));
        assert_eq!(
            got,
            vec![(Role::Runtime, "rusty-workers-runtime#1".into(), 200, false)]
        );
    }

    #[test]
    fn restarts_continue_the_series_and_count_reattaches() {
        let host = Fake::default();
        host.add(100, "/bin/rusty-workers-proxy", &[]);
        host.add(200, "/bin/rusty-workers-runtime", &["127.0.0.1:7001"]);
        host.with(200, |p| p.cpu = 5.0);
        let mut w = watcher(100);
        let t0 = Instant::now();
        w.tick(&host, t0);
        let rt = |w: &Watcher| {
            w.instances()
                .iter()
                .find(|i| i.role == Role::Runtime)
                .cloned()
                .unwrap()
        };
        assert_eq!(rt(&w).totals().cpu_user_seconds, 5.0);

        // Killed: seen on the next tick, series kept with up = 0.
        host.kill(200);
        let c = w.tick(&host, t0 + Duration::from_millis(500));
        assert_eq!(ended(&c), vec![("127.0.0.1:7001".into(), Ended::Exited)]);
        assert!(!rt(&w).up());
        assert_eq!(rt(&w).totals().cpu_user_seconds, 5.0);

        // Back at the same address, as a new process: same instance, counters add up.
        host.add(201, "/bin/rusty-workers-runtime", &["127.0.0.1:7001"]);
        host.with(201, |p| p.cpu = 1.0);
        let c = w.tick(&host, t0 + Duration::from_secs(1));
        assert_eq!(
            started(&c),
            vec![(Role::Runtime, "127.0.0.1:7001".into(), 201, true)]
        );
        assert_eq!(rt(&w).totals().cpu_user_seconds, 6.0);
        assert_eq!(rt(&w).starts, 2);
        assert_eq!(w.reattaches.get(&Role::Runtime), Some(&1));

        // The proxy upgraded in place: same PID and start, new executable inode.
        host.with(100, |p| p.ino = 2);
        let c = w.tick(&host, t0 + Duration::from_millis(1500));
        assert_eq!(
            ended(&c),
            vec![("rusty-workers-proxy".into(), Ended::Replaced)]
        );
        assert_eq!(
            started(&c),
            vec![(Role::Proxy, "rusty-workers-proxy".into(), 100, true)]
        );

        // The proxy restarted under a new PID: found again by its executable's name.
        host.kill(100);
        host.add(101, "/bin/rusty-workers-proxy", &[]);
        let c = w.tick(&host, t0 + Duration::from_secs(2));
        assert_eq!(ended(&c).len(), 1);
        assert_eq!(
            started(&c),
            vec![(Role::Proxy, "rusty-workers-proxy".into(), 101, true)]
        );
        assert_eq!(w.reattaches.get(&Role::Proxy), Some(&2));
    }

    #[test]
    fn context_switches_do_not_go_back_when_a_thread_exits() {
        let host = Fake::default();
        host.add(100, "/bin/rusty-workers-proxy", &[]);
        host.with(100, |p| p.switches = 500);
        let mut w = watcher(100);
        let t0 = Instant::now();
        w.tick(&host, t0);
        host.with(100, |p| p.switches = 300);
        w.tick(&host, t0 + Duration::from_secs(1));
        assert_eq!(w.instances()[0].totals().voluntary_switches, 500);
        host.with(100, |p| p.switches = 600);
        w.tick(&host, t0 + Duration::from_secs(2));
        assert_eq!(w.instances()[0].totals().voluntary_switches, 600);
    }

    #[test]
    fn a_gone_instance_is_retired_and_its_slot_reused() {
        let host = Fake::default();
        host.add(100, "/bin/rusty-workers-proxy", &[]);
        host.add(200, "/bin/rusty-workers-runtime", &["127.0.0.1:7001"]);
        let mut w = watcher(100);
        let t0 = Instant::now();
        w.tick(&host, t0);
        let slot = w.instances()[1].slot;
        host.kill(200);
        w.tick(&host, t0 + Duration::from_secs(1));
        assert_eq!(w.instances().len(), 2, "kept while down");
        w.tick(&host, t0 + Duration::from_secs(1) + RETIRE_AFTER);
        assert_eq!(w.instances().len(), 1, "retired");
        host.add(300, "/bin/rusty-workers-runtime", &["127.0.0.1:7003"]);
        let c = w.tick(&host, t0 + Duration::from_secs(2) + RETIRE_AFTER);
        match &c[..] {
            [Change::Started {
                slot: s,
                again: false,
                ..
            }] => assert_eq!(*s, slot),
            other => panic!("expected one new runtime, got {other:?}"),
        }
    }

    #[test]
    fn the_proxy_by_name_and_runtimes_by_hand() {
        let host = Fake::default();
        host.add(100, "/bin/bash", &[]);
        host.add(300, "/srv/proxy-v2", &[]);
        host.add(200, "/srv/rt", &["127.0.0.1:7001"]);
        let mut w = Watcher::new(Config {
            proxy_exe: Some("proxy".into()),
            runtime_pids: vec![200],
            ..Config::default()
        });
        let got = started(&w.tick(&host, Instant::now()));
        assert_eq!(
            got,
            vec![
                (Role::Proxy, "proxy-v2".into(), 300, false),
                (Role::Runtime, "127.0.0.1:7001".into(), 200, false),
            ]
        );
        // The runtime ends and its PID goes to another program: that one is not watched.
        host.kill(200);
        host.add(200, "/bin/bash", &[]);
        host.with(200, |p| p.start = 999);
        let t1 = Instant::now() + Duration::from_secs(1);
        assert!(started(&w.tick(&host, t1)).is_empty());
        assert!(started(&w.tick(&host, t1 + LISTEN_GRACE)).is_empty());
    }

    #[test]
    fn a_pid_given_by_hand_is_used_once() {
        let host = Fake::default();
        host.add(100, "/bin/rusty-workers-proxy", &[]);
        let mut w = watcher(100);
        let t0 = Instant::now();
        w.tick(&host, t0);
        host.kill(100);
        // PID 100 reused by another program: not the proxy.
        host.add(100, "/bin/bash", &[]);
        host.with(100, |p| p.start = 999);
        let c = w.tick(&host, t0 + Duration::from_secs(1));
        assert!(started(&c).is_empty(), "{c:?}");
        assert_eq!(w.proxy(), None);
    }
}
