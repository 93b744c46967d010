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
use rusty_workers::types::*;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

async fn serve_request(
    scheduler: Arc<sched::Scheduler>,
    req: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    Ok(match scheduler.handle_request(req).await {
        Ok(res) => res,
        Err(e) => {
            let status = e
                .downcast_ref::<sched::SchedError>()
                .map(|s| s.status())
                .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
            let mut res = Response::new(Body::from(format!("{e}\n")));
            *res.status_mut() = status;
            res
        }
    })
}

async fn serve_admin(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/truth" => Response::new(Body::from(
            serde_json::to_string_pretty(&truth::snapshot()).unwrap(),
        )),
        _ => {
            let mut r = Response::new(Body::from("not found\n"));
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
    })
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
    scheduler.discover_runtimes(&config.runtimes).await;

    if config.load_interval_ms > 0 {
        let s2 = scheduler.clone();
        let every = Duration::from_millis(config.load_interval_ms);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                s2.query_runtimes().await;
            }
        });
    }

    let admin = Server::try_bind(&config.admin_listen)
        .with_context(|| format!("binding admin {}", config.admin_listen))?
        .serve(make_service_fn(|_| async {
            Ok::<_, Infallible>(service_fn(serve_admin))
        }));
    tokio::spawn(admin);

    let server = Server::try_bind(&config.http_listen)
        .with_context(|| format!("binding {}", config.http_listen))?
        .serve(make_service_fn(move |_| {
            let scheduler = scheduler.clone();
            async move {
                Ok::<_, Infallible>(service_fn(move |req| serve_request(scheduler.clone(), req)))
            }
        }));
    eprintln!("proxy listening on {}", config.http_listen);
    server.await?;
    Ok(())
}
