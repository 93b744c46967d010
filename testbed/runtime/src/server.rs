//! The RuntimeService server, at the path upstream gives it (`rusty_workers_runtime::server::
//! RuntimeServer`), so that the runtime catalog's symbols are the real runtime's.

use rusty_workers::rpc::RuntimeService;
use rusty_workers::types::*;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tarpc::context;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Clone)]
pub struct RuntimeServer {
    pub id: RuntimeId,
    pub workers: Arc<Mutex<HashMap<WorkerHandle, (String, Script)>>>,
    pub stats: Arc<Stats>,
}

/// What the runtime counts itself.
#[derive(Default)]
pub struct Stats {
    fetches: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl Stats {
    pub fn json(&self) -> String {
        format!(
            "{{\"fetches\": {}, \"bytes_read\": {}, \"bytes_written\": {}}}",
            self.fetches.load(Ordering::Relaxed),
            self.bytes_read.load(Ordering::Relaxed),
            self.bytes_written.load(Ordering::Relaxed)
        )
    }
}

/// A connection that counts the bytes each read and write moved.
pub struct Counting {
    pub inner: tokio::net::TcpStream,
    pub stats: Arc<Stats>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.stats.bytes_read.fetch_add(n, Ordering::Relaxed);
        res
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.stats
                .bytes_written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What an app's "script" does on every fetch, read from its bundle: the test proxy's bundles
/// are `// bundle <bundle id>`, and a bundle id may carry `;delay_ms=N` and `;fail=KIND`
/// (KIND as the `x-fail` header), and `;spin_ms=N` (N ms of CPU per fetch). Per-request
/// headers override delay and failure.
#[derive(Clone, Default, Debug)]
pub struct Script {
    delay_ms: u64,
    spin_ms: u64,
    fail: Option<String>,
}

fn script(bundle: &[u8]) -> Script {
    let text = String::from_utf8_lossy(bundle);
    let mut s = Script::default();
    for part in text.trim().split(';').skip(1) {
        match part.split_once('=') {
            Some(("delay_ms", v)) => s.delay_ms = v.parse().unwrap_or(0),
            Some(("spin_ms", v)) => s.spin_ms = v.parse().unwrap_or(0),
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
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        let (app, script) = match self.workers.lock().unwrap().get(&handle) {
            Some(w) => w.clone(),
            None => return Err(ExecutionError::NoSuchWorker),
        };
        // CPU work, as a script's would be: the per-process CPU figures must follow it. Spun
        // on the thread's CPU clock, so that preemption does not shorten it.
        let spin_until = thread_cpu_ns() + script.spin_ms * 1_000_000;
        while thread_cpu_ns() < spin_until {
            std::hint::spin_loop();
        }
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

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
