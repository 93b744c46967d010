//! The runtime RPC service, with the methods (and their order) rusty-workers declares.

use crate::types::*;

#[tarpc::service]
pub trait RuntimeService {
    /// Unique identifier of the runtime process.
    async fn id() -> RuntimeId;
    /// Spawn a worker for an app.
    async fn spawn_worker(
        appid: String,
        configuration: WorkerConfiguration,
        bundle: Vec<u8>,
    ) -> GenericResult<WorkerHandle>;
    /// Terminate a worker.
    async fn terminate_worker(handle: WorkerHandle) -> bool;
    /// List active workers.
    async fn list_workers() -> GenericResult<Vec<WorkerHandle>>;
    /// Issue a "fetch" event.
    async fn fetch(handle: WorkerHandle, req: RequestObject) -> ExecutionResult<ResponseObject>;
    /// Current load, 0-65535.
    async fn load() -> GenericResult<u16>;
}

impl RuntimeServiceClient {
    pub async fn connect_noretry<A: tokio::net::ToSocketAddrs>(addr: A) -> std::io::Result<Self> {
        let transport =
            tarpc::serde_transport::tcp::connect(addr, crate::SerdeFormat::default).await?;
        // Not in rusty-workers, whose connections keep Nagle's algorithm: with several calls in
        // flight on one connection it stalls some for the peer's delayed ACK (~40 ms), which
        // would blur the test target's injected latencies.
        transport.get_ref().set_nodelay(true)?;
        RuntimeServiceClient::new(tarpc::client::Config::default(), transport).spawn()
    }
}
