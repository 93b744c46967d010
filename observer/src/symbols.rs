//! Function and data symbols of a target executable, demangled the way the catalogs name them.
//!
//! Rust binaries carry two manglings side by side: legacy (`_ZN...17h<hash>E`) and v0 (`_R...`).
//! Legacy mangling erases generic arguments, so two instantiations of one generic function share
//! a demangled path and differ only in the hash; ThinLTO appends `.llvm.<n>` to some local
//! symbols. The same mangled name can also name two different functions (one per codegen unit).

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SymbolError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ELF executable this observer can read: {source}")]
    NotElf { path: String, source: object::Error },
    #[error(
        "{path} is stripped (no .symtab): the observer attaches only at function starts taken \
         from the symbol table, so none of its app, instance, request or RPC metrics can be had; \
         what needs no symbols (the process's CPU, memory, threads, file descriptors and socket \
         bytes) is not worth an observer on its own (node_exporter's process collector gives \
         most of it). Point it at an unstripped build (rusty-workers' release profile keeps the \
         symbol table unless `strip` is set)"
    )]
    Stripped { path: String },
    #[error("symbol table line {line}: {msg}")]
    Tsv { line: usize, msg: String },
}

/// One function symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub mangled: String,
    /// Demangled path without the legacy hash and without `.llvm.<n>`.
    pub path: String,
    /// The legacy mangling's 16 hex digit hash, which tells generic instantiations apart.
    pub hash: Option<String>,
    pub address: u64,
    pub size: u64,
    /// Offset in the file, which is what the kernel's uprobes attach at.
    pub file_offset: u64,
}

/// One data symbol (`.data`, `.bss`: a static the target's state hangs from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSymbol {
    pub mangled: String,
    /// Demangled path without the legacy hash and without `.llvm.<n>`.
    pub path: String,
    /// The link-time address: in a PIE, where the executable's file offset 0 is mapped plus
    /// this.
    pub address: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    /// Functions.
    pub symbols: Vec<Symbol>,
    /// Statics.
    pub data: Vec<DataSymbol>,
    /// The virtual address of file offset 0 (its first loadable segment): 0 for a PIE, the
    /// link address for a fixed executable. A static's address in the process is the load
    /// base (where offset 0 is mapped) plus its address less this.
    pub offset0_vaddr: u64,
}

/// Splits a mangled name into its demangled path (no hash, no `.llvm.` suffix) and hash.
pub fn demangle(mangled: &str) -> (String, Option<String>) {
    match rustc_demangle::try_demangle(mangled) {
        Ok(d) => {
            let path = format!("{d:#}");
            let full = format!("{d}");
            let hash = full
                .strip_prefix(&path)
                .and_then(|rest| rest.strip_prefix("::h"))
                .filter(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_string);
            (path, hash)
        }
        // Not Rust (C symbols from libc or C dependencies): the name is its own path.
        Err(_) => (mangled.to_string(), None),
    }
}

impl SymbolTable {
    /// Reads the function symbols of an ELF file.
    pub fn from_elf_file(path: &Path) -> Result<Self, SymbolError> {
        let display = path.display().to_string();
        let data = std::fs::read(path).map_err(|source| SymbolError::Read {
            path: display.clone(),
            source,
        })?;
        Self::from_elf_bytes(&data, &display)
    }

    pub fn from_elf_bytes(data: &[u8], display: &str) -> Result<Self, SymbolError> {
        let file = object::File::parse(data).map_err(|source| SymbolError::NotElf {
            path: display.to_string(),
            source,
        })?;
        if file.section_by_name(".symtab").is_none() {
            return Err(SymbolError::Stripped {
                path: display.to_string(),
            });
        }
        let sections: Vec<(u64, u64, u64)> = file
            .sections()
            .filter_map(|s| {
                let (off, _) = s.file_range()?;
                Some((s.address(), s.size(), off))
            })
            .filter(|(addr, size, _)| *addr != 0 && *size != 0)
            .collect();
        let offset0_vaddr = file
            .segments()
            .find(|s| s.file_range().0 == 0)
            .map(|s| s.address())
            .unwrap_or(0);
        let mut symbols = Vec::new();
        let mut data = Vec::new();
        for sym in file.symbols() {
            if sym.is_undefined() || sym.address() == 0 {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if sym.kind() == SymbolKind::Data {
                data.push(DataSymbol {
                    mangled: name.to_string(),
                    path: demangle(name).0,
                    address: sym.address(),
                    size: sym.size(),
                });
                continue;
            }
            if sym.kind() != SymbolKind::Text {
                continue;
            }
            let addr = sym.address();
            // The kernel wants a file offset: translate through the section holding the code.
            let Some(&(saddr, _, soff)) = sections
                .iter()
                .find(|(saddr, ssize, _)| addr >= *saddr && addr < saddr + ssize)
            else {
                continue;
            };
            let (path, hash) = demangle(name);
            symbols.push(Symbol {
                mangled: name.to_string(),
                path,
                hash,
                address: addr,
                size: sym.size(),
                file_offset: addr - saddr + soff,
            });
        }
        Ok(Self {
            symbols,
            data,
            offset0_vaddr,
        })
    }

    /// Reads a symbol table dump (`address size type mangled demangled`, tab-separated, hex
    /// numbers, `#` comments), as kept for the real rusty-workers proxy. Such a dump has no
    /// sections, so file offsets come from `file_offset = address - text_bias`. Functions are
    /// nm types `T t W w`, data `B b D d`.
    pub fn from_tsv(text: &str, text_bias: u64) -> Result<Self, SymbolError> {
        let mut symbols = Vec::new();
        let mut data = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() < 4 {
                return Err(SymbolError::Tsv {
                    line: i + 1,
                    msg: format!(
                        "expected at least 4 tab-separated columns, found {}",
                        cols.len()
                    ),
                });
            }
            let hex = |s: &str, what: &str| {
                u64::from_str_radix(s, 16).map_err(|e| SymbolError::Tsv {
                    line: i + 1,
                    msg: format!("{what} {s:?}: {e}"),
                })
            };
            let address = hex(cols[0], "address")?;
            let size = hex(cols[1], "size")?;
            if matches!(cols[2], "B" | "b" | "D" | "d") {
                data.push(DataSymbol {
                    mangled: cols[3].to_string(),
                    path: demangle(cols[3]).0,
                    address,
                    size,
                });
                continue;
            }
            if !matches!(cols[2], "T" | "t" | "W" | "w") {
                continue;
            }
            let (path, hash) = demangle(cols[3]);
            symbols.push(Symbol {
                mangled: cols[3].to_string(),
                path,
                hash,
                address,
                size,
                file_offset: address.checked_sub(text_bias).ok_or(SymbolError::Tsv {
                    line: i + 1,
                    msg: format!("address {address:#x} below the text bias {text_bias:#x}"),
                })?,
            });
        }
        Ok(Self {
            symbols,
            data,
            offset0_vaddr: 0,
        })
    }

    /// The static whose demangled path is `path`, if there is exactly one (a static has one
    /// address; two of one name would be two crates' and neither can be trusted).
    pub fn data_by_path(&self, path: &str) -> Option<&DataSymbol> {
        let mut it = self.data.iter().filter(|d| d.path == path);
        let first = it.next()?;
        it.all(|d| d.address == first.address).then_some(first)
    }

    /// Every function whose demangled path is `path`, one entry per distinct address.
    pub fn by_path<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a Symbol> + 'a {
        let mut seen = std::collections::HashSet::new();
        self.symbols
            .iter()
            .filter(move |s| s.path == path && seen.insert(s.address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_both_manglings() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "_ZN14lru_time_cache27LruCache$LT$Key$C$Value$GT$6insert17hef6656167c4bb471E",
                "lru_time_cache::LruCache<Key,Value>::insert",
                Some("ef6656167c4bb471"),
            ),
            (
                "_ZN14lru_time_cache27LruCache$LT$Key$C$Value$GT$10update_key17h0baa85126b9c630aE.llvm.2873803314898813307",
                "lru_time_cache::LruCache<Key,Value>::update_key",
                Some("0baa85126b9c630a"),
            ),
            (
                "_RINvMNtCsgEmfK2I1SDS_4core3stre18trim_start_matchesReECsgY6Mt91CT9J_14rustc_demangle",
                "<str>::trim_start_matches::<&str>",
                None,
            ),
            ("memcpy", "memcpy", None),
        ];
        for (mangled, path, hash) in cases {
            let (p, h) = demangle(mangled);
            assert_eq!(&p, path, "path of {mangled}");
            assert_eq!(h.as_deref(), *hash, "hash of {mangled}");
        }
    }

    #[test]
    fn tsv_rejects_bad_lines_with_their_number() {
        let err = SymbolTable::from_tsv("# header\nzz\t10\tt\t_ZN3fooE\tfoo\n", 0x1000)
            .expect_err("a non-hex address must be refused");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    /// The static the proxy's whole scheduler state hangs from, in the data symbols of a
    /// release build of upstream rusty-workers (../shared/rusty-workers/NOTES.md).
    #[test]
    fn the_real_proxys_scheduler_static_is_found() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/rusty-workers/proxy-release.data.tsv");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let t = SymbolTable::from_tsv(&text, 0x1000).expect("the real data dump parses");
        assert!(t.symbols.is_empty(), "a data dump holds no functions");
        let s = t
            .data_by_path("rusty_workers_proxy::SCHEDULER")
            .expect("rusty_workers_proxy::SCHEDULER among the data symbols");
        // once_cell::sync::OnceCell<Arc<Scheduler>>: a state word and the Arc's pointer.
        assert_eq!((s.address, s.size), (0x4aaa50, 16));
        assert!(t.data.len() > 100, "{} data symbols", t.data.len());
    }

    #[test]
    fn a_static_named_twice_at_two_addresses_is_not_trusted() {
        let tsv = "0000000000002000\t10\tb\t_ZN1a1S17h0000000000000001E\ta::S\n\
                   0000000000003000\t10\tb\t_ZN1a1S17h0000000000000002E\ta::S\n\
                   0000000000004000\t8\tB\t_ZN1b1T17h0000000000000003E\tb::T\n";
        let t = SymbolTable::from_tsv(tsv, 0x1000).expect("valid dump");
        assert_eq!(t.data_by_path("a::S"), None);
        assert_eq!(t.data_by_path("b::T").map(|d| d.address), Some(0x4000));
    }

    #[test]
    fn same_name_at_two_addresses_is_kept_twice() {
        let tsv = "0000000000002000\t10\tt\t_ZN1a1f17h0000000000000001E\ta::f\n\
                   0000000000003000\t10\tt\t_ZN1a1f17h0000000000000001E\ta::f\n";
        let t = SymbolTable::from_tsv(tsv, 0x1000).expect("valid dump");
        let offs: Vec<u64> = t.by_path("a::f").map(|s| s.file_offset).collect();
        assert_eq!(offs, vec![0x1000, 0x2000]);
    }
}
