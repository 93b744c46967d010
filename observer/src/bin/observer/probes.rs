//! `observer probes`: where every catalog probe resolves in a target, and which metrics it
//! could not export.

use crate::cli::{load_catalog, ProbesArgs};
use anyhow::{bail, Context as _};
use observer::symbols::SymbolTable;
use observer::target::Target;
use observer::{coverage, resolve};

pub(crate) fn run(a: ProbesArgs) -> anyhow::Result<()> {
    let catalog = load_catalog(a.catalog.as_deref())?;
    let (path, table) = match (a.pid, a.binary, a.symbols) {
        (Some(pid), _, _) => {
            let target = Target::open(pid)?;
            let t = SymbolTable::from_elf_file(&target.exe_link)?;
            (target.exe_path, t)
        }
        (None, Some(b), _) => {
            let t = SymbolTable::from_elf_file(&b)?;
            (b, t)
        }
        (None, None, Some(s)) => {
            let text = std::fs::read_to_string(&s)
                .with_context(|| format!("reading symbol dump {}", s.display()))?;
            let t = SymbolTable::from_tsv(&text, a.text_bias)
                .with_context(|| format!("symbol dump {}", s.display()))?;
            (s, t)
        }
        _ => unreachable!("clap requires one of --pid, --binary, --symbols"),
    };
    let res = resolve::resolve(&catalog, &table);
    let real = std::fs::read_link(&path).unwrap_or(path.clone());
    println!(
        "target: {} ({} function symbols)",
        real.display(),
        table.symbols.len()
    );
    print!("{}", resolve::report(&res));
    let resolved = res.iter().filter(|r| !r.sites().is_empty()).count();
    println!("{resolved}/{} probes resolved", res.len());
    let lost = coverage::unavailable(res.iter().map(|r| {
        let reason = match r.outcome {
            resolve::Outcome::Unresolved(_) => "unresolved",
            _ => "",
        };
        (r.probe.name.as_str(), reason)
    }));
    if lost.is_empty() {
        println!("every metric can be exported");
    }
    for u in &lost {
        println!(
            "metric rusty_workers_{} not exported: probe {} {}",
            u.family, u.needs, u.reason
        );
    }
    if resolved == 0 {
        bail!("none of the catalog's probes resolved: {} is not a rusty-workers proxy (or the catalog is for another build)", path.display());
    }
    Ok(())
}
