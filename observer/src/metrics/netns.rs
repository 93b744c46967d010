//! The `netns` collector.

use super::{Inputs, Reg};
use crate::expo::Writer;
use std::collections::BTreeMap;

/// The network namespaces of the watched processes, whole (`/proc/<pid>/net/dev`): every
/// process in them counts here, not only the watched ones.
pub(super) fn collect(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let mut spaces: BTreeMap<u64, u32> = BTreeMap::new();
    for inst in i.model.watcher.instances() {
        if let (Some(s), Some(pid)) = (inst.current(), inst.pid()) {
            spaces.entry(s.netns).or_insert(pid);
        }
    }
    let l = &["netns", "device", "direction"];
    let bytes = r.counter(
        "netns_network_bytes_total",
        "Bytes through each device of a watched process's network namespace (/proc/<pid>/net/dev: the whole namespace, every process in it).",
        l,
    );
    let packets = r.counter(
        "netns_network_packets_total",
        "Packets through each device of a watched process's network namespace (/proc/<pid>/net/dev).",
        l,
    );
    for (ns, pid) in spaces {
        let Ok(devs) = procfs::process::Process::new(pid as i32).and_then(|p| p.dev_status())
        else {
            continue;
        };
        let ns = ns.to_string();
        for (name, d) in devs {
            for (dir, b, p) in [
                ("received", d.recv_bytes, d.recv_packets),
                ("sent", d.sent_bytes, d.sent_packets),
            ] {
                bytes.with_label_values(&[&ns, &name, dir]).inc_by(b);
                packets.with_label_values(&[&ns, &name, dir]).inc_by(p);
            }
        }
    }
    Ok(())
}
