//! Test target proxy. Usage: rusty-workers-proxy --config FILE
//!
//! Routes HTTP requests by Host and path prefix to apps, keeps apps in an LRU app cache,
//! runs them on instances spawned in runtime processes over tarpc, and serves its own ground
//! truth (what it did, counted where it did it) at `GET http://<admin_listen>/truth`.

mod config;
mod db;
mod sched;
mod truth;

use anyhow::Context as _;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Request, Response, Server};
use once_cell::sync::OnceCell;
use rusty_workers::types::*;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// The scheduler, in a static as rusty-workers keeps it (its `main.rs`): the observer finds the
/// proxy's whole state from this symbol.
static SCHEDULER: OnceCell<Arc<sched::Scheduler>> = OnceCell::new();

async fn serve_request(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let scheduler = SCHEDULER.get().expect("set before serving");
    let scope = std::cell::RefCell::new(sched::RequestTruth::default());
    sched::REQUEST
        .scope(scope, async move {
            let res = scheduler.handle_request(req).await;
            let t = sched::REQUEST.with(|r| r.borrow().clone());
            // Recorded before the response leaves, so a client that has its answer can read it.
            let start = if t.cold {
                Some("cold")
            } else {
                t.fetched.then_some("warm")
            };
            truth::answered(&t.app, sched::outcome(&res, &t), start);
            // As rusty-workers' main.rs.
            Ok(match res {
                Ok(res) => res,
                Err(e) => match e.downcast::<sched::SchedError>() {
                    Ok(e) => e.build_response(),
                    Err(_) => {
                        let mut res = Response::new(Body::from("internal server error"));
                        *res.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                        res
                    }
                },
            })
        })
        .await
}

/// The admin endpoint, by hand rather than a second hyper server: the real proxy runs one
/// HTTP server, and the observer's request probes see every request hyper serves.
async fn serve_admin(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf);
            let path = head.split(' ').nth(1).unwrap_or("");
            let (status, body) = match path {
                "/truth" => {
                    let mut t = truth::snapshot();
                    if let Some(s) = SCHEDULER.get() {
                        s.state_truth(&mut t).await;
                    }
                    ("200 OK", serde_json::to_string_pretty(&t).unwrap())
                }
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let out = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(out.as_bytes()).await;
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = match args.iter().position(|a| a == "--config") {
        Some(i) if i + 1 < args.len() => args[i + 1].clone(),
        _ => anyhow::bail!("usage: rusty-workers-proxy --config FILE"),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let config: config::Config =
        serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;

    let worker_config = WorkerConfiguration::for_tests();
    let scheduler = sched::Scheduler::new(
        worker_config,
        config.local.clone(),
        db::DataClient::new(&config.apps_file),
    );
    if SCHEDULER.set(scheduler.clone()).is_err() {
        anyhow::bail!("the scheduler is set once");
    }
    scheduler.discover_runtimes(&config.runtimes).await;

    if config.load_interval_ms > 0 {
        let s2 = scheduler.clone();
        let every = Duration::from_millis(config.load_interval_ms);
        let runtimes = config.runtimes.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                s2.query_runtimes().await;
                s2.discover_runtimes(&runtimes).await;
            }
        });
    }

    let admin = tokio::net::TcpListener::bind(&config.admin_listen)
        .await
        .with_context(|| format!("binding admin {}", config.admin_listen))?;
    tokio::spawn(serve_admin(admin));

    let server = Server::try_bind(&config.http_listen)
        .with_context(|| format!("binding {}", config.http_listen))?
        .serve(make_service_fn(|_| async {
            Ok::<_, Infallible>(service_fn(serve_request))
        }));
    eprintln!("proxy listening on {}", config.http_listen);
    server.await?;
    Ok(())
}
