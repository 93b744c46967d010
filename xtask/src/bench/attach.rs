//! Attach time: how long the observer takes from start to probes attached, on the test target
//! and on a synthetic executable as large as the real proxy.
//!
//! The synthetic executable carries every function symbol of the real release proxy (the table
//! in ../shared/rusty-workers/proxy-release.functions.tsv: about 5,400 functions, some names
//! twice), each a function of its real size that returns at once, and a `main` that waits. The
//! catalog resolves in it as in the real proxy, so the observer attaches its real probe set.

use anyhow::{bail, Context as _};
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testbed_harness::http_get;

/// The real proxy's symbol table, beside the repository.
pub fn symbol_table() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/rusty-workers/proxy-release.functions.tsv")
}

/// The synthetic proxy's `main`: with no arguments it waits (attach time); with `THREADS
/// SECONDS` it waits for a line on its input, then calls hyper's `recv_msg` (where the
/// observer's `http_request` probe sends an event per call, always with the same key) from
/// THREADS threads for SECONDS, and prints the calls.
const MAIN_C: &str = r#"#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <stdatomic.h>
extern void rw_recv_msg(void *key);
static atomic_int stop;
static atomic_ulong calls;
static void *spin(void *unused) {
    static int key;
    unsigned long n = 0;
    (void)unused;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        rw_recv_msg(&key);
        n++;
    }
    atomic_fetch_add(&calls, n);
    return 0;
}
int main(int argc, char **argv) {
    if (argc < 3) {
        for (;;) pause();
    }
    int threads = atoi(argv[1]);
    pthread_t t[64];
    if (threads < 1 || threads > 64) return 2;
    getchar();
    for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, spin, 0);
    usleep((useconds_t)(atof(argv[2]) * 1e6));
    atomic_store(&stop, 1);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    printf("%lu\n", atomic_load(&calls));
    return 0;
}
"#;

/// Builds the synthetic executable in `dir` from the symbol table (with gcc); returns its path
/// and how many function symbols it has.
pub fn synthetic_proxy(dir: &Path) -> anyhow::Result<(PathBuf, usize)> {
    let tsv = symbol_table();
    let text = std::fs::read_to_string(&tsv)
        .with_context(|| format!("reading {} (the real proxy's symbol table)", tsv.display()))?;
    let mut funcs: Vec<(u64, u64, &str)> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 4 {
            continue;
        }
        let addr = u64::from_str_radix(f[0], 16).unwrap_or(0);
        let size = u64::from_str_radix(f[1], 16).unwrap_or(1).clamp(1, 1 << 16);
        funcs.push((addr, size, f[3]));
    }
    funcs.sort();
    // A name's k-th occurrence goes to file k: local symbols of one name cannot share a file.
    let mut files: Vec<String> = Vec::new();
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for (_, size, name) in &funcs {
        let k = seen.entry(name).or_insert(0);
        if files.len() <= *k {
            // No executable stack (ld warns about a file without the note).
            files.push(String::from(
                ".section .note.GNU-stack,\"\",@progbits\n.text\n",
            ));
        }
        let f = &mut files[*k];
        if name.contains("dispatch..Dispatch$GT$8recv_msg") {
            // A plain name at the same address, for main.c's event generator.
            let _ = writeln!(f, ".globl rw_recv_msg\nrw_recv_msg:");
        }
        let _ = writeln!(f, ".type \"{name}\", @function\n\"{name}\":\n  ret");
        if *size > 1 {
            let _ = writeln!(f, "  .skip {}, 0xcc", size - 1);
        }
        let _ = writeln!(f, ".size \"{name}\", {size}");
        *k += 1;
    }
    std::fs::create_dir_all(dir)?;
    let mut sources = vec![dir.join("main.c")];
    std::fs::write(&sources[0], MAIN_C)?;
    for (k, f) in files.iter().enumerate() {
        let p = dir.join(format!("funcs{k}.s"));
        std::fs::write(&p, f)?;
        sources.push(p);
    }
    let out = dir.join("synthetic-proxy");
    let status = Command::new("gcc")
        .arg("-o")
        .arg(&out)
        .args(&sources)
        .arg("-lpthread")
        .status()
        .context("running gcc")?;
    if !status.success() {
        bail!("gcc failed to build the synthetic proxy");
    }
    Ok((out, funcs.len()))
}

/// One observer start: wall time until `/metrics` answers with the probes attached, and the
/// observer's own attach durations by role.
pub struct Attach {
    pub ready_seconds: f64,
    pub proxy_seconds: f64,
    pub runtime_seconds: f64,
    pub sites: f64,
}

/// Starts the observer on `pid` with `args`, waits for its probes, and stops it.
pub fn measure(observer: &Path, pid: u32, args: &[&str]) -> anyhow::Result<Attach> {
    let listen = format!("127.0.0.1:{}", testbed_harness::free_port());
    let addr: std::net::SocketAddr = listen.parse()?;
    let t0 = Instant::now();
    let mut child = Command::new(observer)
        .process_group(0)
        .args(["--pid", &pid.to_string(), "--listen", &listen])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", observer.display()))?;
    let deadline = t0 + Duration::from_secs(30);
    let text = loop {
        if let Ok((200, text)) = http_get(addr, "localhost", "/metrics") {
            break text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the observer did not serve /metrics within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let ready = t0.elapsed().as_secs_f64();
    let get = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(f64::NAN)
    };
    let sites: f64 = text
        .lines()
        .filter(|l| l.starts_with("rusty_workers_observer_probe_sites{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    let a = Attach {
        ready_seconds: ready,
        proxy_seconds: get("rusty_workers_observer_attach_duration_seconds{role=\"proxy\"}"),
        runtime_seconds: get("rusty_workers_observer_attach_duration_seconds{role=\"runtime\"}"),
        sites,
    };
    // SAFETY: kill(2) on our own child: SIGINT detaches the observer cleanly.
    unsafe { crate::child::kill(child.id() as i32, 2) };
    child.wait()?;
    Ok(a)
}
