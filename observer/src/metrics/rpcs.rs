//! The `rpcs` collector.

use super::{Inputs, Reg};
use crate::expo::Writer;
use observer_common::method;

/// Runtime RPCs the proxy sent, by method (counted in the kernel).
pub(super) fn collect(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    let c = r.counter(
        "runtime_rpcs_total",
        "RPCs the proxy sent to runtimes, by RuntimeService method.",
        &["method"],
    );
    for (m, n) in i.counters.rpc_calls()?.into_iter().enumerate() {
        c.with_label_values(&[method::NAMES[m]]).inc_by(n);
    }
    Ok(())
}
