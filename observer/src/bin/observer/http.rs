//! The Prometheus endpoint: `/metrics` rendered from the model at each scrape.

use anyhow::Context as _;
use observer::snapshots::Snapshots;
use observer::{kernel, metrics, monotonic_ns};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub(crate) async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {listen}: port {} is already in use (another observer, or the 2021 in-proxy exporter, which used 9898 too; `ss -ltnp 'sport = :{}'` shows who). Pass --listen ADDR:PORT to use another port",
                listen.port(),
                listen.port()
            )
        } else {
            anyhow::anyhow!("cannot listen on {listen}: {e}")
        }
    })
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: detaching"),
        _ = int.recv() => log::info!("SIGINT: detaching"),
    }
}

/// What a scrape reads.
pub(crate) struct Sources {
    pub(crate) model: Arc<Mutex<observer::model::Model>>,
    pub(crate) kernel: Arc<Mutex<Option<kernel::Kernel>>>,
    pub(crate) counters: Arc<kernel::Counters>,
    pub(crate) snapshots: Snapshots,
    /// The state's gauges are withheld past this age of the latest snapshot.
    pub(crate) state_max_age_ns: u64,
}

/// Serves `/metrics` on `listener` until SIGTERM or SIGINT.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    listen: SocketAddr,
    sources: Sources,
) -> anyhow::Result<()> {
    let Sources {
        model: scrape_model,
        kernel: scrape_kernel,
        counters,
        snapshots: scrape_snaps,
        state_max_age_ns,
    } = sources;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let shared = scrape_model.clone();
                let kernel = scrape_kernel.clone();
                let counters = counters.clone();
                let snaps = scrape_snaps.clone();
                async move {
                    let (programs, probes) = kernel
                        .lock()
                        .unwrap()
                        .as_ref()
                        .map(|k| (k.program_stats(), k.probe_statuses()))
                        .unwrap_or_default();
                    let latest = snaps.latest();
                    let model = shared.lock().unwrap();
                    let body = metrics::render(&metrics::Inputs {
                        model: &model,
                        counters: &counters,
                        probes: &probes,
                        programs: programs.as_deref(),
                        latest: latest.as_ref(),
                        state_max_age_ns,
                        now_ns: monotonic_ns(),
                    });
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        body,
                    )
                }
            }),
        )
        .route(
            "/",
            axum::routing::get(|| async { "rusty-workers observer: metrics at /metrics\n" }),
        );
    log::info!("metrics on http://{listen}/metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving /metrics")?;
    Ok(())
}
