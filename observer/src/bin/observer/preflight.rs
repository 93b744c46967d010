//! Checks made before anything is loaded into the kernel: privileges, kernel features, and that
//! a proxy given by PID is one.

use anyhow::{bail, Context as _};
use observer::catalog::Catalog;
use observer::resolve;
use observer::symbols::SymbolTable;
use observer::target::Target;
use std::path::Path;

pub(crate) fn preflight() -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let missing = observer::target::missing_capabilities(&status);
    if !missing.is_empty() {
        // SAFETY: geteuid has no preconditions.
        let who = if unsafe { libc::geteuid() } == 0 {
            "root, but without"
        } else {
            "not root, and without"
        };
        bail!(
            "the observer is {who} {}: loading eBPF programs takes CAP_BPF, attaching uprobes and reading BPF statistics CAP_PERFMON (CAP_SYS_ADMIN stands in for both), and reading the /proc entries of a target run by another user CAP_SYS_PTRACE; run it as root (sudo), or in a container with --privileged or these capabilities added",
            missing.join(", ")
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): the observer needs a kernel built with CONFIG_DEBUG_INFO_BTF=y");
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        bail!("this kernel has no uprobe perf PMU (/sys/bus/event_source/devices/uprobe): it needs CONFIG_UPROBE_EVENTS=y");
    }
    Ok(())
}

/// Checks a proxy given by `--pid` before anything is loaded: it must exist and be one.
pub(crate) fn check_proxy(pid: u32, catalog: &Catalog) -> anyhow::Result<()> {
    let target = Target::open(pid)?;
    let table = SymbolTable::from_elf_file(&target.exe_link)?;
    let resolutions = resolve::resolve(catalog, &table);
    if resolutions.iter().all(|r| r.sites().is_empty()) {
        bail!(
            "PID {pid} ({}) is not a rusty-workers proxy: none of the catalog's {} probes resolved\n{}",
            target.exe_path.display(),
            resolutions.len(),
            resolve::report(&resolutions)
        );
    }
    for r in &resolutions {
        if let resolve::Outcome::Unresolved(why) = &r.outcome {
            log::warn!("probe {} not attached: {why}", r.probe.name);
        }
    }
    Ok(())
}
