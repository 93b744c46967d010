//! Test target runtime: holds "workers" (one per spawned instance) and answers fetches.
//!
//! Usage: rusty-workers-runtime --listen 127.0.0.1:PORT

use futures::StreamExt;
use rusty_workers::rpc::RuntimeService;
use rusty_workers::types::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tarpc::context;
use tarpc::server::Channel;

#[derive(Clone)]
struct RuntimeServer {
    id: RuntimeId,
    workers: Arc<Mutex<HashMap<WorkerHandle, (String, Script)>>>,
}

/// What an app's "script" does on every fetch, read from its bundle: the test proxy's bundles
/// are `// bundle <bundle id>`, and a bundle id may carry `;delay_ms=N` and `;fail=KIND`
/// (KIND as the `x-fail` header). Per-request headers override it.
#[derive(Clone, Default, Debug)]
struct Script {
    delay_ms: u64,
    fail: Option<String>,
}

fn script(bundle: &[u8]) -> Script {
    let text = String::from_utf8_lossy(bundle);
    let mut s = Script::default();
    for part in text.trim().split(';').skip(1) {
        match part.split_once('=') {
            Some(("delay_ms", v)) => s.delay_ms = v.parse().unwrap_or(0),
            Some(("fail", v)) => s.fail = Some(v.to_string()),
            _ => {}
        }
    }
    s
}

#[tarpc::server]
impl RuntimeService for RuntimeServer {
    async fn id(self, _: context::Context) -> RuntimeId {
        self.id.clone()
    }

    async fn spawn_worker(
        self,
        _: context::Context,
        appid: String,
        _configuration: WorkerConfiguration,
        bundle: Vec<u8>,
    ) -> GenericResult<WorkerHandle> {
        let handle = WorkerHandle::generate();
        self.workers
            .lock()
            .unwrap()
            .insert(handle.clone(), (appid, script(&bundle)));
        Ok(handle)
    }

    async fn terminate_worker(self, _: context::Context, handle: WorkerHandle) -> bool {
        self.workers.lock().unwrap().remove(&handle).is_some()
    }

    async fn list_workers(self, _: context::Context) -> GenericResult<Vec<WorkerHandle>> {
        Ok(self.workers.lock().unwrap().keys().cloned().collect())
    }

    async fn fetch(
        self,
        _: context::Context,
        handle: WorkerHandle,
        req: RequestObject,
    ) -> ExecutionResult<ResponseObject> {
        let (app, script) = match self.workers.lock().unwrap().get(&handle) {
            Some(w) => w.clone(),
            None => return Err(ExecutionError::NoSuchWorker),
        };
        // Injected latency, as a script would spend it: the app's, or the `x-delay-ms` header.
        let delay_ms: u64 = req
            .headers
            .get("x-delay-ms")
            .and_then(|v| v.first())
            .and_then(|v| v.parse().ok())
            .unwrap_or(script.delay_ms);
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        // Injected failure, as rusty-workers' runtime reports it: `x-fail` request header.
        // Errors that terminate the worker remove it, as the real runtime does.
        let fail = req
            .headers
            .get("x-fail")
            .and_then(|v| v.first())
            .cloned()
            .or(script.fail);
        if let Some(kind) = fail {
            let err = match kind.as_str() {
                "no_such_worker" => ExecutionError::NoSuchWorker,
                "runtime_throws" => ExecutionError::RuntimeThrowsException,
                "time_limit" => ExecutionError::TimeLimitExceeded,
                "memory_limit" => ExecutionError::MemoryLimitExceeded,
                "io_timeout" => ExecutionError::IoTimeout,
                other => ExecutionError::ScriptThrowsException(format!("injected: {other}")),
            };
            if err.terminates_worker() {
                self.workers.lock().unwrap().remove(&handle);
            }
            return Err(err);
        }
        let body = format!("app={} worker={} url={}\n", app, handle.id, req.url);
        Ok(ResponseObject {
            headers: Default::default(),
            status: 200,
            body: HttpBody::Binary(body.into_bytes()),
        })
    }

    async fn load(self, _: context::Context) -> GenericResult<u16> {
        Ok(0)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = match args.iter().position(|a| a == "--listen") {
        Some(i) if i + 1 < args.len() => args[i + 1].clone(),
        _ => anyhow::bail!("usage: rusty-workers-runtime --listen ADDR:PORT"),
    };
    let server = RuntimeServer {
        id: RuntimeId::generate(),
        workers: Arc::new(Mutex::new(HashMap::new())),
    };
    let listener =
        tarpc::serde_transport::tcp::listen(listen.as_str(), rusty_workers::SerdeFormat::default)
            .await?;
    eprintln!(
        "runtime {} listening on {}",
        server.id.0,
        listener.local_addr()
    );
    listener
        .filter_map(|r| futures::future::ready(r.ok()))
        // As the proxy's side (testbed/common/src/rpc.rs): no Nagle stalls on injected latencies.
        .inspect(|t| {
            let _ = t.get_ref().set_nodelay(true);
        })
        .map(tarpc::server::BaseChannel::with_defaults)
        .map(move |channel| channel.respond_with(server.clone().serve()).execute())
        .buffer_unordered(1024)
        .for_each(|_| async {})
        .await;
    Ok(())
}
