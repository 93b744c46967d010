//! The watched process, through procfs.

use procfs::process::Process;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("no process with PID {0}: pass the PID of a running rusty-workers proxy (pgrep -f rusty-workers-proxy)")]
    NoSuchProcess(i32),
    #[error("PID {pid}: cannot read /proc/{pid}/{what} ({source}); a kernel thread, or not permitted: run as root, with CAP_SYS_PTRACE to read processes of other users")]
    Unreadable {
        pid: i32,
        what: &'static str,
        source: procfs::ProcError,
    },
}

/// A process, identified by PID and start time so that a reused PID is not mistaken for it.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: u32,
    start_ticks: u64,
    /// `/proc/<pid>/exe`: the kernel resolves it in the process's own mount namespace, to the
    /// inode that is running (also when the file was replaced on disk since), so it reaches
    /// binaries in containers and after in-place upgrades.
    pub exe_link: PathBuf,
    /// Where the executable is, as the process sees it (for messages).
    pub exe_path: PathBuf,
}

impl Target {
    pub fn open(pid: u32) -> Result<Target, TargetError> {
        let id = i32::try_from(pid).map_err(|_| TargetError::NoSuchProcess(i32::MAX))?;
        let p = Process::new(id).map_err(|_| TargetError::NoSuchProcess(id))?;
        let stat = p.stat().map_err(|e| match e {
            procfs::ProcError::NotFound(_) => TargetError::NoSuchProcess(id),
            source => TargetError::Unreadable {
                pid: id,
                what: "stat",
                source,
            },
        })?;
        let exe_path = p.exe().map_err(|source| TargetError::Unreadable {
            pid: id,
            what: "exe",
            source,
        })?;
        Ok(Target {
            pid,
            start_ticks: stat.starttime,
            exe_link: PathBuf::from(format!("/proc/{pid}/exe")),
            exe_path,
        })
    }

    /// Where the executable's file offset 0 is mapped (`/proc/<pid>/maps`): the load base a
    /// PIE's symbol addresses are relative to (0 for a non-PIE executable mapped at its link
    /// address, whose symbols are absolute).
    pub fn load_base(&self) -> Result<u64, TargetError> {
        use std::os::unix::fs::MetadataExt;
        let id = self.pid as i32;
        let unreadable = |what, source| TargetError::Unreadable {
            pid: id,
            what,
            source,
        };
        let ino = std::fs::metadata(&self.exe_link)
            .map_err(|e| unreadable("exe", procfs::ProcError::Io(e, None)))?
            .ino();
        let maps = Process::new(id)
            .and_then(|p| p.maps())
            .map_err(|e| unreadable("maps", e))?;
        let first = maps
            .iter()
            .filter(|m| m.inode == ino && m.offset == 0)
            .map(|m| m.address.0)
            .min()
            .ok_or(TargetError::Unreadable {
                pid: id,
                what: "maps",
                source: procfs::ProcError::Other("the executable is not mapped".into()),
            })?;
        Ok(first)
    }

    /// Whether this very process still runs (not just some process with its PID).
    pub fn is_alive(&self) -> bool {
        Process::new(self.pid as i32)
            .and_then(|p| p.stat())
            .is_ok_and(|s| s.starttime == self.start_ticks)
    }
}

/// Capability numbers (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities the observer lacks, from its `/proc/self/status` (`CapEff`, a hex mask).
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as the kernel lets it
/// (kernel/bpf/syscall.c `bpf_capable`, include/linux/capability.h `perfmon_capable`).
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !admin && !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !admin && !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_itself_and_refuses_a_missing_pid() {
        let me = Target::open(std::process::id()).expect("our own process");
        assert!(me.is_alive());
        assert_eq!(me.exe_path, std::env::current_exe().unwrap());
        let err = Target::open(2_147_483_646).expect_err("no such PID");
        assert!(err.to_string().contains("no process with PID"), "{err}");
    }

    #[test]
    fn capabilities_missing_from_a_status() {
        let all = "Name:\tobserver\nCapEff:\t000001ffffffffff\n";
        let none = "CapEff:\t0000000000000000\n";
        let bpf_perfmon_ptrace =
            format!("CapEff:\t{:016x}\n", (1u64 << 39) | (1 << 38) | (1 << 19));
        let admin_ptrace = format!("CapEff:\t{:016x}\n", (1u64 << 21) | (1 << 19));
        let bpf_only = format!("CapEff:\t{:016x}\n", 1u64 << 39);
        let cases: [(&str, &str, &[&str]); 6] = [
            ("root", all, &[]),
            ("nothing", none, &["CAP_BPF", "CAP_PERFMON"]),
            ("the narrow set", &bpf_perfmon_ptrace, &[]),
            ("CAP_SYS_ADMIN covers BPF and perf", &admin_ptrace, &[]),
            ("CAP_BPF alone", &bpf_only, &["CAP_PERFMON"]),
            ("no CapEff line", "Name:\tx\n", &["CAP_BPF", "CAP_PERFMON"]),
        ];
        for (what, status, want) in cases {
            assert_eq!(missing_capabilities(status), want, "{what}");
        }
    }
}
