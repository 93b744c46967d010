//! The `server` collector.

use super::{Inputs, Reg};
use crate::expo::Writer;

/// The runtimes' served calls (their wire; polls with `--runtime-polls`).
pub(super) fn collect(r: &Reg, _: &mut Writer, i: &Inputs) -> anyhow::Result<()> {
    for c in i.model.server.collectors() {
        r.0.register(c)?;
    }
    r.total(
        "observer_unattributed_server_calls_total",
        "Calls served by a process that is no longer a watched runtime when its event arrived.",
        i.model.server.unattributed,
    );
    r.total(
        "observer_unmatched_server_responses_total",
        "Responses a runtime sent to a request not seen (received before the attach) or cancelled.",
        i.model.server.unmatched_responses,
    );
    Ok(())
}
