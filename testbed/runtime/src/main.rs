//! Test target runtime: holds "workers" (one per spawned instance) and answers fetches.
//!
//! Usage: rusty-workers-runtime --listen 127.0.0.1:PORT [--stats FILE]
//!
//! With `--stats`, the runtime keeps FILE up to date (JSON, replaced atomically, every 50 ms when
//! something changed) with its own counts: fetches served and the bytes its RPC connections
//! read and wrote, the ground truth for the observer's per-process figures.

mod server;

use rusty_workers::rpc::RuntimeService;
use rusty_workers::types::*;
use server::{Counting, RuntimeServer, Stats};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tarpc::server::Channel;

fn arg(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(listen) = arg(&args, "--listen") else {
        anyhow::bail!("usage: rusty-workers-runtime --listen ADDR:PORT [--stats FILE]");
    };
    let server = RuntimeServer {
        id: RuntimeId::generate(),
        workers: Arc::new(Mutex::new(HashMap::new())),
        stats: Arc::new(Stats::default()),
    };
    if let Some(path) = arg(&args, "--stats") {
        let stats = server.stats.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                let now = stats.json();
                if now != last {
                    let tmp = format!("{path}.tmp");
                    if std::fs::write(&tmp, &now).is_ok() {
                        let _ = std::fs::rename(&tmp, &path);
                    }
                    last = now;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(listen.as_str()).await?;
    eprintln!(
        "runtime {} listening on {}",
        server.id.0,
        listener.local_addr()?
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        // As the proxy's side (testbed/common/src/rpc.rs): no Nagle stalls on injected latencies.
        let _ = stream.set_nodelay(true);
        let io = Counting {
            inner: stream,
            stats: server.stats.clone(),
        };
        let transport =
            tarpc::serde_transport::Transport::from((io, rusty_workers::SerdeFormat::default()));
        let channel = tarpc::server::BaseChannel::with_defaults(transport);
        tokio::spawn(channel.respond_with(server.clone().serve()).execute());
    }
}
