//! Processes coming and going: the proxy and its runtimes watched, probes attached and detached
//! as they start and end.

use observer::catalog::Catalog;
use observer::model::Model;
use observer::snapshots::{self, Snapshots};
use observer::symbols::SymbolTable;
use observer::target::Target;
use observer::{coverage, kernel, procs, resolve};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Everything the lifecycle touches when processes come and go.
pub(crate) struct Lifecycle {
    pub(crate) catalog: Catalog,
    /// None with `--no-runtime-probes`.
    pub(crate) runtime_catalog: Option<Catalog>,
    /// Runtime probe resolutions by executable (device, inode): runtimes share one binary.
    pub(crate) runtime_symbols: HashMap<(u64, u64), Arc<Vec<resolve::Resolution>>>,
    /// Runtime probe failures are logged once, not per runtime.
    pub(crate) runtime_failures_logged: bool,
    pub(crate) kernel: Arc<Mutex<Option<kernel::Kernel>>>,
    pub(crate) watched: aya::maps::HashMap<aya::maps::MapData, u32, observer_common::Watched>,
    pub(crate) counters: Arc<kernel::Counters>,
    pub(crate) started: std::time::Instant,
    pub(crate) snapshots: Snapshots,
    pub(crate) host: procs::ProcHost,
}

impl Lifecycle {
    /// One look at the host: processes that ended are let go, new ones watched, and the
    /// proxy's uprobes follow the proxy.
    pub(crate) fn tick(&mut self, shared: &Mutex<Model>) {
        let t0 = std::time::Instant::now();
        let changes = {
            let mut s = shared.lock().unwrap();
            let changes = s.watcher.tick(&self.host, t0);
            s.procs_seconds = t0.elapsed().as_secs_f64();
            changes
        };
        for c in changes {
            self.apply(c, shared);
        }
    }

    pub(crate) fn since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub(crate) fn apply(&mut self, change: procs::Change, shared: &Mutex<Model>) {
        match change {
            procs::Change::Started {
                role,
                instance,
                pid,
                slot,
                again,
            } => {
                let w = observer_common::Watched {
                    slot,
                    role: role.code(),
                };
                if let Err(e) = self.watched.insert(pid, w, 0) {
                    log::warn!("cannot count the sockets of PID {pid}: {e}");
                }
                if !again {
                    if let Ok(base) = self.counters.proc_net(slot) {
                        shared.lock().unwrap().net_base.insert(slot, base);
                    }
                }
                log::info!(
                    "[{:.3}s] {} {instance} {}: PID {pid}",
                    self.since_start(),
                    role.as_str(),
                    if again { "is back" } else { "found" }
                );
                match role {
                    procs::Role::Proxy => self.attach_proxy(pid, again, shared),
                    procs::Role::Runtime => self.attach_runtime(pid, &instance, shared),
                }
            }
            procs::Change::Ended {
                role,
                instance,
                pid,
                why,
            } => {
                let _ = self.watched.remove(&pid);
                if role == procs::Role::Proxy {
                    self.snapshots.set_reader(None);
                }
                log::warn!(
                    "[{:.3}s] {} {instance} (PID {pid}) {}",
                    self.since_start(),
                    role.as_str(),
                    match why {
                        procs::Ended::Exited => "exited",
                        procs::Ended::Replaced => "was replaced by a new executable",
                    }
                );
                let links = self
                    .kernel
                    .lock()
                    .unwrap()
                    .as_mut()
                    .map(|k| k.detach(pid))
                    .unwrap_or_default();
                self.drop_links(links);
            }
        }
    }

    /// Detaches uprobe links away from the event loop and the scrapes (it takes a while).
    pub(crate) fn drop_links(&self, links: Vec<aya::programs::uprobe::UProbeLink>) {
        if links.is_empty() {
            return;
        }
        let started = self.started;
        std::thread::spawn(move || {
            let n = links.len();
            drop(links);
            log::info!(
                "[{:.3}s] {n} uprobe sites of an ended process detached",
                started.elapsed().as_secs_f64()
            );
        });
    }

    /// The runtime probes, in a runtime process (its symbols resolved once per executable).
    pub(crate) fn attach_runtime(&mut self, pid: u32, instance: &str, shared: &Mutex<Model>) {
        let t0 = std::time::Instant::now();
        self.attach_runtime_probes(pid, instance);
        shared
            .lock()
            .unwrap()
            .attach_seconds
            .insert("runtime", t0.elapsed().as_secs_f64());
    }

    pub(crate) fn attach_runtime_probes(&mut self, pid: u32, instance: &str) {
        let Some(catalog) = &self.runtime_catalog else {
            return;
        };
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let id = {
            use std::os::unix::fs::MetadataExt as _;
            match std::fs::metadata(&exe) {
                Ok(m) => (m.dev(), m.ino()),
                Err(e) => {
                    log::warn!("runtime {instance} (PID {pid}): {e}; its probes are not attached");
                    return;
                }
            }
        };
        let resolutions = match self.runtime_symbols.get(&id) {
            Some(r) => r.clone(),
            None => match SymbolTable::from_elf_file(&exe) {
                Ok(table) => {
                    let r = Arc::new(resolve::resolve(catalog, &table));
                    self.runtime_symbols.insert(id, r.clone());
                    r
                }
                Err(e) => {
                    log::warn!("runtime {instance} (PID {pid}): {e:#}; its probes are not attached (procfs and socket figures still are)");
                    return;
                }
            },
        };
        let mut k = self.kernel.lock().unwrap();
        let Some(k) = k.as_mut() else { return };
        if let Err(e) = k.attach(&resolutions, &exe, pid, false) {
            log::warn!("attaching to runtime {instance} (PID {pid}): {e:#}");
        }
        if !self.runtime_failures_logged {
            for p in k.probe_statuses() {
                if p.attached == 0 && !p.reason.is_empty() && p.name.starts_with("server_") {
                    log::warn!("probe {} not attached ({}): {}", p.name, p.reason, p.detail);
                    self.runtime_failures_logged = true;
                }
            }
        }
        log::info!(
            "[{:.3}s] runtime {instance} (PID {pid}): {} uprobe sites attached",
            self.since_start(),
            k.uprobes_attached(pid)
        );
    }

    pub(crate) fn attach_proxy(&mut self, pid: u32, again: bool, shared: &Mutex<Model>) {
        let t0 = std::time::Instant::now();
        let found = (|| -> anyhow::Result<_> {
            let target = Target::open(pid)?;
            let table = SymbolTable::from_elf_file(&target.exe_link)?;
            Ok((target, table))
        })();
        let (target, table) = match found {
            Ok(x) => x,
            Err(e) => {
                log::error!("proxy PID {pid}: {e:#}; its uprobes are not attached");
                return;
            }
        };
        let resolutions = resolve::resolve(&self.catalog, &table);
        if resolutions.iter().all(|r| r.sites().is_empty()) {
            log::error!(
                "PID {pid} ({}) was taken for the proxy but is not a rusty-workers proxy: none of the catalog's probes resolved (a narrower --exe NAME picks the right process)",
                target.exe_path.display()
            );
        }
        let (attached, old) = {
            let mut k = self.kernel.lock().unwrap();
            let Some(k) = k.as_mut() else { return };
            let old = k.detach(pid);
            if let Err(e) = k.attach(&resolutions, &target.exe_link, pid, true) {
                log::error!("attaching to proxy PID {pid}: {e:#}");
            }
            let statuses = k.probe_statuses();
            for p in &statuses {
                if p.attached == 0 && !p.reason.is_empty() && p.reason != "unresolved" {
                    log::warn!("probe {} not attached ({}): {}", p.name, p.reason, p.detail);
                }
            }
            let lost = coverage::unavailable(statuses.iter().map(|p| (p.name.as_str(), p.reason)));
            for u in &lost {
                log::warn!(
                    "metric rusty_workers_{} not exported: probe {} {}",
                    u.family,
                    u.needs,
                    u.reason
                );
            }
            (k.uprobes_attached(pid), old)
        };
        self.drop_links(old);
        // The proxy's state, read from its memory: a first snapshot now, merged after the
        // next drain of the events.
        let (reader, unavailable) = match &self.catalog.state {
            None => (
                None,
                Some("not read: the catalog's [state] has enabled = false".to_string()),
            ),
            Some(spec) => match snapshots::Reader::new(&target, &table, spec) {
                Ok(r) => (Some(r), None),
                Err(why) => {
                    log::warn!("proxy PID {pid}: its state cannot be read from memory: {why}; apps_loaded and instances come from events (exact only for what happens after the attach)");
                    (None, Some(why))
                }
            },
        };
        let reading = reader.is_some();
        self.snapshots.set_reader(reader);
        self.snapshots.take_now();
        let mut s = shared.lock().unwrap();
        s.state.reading = reading;
        s.state.unavailable = unavailable;
        s.attach_seconds.insert("proxy", t0.elapsed().as_secs_f64());
        if again {
            s.tracker.target_restarted();
            if let Some(q) = s.requests.as_mut() {
                q.target_restarted();
            }
        }
        log::info!(
            "[{:.3}s] proxy PID {pid} ({}): {attached} uprobe sites attached",
            self.since_start(),
            target.exe_path.display()
        );
    }
}
