//! The watched process, through procfs.

use procfs::process::Process;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("no process with PID {0}: pass the PID of a running rusty-workers proxy (pgrep -f rusty-workers-proxy)")]
    NoSuchProcess(i32),
    #[error("PID {pid}: cannot read /proc/{pid}/{what} ({source}); a kernel thread, or not permitted: run as root")]
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

    /// Whether this very process still runs (not just some process with its PID).
    pub fn is_alive(&self) -> bool {
        Process::new(self.pid as i32)
            .and_then(|p| p.stat())
            .is_ok_and(|s| s.starttime == self.start_ticks)
    }
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
}
