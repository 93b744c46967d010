//! Which probes each metric family is made from.
//!
//! A build of the proxy may lack a probed function: inlined away (fat LTO keeps `Channel::call`
//! but loses `LruCache::insert`), or a probe may fail to load or
//! attach. A family made from a missing probe would not be merely incomplete but wrong (every
//! fetch without its answer looks failed: a success reported as an error), so it is not
//! exported at all: absent beats wrong. `rusty_workers_observer_metric_unavailable{metric,needs}`
//! and `observer probes` say which families are lost and for want of which probe.
//!
//! A family that needs nothing here is made from sources that are either there or give no
//! series at all (the runtimes' served calls: a runtime whose wire is not followed has no
//! series; with `--runtime-polls`, a method whose poll probe is missing has no polls series).

/// Probe names (`catalog/rusty-workers-proxy.toml`, and the socket tracepoints).
const INSERT: &str = "app_cache_insert";
const REMOVE: &str = "app_cache_remove";
const RPC: &str = "runtime_rpc";
const REQUEST: &str = "http_request";
const SCHED_ERROR: &str = "sched_error";
const SEND: &str = "net_send";
const RECV: &str = "net_recv";
/// A TCP socket's end (`tcp_destroy_sock`): without it a connection the proxy closed first
/// leaves its mark to the next socket the kernel puts at its address, a client's taken for
/// tarpc's or the other way round.
const CLOSE: &str = "net_close";
/// Relations of the target's memory the request joins learn (`requests::Requests::learnt`):
/// a build where they cannot be learnt (under `opt-level = "s"` the request's clients are not
/// inside the future its key names) would put every request under `app=""`.
const FETCH_CALL: &str = "fetch_call";

/// Each family (without the `rusty_workers_` prefix) and every probe it needs.
///
/// - The app cache's families need both its probes: a remove is known to be the app cache's
///   only by the loads that went into it.
/// - Instances leave their app by termination, eviction (the app cache's probes) and, with
///   request metrics, by being discarded after a failed fetch, which only the fetch's answer
///   tells: its frame on the wire, which the socket tracepoints follow (`net_send` for the
///   call's request, `net_recv` for its answer).
/// - A request's outcome needs the proxy's own error and the last fetch's answer; its
///   duration and start only its two ends and its calls, tied to it through a learnt
///   relation (listed with the probes, missing as `not_learnt` until learnt). Its ends are
///   hyper's `recv_msg` and the response head the proxy sends on the client's connection,
///   which the socket tracepoints see (`net_recv` names the connection, `net_send` the head).
/// - A runtime's name on an RPC is the peer of the connection its request went out on.
/// - What the socket tracepoints know of a connection (tarpc's, a client's) goes at the
///   socket's end (`net_close`), or the next socket at the same address inherits it.
pub const NEEDS: &[(&str, &[&str])] = &[
    ("apps_loaded", &[INSERT, REMOVE]),
    ("app_loaded_seconds", &[INSERT, REMOVE]),
    ("app_loads_total", &[INSERT]),
    ("app_evictions_total", &[INSERT, REMOVE]),
    ("app_instances", &[RPC, INSERT, REMOVE, SEND, RECV, CLOSE]),
    ("app_instance_spawns_total", &[RPC]),
    ("app_instance_terminations_total", &[RPC]),
    ("app_instances_dropped_total", &[RPC, INSERT, REMOVE]),
    (
        "app_instances_dropped_ended_total",
        &[RPC, INSERT, REMOVE, SEND, RECV, CLOSE],
    ),
    ("app_instances_discarded_total", &[RPC, SEND, RECV, CLOSE]),
    ("app_requests_total", &[RPC]),
    ("runtime_rpcs_total", &[RPC]),
    (
        "app_request_duration_seconds",
        &[REQUEST, RPC, SEND, RECV, CLOSE, FETCH_CALL],
    ),
    (
        "app_responses_total",
        &[REQUEST, RPC, SCHED_ERROR, SEND, RECV, CLOSE, FETCH_CALL],
    ),
    (
        "app_request_starts_total",
        &[REQUEST, RPC, SEND, RECV, CLOSE, FETCH_CALL],
    ),
    ("app_spawn_duration_seconds", &[RPC, SEND, RECV, CLOSE]),
    ("runtime_rpc_duration_seconds", &[RPC, SEND, RECV, CLOSE]),
    ("runtime_rpc_failures_total", &[RPC, SEND, RECV, CLOSE]),
    (
        "runtime_instances",
        &[RPC, INSERT, REMOVE, SEND, RECV, CLOSE],
    ),
    ("runtime_info", &[RPC, SEND, RECV, CLOSE]),
    ("process_network_bytes_total", &[SEND, RECV]),
    ("process_network_messages_total", &[SEND, RECV]),
];

/// A learnt relation not learnt (yet): the families that need it wait for it.
pub const NOT_LEARNT: &str = "not_learnt";

/// Whether a probe's failure reason means it cannot be had on this build or kernel (or a
/// relation is not learnt). A probe that is `target_down` (no proxy process now) is not
/// missing: nothing happens meanwhile, and its counters stand.
pub fn is_missing(reason: &str) -> bool {
    matches!(
        reason,
        "unresolved" | "load_failed" | "attach_failed" | NOT_LEARNT
    )
}

/// A family that is not exported, for want of `needs` (a probe, or a learnt relation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub family: &'static str,
    pub needs: String,
    pub reason: String,
}

/// Families a snapshot of the proxy's memory makes (`crate::snapshot`), whatever probes are
/// missing: exported while the state is read, withheld when its snapshot is stale. The first,
/// `apps_loaded`, comes from the events when the state cannot be read at all.
pub const FROM_SNAPSHOT: &[&str] = &[
    "apps_loaded",
    "app_ready_instances",
    "runtime_ready_instances",
];

/// The families lost to the missing probes, given every probe's (and learnt relation's)
/// (name, failure reason); the first missing one a family needs names it. Probes not listed at all (left out on purpose:
/// `--no-request-metrics`) lose nothing here: their families are not made.
pub fn unavailable<'a>(probes: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Unavailable> {
    let missing: Vec<(&str, &str)> = probes
        .into_iter()
        .filter(|(_, reason)| is_missing(reason))
        .collect();
    NEEDS
        .iter()
        .filter_map(|(family, needs)| {
            let (what, reason) = needs
                .iter()
                .find_map(|n| missing.iter().find(|(p, _)| p == n))?;
            Some(Unavailable {
                family,
                needs: what.to_string(),
                reason: reason.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families(probes: &[(&str, &str)]) -> Vec<&'static str> {
        unavailable(probes.iter().copied())
            .into_iter()
            .map(|u| u.family)
            .collect()
    }

    #[test]
    fn every_probe_there_loses_nothing() {
        let all: Vec<(&str, &str)> = NEEDS
            .iter()
            .flat_map(|(_, n)| n.iter().map(|p| (*p, "")))
            .collect();
        assert_eq!(families(&all), Vec::<&str>::new());
        assert_eq!(
            families(&[("runtime_rpc", "target_down")]),
            Vec::<&str>::new()
        );
    }

    /// The probes the real proxy loses under fat LTO (issue: "another build of the same proxy
    /// gives false numbers"), and what survives of them: answers come from the wire, which
    /// no build can inline away.
    #[test]
    fn fat_lto_losses_take_exactly_their_families() {
        let lost = families(&[
            ("app_cache_insert", "unresolved"),
            ("sched_error", "unresolved"),
            ("runtime_rpc", ""),
        ]);
        for gone in [
            "apps_loaded",
            "app_loads_total",
            "app_instances",
            "app_responses_total",
        ] {
            assert!(lost.contains(&gone), "{gone} must be withheld: {lost:?}");
        }
        for kept in [
            "app_requests_total",
            "app_instance_spawns_total",
            "app_instance_terminations_total",
            "runtime_rpcs_total",
            "app_request_duration_seconds",
            "app_request_starts_total",
            "app_instances_discarded_total",
            "runtime_rpc_duration_seconds",
            "runtime_rpc_failures_total",
            "runtime_info",
            "process_network_bytes_total",
        ] {
            assert!(!lost.contains(&kept), "{kept} is still exact: {lost:?}");
        }
    }

    #[test]
    fn the_first_missing_probe_names_the_loss() {
        let u = unavailable([
            ("net_recv", "load_failed"),
            ("runtime_rpc", "attach_failed"),
        ]);
        let rpc = u
            .iter()
            .find(|u| u.family == "runtime_rpc_duration_seconds")
            .expect("lost");
        assert_eq!(
            (rpc.needs.as_str(), rpc.reason.as_str()),
            ("runtime_rpc", "attach_failed")
        );
        let net = u
            .iter()
            .find(|u| u.family == "process_network_bytes_total")
            .expect("lost");
        assert_eq!(net.needs, "net_recv");
    }

    #[test]
    fn request_families_wait_for_their_relations() {
        let lost = families(&[("fetch_call", NOT_LEARNT)]);
        assert_eq!(
            lost,
            [
                "app_request_duration_seconds",
                "app_responses_total",
                "app_request_starts_total"
            ]
        );
    }

    #[test]
    fn every_need_is_a_catalog_probe_a_tracepoint_or_a_relation() {
        let catalog = crate::catalog::Catalog::builtin_proxy();
        for (family, needs) in NEEDS {
            for p in *needs {
                assert!(
                    [SEND, RECV, CLOSE, FETCH_CALL].contains(p)
                        || catalog.probes.iter().any(|c| c.name == *p),
                    "{family} needs {p}, which is neither a catalog probe, a tracepoint nor a relation"
                );
            }
        }
    }

    #[test]
    fn families_are_listed_once() {
        let mut names: Vec<&str> = NEEDS.iter().map(|(f, _)| *f).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a family is listed twice in NEEDS");
    }
}
