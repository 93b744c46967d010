//! Catalog probes resolved against a target's symbol table.

use crate::catalog::{Catalog, Probe};
use crate::symbols::{Symbol, SymbolTable};

/// One place a probe attaches: a function start taken from the symbol table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub address: u64,
    pub file_offset: u64,
    pub hash: Option<String>,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Resolved(Vec<Site>),
    /// Nothing to attach to, with the reason an operator can act on.
    Unresolved(String),
}

#[derive(Debug, Clone)]
pub struct Resolution {
    pub probe: Probe,
    pub outcome: Outcome,
}

impl Resolution {
    pub fn sites(&self) -> &[Site] {
        match &self.outcome {
            Outcome::Resolved(s) => s,
            Outcome::Unresolved(_) => &[],
        }
    }
}

fn site(s: &Symbol) -> Site {
    Site {
        address: s.address,
        file_offset: s.file_offset,
        hash: s.hash.clone(),
        size: s.size,
    }
}

pub fn resolve_probe(probe: &Probe, table: &SymbolTable) -> Outcome {
    let all: Vec<&Symbol> = table.by_path(&probe.symbol).collect();
    if all.is_empty() {
        return Outcome::Unresolved(format!(
            "no function symbol `{}` (inlined, renamed, or not this program)",
            probe.symbol
        ));
    }
    let chosen: Vec<Site> = match &probe.hashes {
        None => all.iter().map(|s| site(s)).collect(),
        Some(hashes) => all
            .iter()
            .filter(|s| s.hash.as_ref().is_some_and(|h| hashes.contains(h)))
            .map(|s| site(s))
            .collect(),
    };
    if chosen.is_empty() {
        let have: Vec<String> = all
            .iter()
            .map(|s| s.hash.clone().unwrap_or_else(|| "-".into()))
            .collect();
        return Outcome::Unresolved(format!(
            "`{}` exists, but not with hash {}: this build has {}",
            probe.symbol,
            probe
                .hashes
                .as_ref()
                .map(|h| h.join("|"))
                .unwrap_or_default(),
            have.join(", ")
        ));
    }
    Outcome::Resolved(chosen)
}

pub fn resolve(catalog: &Catalog, table: &SymbolTable) -> Vec<Resolution> {
    catalog
        .probes
        .iter()
        .map(|p| Resolution {
            probe: p.clone(),
            outcome: resolve_probe(p, table),
        })
        .collect()
}

/// The `observer probes` report.
pub fn report(resolutions: &[Resolution]) -> String {
    let mut out = String::new();
    for r in resolutions {
        match &r.outcome {
            Outcome::Resolved(sites) => {
                out.push_str(&format!(
                    "{:<18} resolved  {} site{}  {}{}\n",
                    r.probe.name,
                    sites.len(),
                    if sites.len() == 1 { " " } else { "s" },
                    r.probe.symbol,
                    if r.probe.per_request {
                        "  [per request]"
                    } else {
                        ""
                    }
                ));
                for s in sites {
                    out.push_str(&format!(
                        "{:<18}   addr {:#010x}  file offset {:#010x}  size {:#6x}  hash {}\n",
                        "",
                        s.address,
                        s.file_offset,
                        s.size,
                        s.hash.as_deref().unwrap_or("-")
                    ));
                }
            }
            Outcome::Unresolved(why) => {
                out.push_str(&format!(
                    "{:<18} UNRESOLVED{}  {}\n",
                    r.probe.name,
                    if r.probe.optional { " (optional)" } else { "" },
                    why
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    const REAL_TSV: &str = "../../shared/rusty-workers/proxy-release.functions.tsv";

    fn real_table() -> SymbolTable {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(REAL_TSV);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        // NOTES.md: `.text` file offset = virtual address - 0x1000 in that build.
        SymbolTable::from_tsv(&text, 0x1000).expect("the real symbol table parses")
    }

    #[test]
    fn every_catalog_probe_resolves_on_the_real_proxy() {
        let table = real_table();
        assert!(
            table.symbols.len() > 5000,
            "{} symbols",
            table.symbols.len()
        );
        // (probe, addresses, hashes) from NOTES.md and the dump itself.
        let want: &[(&str, &[(u64, &str)])] = &[
            (
                "app_cache_insert",
                &[
                    (0x362a50, "586b6327ddf163fc"),
                    (0x3631c0, "ef6656167c4bb471"),
                ],
            ),
            (
                "app_cache_remove",
                &[
                    (0x3638e0, "529d41bc359ce46a"),
                    (0x363b70, "94c771f1a21e04a1"),
                ],
            ),
            ("runtime_rpc", &[(0x383500, "29b33445db1a1400")]),
            ("http_request", &[(0x3c8df0, "24735100003796a8")]),
            ("sched_error", &[(0x363f80, "d093c5a92c9d2b15")]),
        ];
        let res = resolve(&Catalog::builtin_proxy(), &table);
        assert_eq!(res.len(), want.len());
        for (r, (name, sites)) in res.iter().zip(want) {
            assert_eq!(&r.probe.name, name);
            let got: Vec<(u64, &str)> = r
                .sites()
                .iter()
                .map(|s| (s.address, s.hash.as_deref().unwrap_or("")))
                .collect();
            assert_eq!(&got, sites, "{name}: {:?}", r.outcome);
            for s in r.sites() {
                assert_eq!(s.file_offset, s.address - 0x1000, "{name}");
            }
        }
    }

    #[test]
    fn duplicated_names_resolve_to_every_address() {
        // NOTES.md: these names each exist twice (HTTP/1 and HTTP/2 copies); HTTP/1.1 traffic
        // runs the second one, so a first-match resolver sees nothing.
        let table = real_table();
        for (name, n) in [
            (
                "rusty_workers_proxy::sched::Scheduler::handle_request::{{closure}}",
                2,
            ),
            (
                "rusty_workers_proxy::sched::AppState::pool_instance::{{closure}}",
                2,
            ),
            (
                "rusty_workers_proxy::sched::AppState::gc_ready_instances::{{closure}}",
                2,
            ),
            ("rusty_workers_proxy::sched::ReadyInstance::is_usable", 1),
        ] {
            let probe = Probe {
                name: "t".into(),
                program: "rpc_call".into(),
                symbol: name.into(),
                hashes: None,
                per_request: false,
                optional: false,
                request_metrics: false,
                method: None,
                why: String::new(),
            };
            assert_eq!(resolve_probe(&probe, &table).clone(), {
                let sites: Vec<Site> = table.by_path(name).map(site).collect();
                assert_eq!(sites.len(), n, "{name}");
                Outcome::Resolved(sites)
            });
        }
    }

    #[test]
    fn hashes_pick_one_instantiation_and_explain_a_miss() {
        let table = real_table();
        let mut probe = Catalog::builtin_proxy().probes[0].clone();
        probe.hashes = Some(vec!["ef6656167c4bb471".into()]);
        let Outcome::Resolved(s) = resolve_probe(&probe, &table) else {
            panic!("app cache insert must resolve by hash")
        };
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].address, 0x3631c0);
        probe.hashes = Some(vec!["0000000000000000".into()]);
        let Outcome::Unresolved(why) = resolve_probe(&probe, &table) else {
            panic!("an unknown hash must not resolve")
        };
        assert!(
            why.contains("586b6327ddf163fc") && why.contains("ef6656167c4bb471"),
            "{why}"
        );
    }

    #[test]
    fn inlined_function_is_unresolved_with_a_reason() {
        let table = real_table();
        let mut probe = Catalog::builtin_proxy().probes[0].clone();
        probe.symbol = "rusty_workers_proxy::sched::AppState::get_instance".into();
        let Outcome::Unresolved(why) = resolve_probe(&probe, &table) else {
            panic!("get_instance is inlined in the release build")
        };
        assert!(why.contains("inlined"), "{why}");
    }
}
