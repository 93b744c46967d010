//! The `processes` collector.

use super::{Inputs, Reg};
use crate::expo::Writer;
use observer_common::netstat;

/// procfs readings and kernel socket counters of the proxy and the runtimes.
pub(super) fn collect(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let l = &["role", "process"];
    let up = r.int_gauge("process_up", "1 while a process holds this instance name; 0 after it ended (kept 5 minutes, then retired).", l);
    let starts = r.counter(
        "process_starts_total",
        "Processes that held this instance name (1 + restarts seen).",
        l,
    );
    let cpu = r.seconds(
        "process_cpu_seconds_total",
        "CPU time by mode (/proc/<pid>/stat utime, stime), over every process of the instance.",
        &["role", "process", "mode"],
    );
    let switches = r.counter(
        "process_context_switches_total",
        "Context switches (/proc/<pid>/status), voluntary (waits) and involuntary (preempted).",
        &["role", "process", "kind"],
    );
    let rss = r.gauge("process_resident_memory_bytes", "Resident memory.", l);
    let vm = r.gauge("process_virtual_memory_bytes", "Virtual memory size.", l);
    let threads = r.gauge("process_threads", "Threads.", l);
    let fds = r.gauge("process_open_fds", "Open file descriptors.", l);
    let start = r.gauge(
        "process_start_time_seconds",
        "When the current process started (Unix time).",
        l,
    );
    let bytes = r.counter(
        "process_network_bytes_total",
        "TCP and UDP payload bytes the process sent and received on IPv4/IPv6 sockets, counted in the kernel (sock:sock_send_length, sock:sock_recv_length).",
        &["role", "process", "direction"],
    );
    let messages = r.counter(
        "process_network_messages_total",
        "Socket sends and receives that moved bytes (one read or write call each).",
        &["role", "process", "direction"],
    );
    for inst in i.model.watcher.instances() {
        let (role, name) = (inst.role.as_str(), inst.name.as_str());
        let lv = &[role, name];
        up.with_label_values(lv).set(inst.up() as i64);
        starts.with_label_values(lv).inc_by(inst.starts);
        let t = inst.totals();
        cpu.with_label_values(&[role, name, "user"])
            .inc_by(t.cpu_user_seconds);
        cpu.with_label_values(&[role, name, "system"])
            .inc_by(t.cpu_system_seconds);
        switches
            .with_label_values(&[role, name, "voluntary"])
            .inc_by(t.voluntary_switches);
        switches
            .with_label_values(&[role, name, "involuntary"])
            .inc_by(t.involuntary_switches);
        if let Some(s) = inst.current() {
            rss.with_label_values(lv).set(s.resident_bytes as f64);
            vm.with_label_values(lv).set(s.virtual_bytes as f64);
            threads.with_label_values(lv).set(s.threads as f64);
            fds.with_label_values(lv).set(s.open_fds as f64);
            start.with_label_values(lv).set(s.start_time_seconds);
        }
        let now = i.counters.proc_net(inst.slot)?;
        let base = i
            .model
            .net_base
            .get(&inst.slot)
            .copied()
            .unwrap_or_default();
        let v = |k: u32| now[k as usize].saturating_sub(base[k as usize]);
        bytes
            .with_label_values(&[role, name, "sent"])
            .inc_by(v(netstat::BYTES_SENT));
        bytes
            .with_label_values(&[role, name, "received"])
            .inc_by(v(netstat::BYTES_RECEIVED));
        messages
            .with_label_values(&[role, name, "sent"])
            .inc_by(v(netstat::MESSAGES_SENT));
        messages
            .with_label_values(&[role, name, "received"])
            .inc_by(v(netstat::MESSAGES_RECEIVED));
    }
    Ok(())
}
