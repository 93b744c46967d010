//! The probe catalog: which functions of the target to probe, with which eBPF program.

use crate::snapshots::StateSpec;
use observer_common::Layout;
use serde::Deserialize;
use std::collections::HashSet;
use thiserror::Error;
use toml::Spanned;

/// The catalog for rusty-workers' proxy, built into the observer.
pub const PROXY_CATALOG: &str = include_str!("../../catalog/rusty-workers-proxy.toml");
/// The catalog for rusty-workers' runtime, built into the observer.
pub const RUNTIME_CATALOG: &str = include_str!("../../catalog/rusty-workers-runtime.toml");

/// The eBPF programs of observer-ebpf a catalog may name.
pub const PROGRAMS: &[&str] = &[
    "lru_insert",
    "lru_remove",
    "rpc_call",
    "http_request",
    "sched_error",
    "server_poll",
    "server_poll_sret",
    "server_drop",
];

#[derive(Debug, Error, PartialEq)]
pub enum CatalogError {
    #[error("{source_name}: {msg}")]
    Syntax { source_name: String, msg: String },
    #[error("{source_name}:{line}: field `{field}`: {msg}")]
    Field {
        source_name: String,
        line: usize,
        field: &'static str,
        msg: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    probe: Vec<RawProbe>,
    #[serde(default)]
    layout: RawLayout,
    #[serde(default)]
    state: RawState,
}

/// `[state]`: where the proxy's state is in its memory (`crate::snapshot`). Every field is
/// optional: the static's path, the read budget, the std and crate layouts (byte offsets,
/// fields of `StateLayout`) and the offsets of the proxy's own fields (fields of `Learnt`,
/// else found by the walk). `enabled = false` reads no state (its gauges come from events).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    enabled: Option<bool>,
    symbol: Option<String>,
    budget_bytes: Option<u64>,
    once_cell_value: Option<u64>,
    arc_data: Option<u64>,
    btree_root: Option<u64>,
    btree_height: Option<u64>,
    btree_len: Option<u64>,
    node_parent_idx: Option<u64>,
    node_len: Option<u64>,
    deque_cap: Option<u64>,
    deque_ptr: Option<u64>,
    deque_head: Option<u64>,
    deque_len: Option<u64>,
    lru_map: Option<u64>,
    lru_list: Option<u64>,
    lru_capacity: Option<u64>,
    app_value_arc: Option<u64>,
    app_value_size: Option<u64>,
    sched_apps: Option<u64>,
    sched_clients: Option<u64>,
    app_id: Option<u64>,
    app_ready: Option<u64>,
    instance_handle: Option<u64>,
    instance_rtid: Option<u64>,
    instance_size: Option<u64>,
}

impl RawState {
    fn apply(&self) -> Option<StateSpec> {
        if self.enabled == Some(false) {
            return None;
        }
        let mut spec = StateSpec::default();
        if let Some(s) = &self.symbol {
            spec.symbol = s.clone();
        }
        if let Some(b) = self.budget_bytes {
            spec.budget = b;
        }
        let l = &mut spec.layout;
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { l.$f = v; } )* };
        }
        take!(
            once_cell_value,
            arc_data,
            btree_root,
            btree_height,
            btree_len,
            node_parent_idx,
            node_len,
            deque_cap,
            deque_ptr,
            deque_head,
            deque_len,
            lru_map,
            lru_list,
            lru_capacity,
            app_value_arc,
            app_value_size
        );
        let g = &mut spec.given;
        g.sched_apps = self.sched_apps;
        g.sched_clients = self.sched_clients;
        g.app_id = self.app_id;
        g.app_ready = self.app_ready;
        g.instance_handle = self.instance_handle;
        g.instance_rtid = self.instance_rtid;
        g.instance_size = self.instance_size;
        Some(spec)
    }
}

/// Overrides of `observer_common::Layout::DEFAULT` by field name, for a target built by a
/// compiler that lays the types out differently (byte offsets).
type RawLayout = std::collections::BTreeMap<String, u64>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    name: Spanned<String>,
    program: Spanned<String>,
    symbol: Spanned<String>,
    #[serde(default)]
    hashes: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    per_request: bool,
    #[serde(default)]
    optional: bool,
    #[serde(default)]
    request_metrics: bool,
    #[serde(default)]
    method: Option<Spanned<String>>,
    #[serde(default)]
    why: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub name: String,
    pub program: String,
    pub symbol: String,
    pub hashes: Option<Vec<String>>,
    pub per_request: bool,
    pub optional: bool,
    /// Serves only the request metrics: not attached with `--no-request-metrics`.
    pub request_metrics: bool,
    /// The RPC method the function belongs to (`observer_common::method`), for the server
    /// probes: their attach cookie.
    pub method: Option<u32>,
    pub why: String,
}

impl Probe {
    /// The attach cookie the programs read (`bpf_get_attach_cookie`): the method.
    pub fn cookie(&self) -> u64 {
        self.method.unwrap_or(observer_common::method::UNKNOWN) as u64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pub probes: Vec<Probe>,
    /// How the probes read the target's types.
    pub layout: Layout,
    /// Where the proxy's state is read from (`None`: not read).
    pub state: Option<StateSpec>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Catalog {
    pub fn parse(text: &str, source_name: &str) -> Result<Self, CatalogError> {
        let raw: RawCatalog = toml::from_str(text).map_err(|e| CatalogError::Syntax {
            source_name: source_name.to_string(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        let field_err =
            |span: std::ops::Range<usize>, field: &'static str, msg: String| CatalogError::Field {
                source_name: source_name.to_string(),
                line: line_of(text, span.start),
                field,
                msg,
            };
        if raw.probe.is_empty() {
            return Err(CatalogError::Syntax {
                source_name: source_name.to_string(),
                msg: "no [[probe]] entries".to_string(),
            });
        }
        let mut names = HashSet::new();
        let mut probes = Vec::new();
        for p in raw.probe {
            let name = p.name.get_ref();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(field_err(
                    p.name.span(),
                    "name",
                    format!("{name:?} must be non-empty lowercase [a-z0-9_] (it becomes a label)"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(field_err(
                    p.name.span(),
                    "name",
                    format!("{name:?} appears twice"),
                ));
            }
            if !PROGRAMS.contains(&p.program.get_ref().as_str()) {
                return Err(field_err(
                    p.program.span(),
                    "program",
                    format!(
                        "unknown program {:?}; observer-ebpf has: {}",
                        p.program.get_ref(),
                        PROGRAMS.join(", ")
                    ),
                ));
            }
            if p.symbol.get_ref().trim().is_empty() {
                return Err(field_err(
                    p.symbol.span(),
                    "symbol",
                    "must not be empty".into(),
                ));
            }
            if let Some(h) = &p.hashes {
                if let Some(bad) = h
                    .get_ref()
                    .iter()
                    .find(|x| x.len() != 16 || !x.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    return Err(field_err(
                        h.span(),
                        "hashes",
                        format!("{bad:?} is not a 16 hex digit legacy symbol hash"),
                    ));
                }
            }
            let method = match &p.method {
                None => None,
                Some(m) => {
                    let names = &observer_common::method::NAMES
                        [..observer_common::method::UNKNOWN as usize];
                    match names.iter().position(|n| n == m.get_ref()) {
                        Some(i) => Some(i as u32),
                        None => {
                            return Err(field_err(
                                m.span(),
                                "method",
                                format!(
                                    "unknown method {:?}; RuntimeService has: {}",
                                    m.get_ref(),
                                    names.join(", ")
                                ),
                            ))
                        }
                    }
                }
            };
            probes.push(Probe {
                name: p.name.into_inner(),
                program: p.program.into_inner(),
                symbol: p.symbol.into_inner(),
                hashes: p.hashes.map(Spanned::into_inner),
                per_request: p.per_request,
                optional: p.optional,
                request_metrics: p.request_metrics,
                method,
                why: p.why,
            });
        }
        let mut layout = Layout::DEFAULT;
        for (name, value) in &raw.layout {
            let Some(field) = layout.field_mut(name) else {
                return Err(CatalogError::Syntax {
                    source_name: source_name.to_string(),
                    msg: format!(
                        "[layout]: unknown field `{name}`, expected one of {}",
                        Layout::FIELDS.join(", ")
                    ),
                });
            };
            *field = *value;
        }
        if layout.string_ptr == layout.string_len || layout.lru_key_size == 0 {
            return Err(CatalogError::Syntax {
                source_name: source_name.to_string(),
                msg: "[layout]: string_ptr and string_len must differ, lru_key_size must be > 0"
                    .to_string(),
            });
        }
        let state = raw.state.apply();
        if let Some(st) = &state {
            if st.symbol.trim().is_empty() || st.budget < 4096 {
                return Err(CatalogError::Syntax {
                    source_name: source_name.to_string(),
                    msg: "[state]: symbol must not be empty, budget_bytes must be at least 4096"
                        .to_string(),
                });
            }
        }
        Ok(Catalog {
            probes,
            layout,
            state,
        })
    }

    pub fn builtin_proxy() -> Self {
        Self::parse(PROXY_CATALOG, "builtin rusty-workers-proxy catalog")
            .expect("the built-in catalog is checked by the tests")
    }

    pub fn builtin_runtime() -> Self {
        Self::parse(RUNTIME_CATALOG, "builtin rusty-workers-runtime catalog")
            .expect("the built-in catalog is checked by the tests")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses() {
        let c = Catalog::builtin_proxy();
        assert_eq!(c.probes.len(), 5);
        // With them, two: the fetch's RPC and hyper's recv_msg (the response head is the
        // socket tracepoint's).
        let with = c.probes.iter().filter(|p| p.per_request).count();
        assert_eq!(
            with, 2,
            "with request metrics the request path is 2 uprobes"
        );
        // Without request metrics the request path keeps a budget of 2 uprobes.
        let without = c
            .probes
            .iter()
            .filter(|p| p.per_request && !p.request_metrics)
            .count();
        assert!(
            without <= 2,
            "without request metrics the request path is 2 BPF runs per request"
        );
        for p in &c.probes {
            assert!(!p.why.is_empty(), "probe {} says why", p.name);
        }
    }

    #[test]
    fn builtin_runtime_catalog_names_every_method_twice() {
        let c = Catalog::builtin_runtime();
        for m in 0..observer_common::method::UNKNOWN {
            for drop in [false, true] {
                assert_eq!(
                    c.probes
                        .iter()
                        .filter(|p| p.program.starts_with("server_")
                            && (p.program == "server_drop") == drop
                            && p.method == Some(m))
                        .count(),
                    1,
                    "method {m}, drop {drop}"
                );
            }
        }
        let fetch = c.probes.iter().find(|p| p.name == "server_fetch").unwrap();
        assert_eq!(fetch.cookie(), observer_common::method::FETCH as u64);
        assert_eq!(fetch.program, "server_poll_sret");
    }

    #[test]
    fn the_state_section_names_the_static_and_overrides_offsets() {
        let base = "[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\n";
        let spec = |extra: &str| Catalog::parse(&format!("{base}{extra}"), "t").map(|c| c.state);
        assert_eq!(spec(""), Ok(Some(StateSpec::default())), "read by default");
        assert_eq!(spec("[state]\nenabled = false\n"), Ok(None), "disabled");
        let s = spec("[state]\nsymbol = \"p::STATE\"\nlru_map = 8\napp_ready = 208\n")
            .expect("parses")
            .expect("enabled");
        assert_eq!(s.symbol, "p::STATE");
        assert_eq!(s.layout.lru_map, 8);
        assert_eq!(s.given.app_ready, Some(208));
        assert!(
            spec("[state]\nbudget_bytes = 10\n").is_err(),
            "a budget too small"
        );
        assert!(
            spec("[state]\nsched_app = 1\n").is_err(),
            "an unknown field"
        );
        assert_eq!(
            Catalog::builtin_proxy().state.map(|s| s.symbol),
            Some("rusty_workers_proxy::SCHEDULER".to_string())
        );
    }

    #[test]
    fn layout_overrides_apply_over_the_default() {
        let c = Catalog::parse(
            "[layout]\nstring_ptr = 0\nstring_len = 16\n[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\n",
            "t.toml",
        )
        .expect("valid catalog");
        assert_eq!(
            c.layout,
            Layout {
                string_ptr: 0,
                ..Layout::DEFAULT
            }
        );
        assert_eq!(Catalog::builtin_proxy().layout, Layout::DEFAULT);
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases: &[(&str, &str)] = &[
            ("[[probe]]\nname = \"a\"\nprogram = \"nope\"\nsymbol = \"x\"\n", ":3: field `program`"),
            ("[[probe]]\nname = \"A b\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\n", ":2: field `name`"),
            ("[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"\"\n", ":4: field `symbol`"),
            (
                "[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\nhashes = [\"12\"]\n",
                ":5: field `hashes`",
            ),
            (
                "[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\n[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"y\"\n",
                ":6: field `name`",
            ),
            ("[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\ncolour = 1\n", "unknown field `colour`"),
            ("[[probe]]\nname = \"a\"\n", "missing field"),
            (
                "[[probe]]\nname = \"a\"\nprogram = \"server_poll\"\nsymbol = \"x\"\nmethod = \"fetsh\"\n",
                ":5: field `method`",
            ),
            ("probe = 3", "invalid type"),
            ("", "no [[probe]] entries"),
            (
                "[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\n[layout]\nstring_pointer = 8\n",
                "unknown field `string_pointer`",
            ),
            (
                "[[probe]]\nname = \"a\"\nprogram = \"rpc_call\"\nsymbol = \"x\"\n[layout]\nstring_ptr = 16\n",
                "must differ",
            ),
        ];
        for (text, want) in cases {
            let err = Catalog::parse(text, "t.toml").expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
        }
    }
}
