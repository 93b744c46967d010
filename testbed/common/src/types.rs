use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use thiserror::Error;

#[derive(Serialize, Deserialize, Clone, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct AppId(pub String);

#[derive(Serialize, Deserialize, Clone, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct RuntimeId(pub String);

#[derive(Serialize, Deserialize, Clone, Debug, Eq, PartialEq)]
pub struct WorkerConfiguration {
    pub executor: ExecutorConfiguration,
    pub fetch_service: SocketAddr,
    pub env: BTreeMap<String, String>,
    pub kv_namespaces: BTreeMap<String, String>,
}

impl WorkerConfiguration {
    /// The limits the test proxy gives every worker.
    pub fn for_tests() -> Self {
        WorkerConfiguration {
            executor: ExecutorConfiguration {
                max_ab_memory_mb: 16,
                max_time_ms: 100,
                max_io_concurrency: 10,
                max_io_per_request: 50,
            },
            fetch_service: "127.0.0.1:3000".parse().unwrap(),
            env: Default::default(),
            kv_namespaces: Default::default(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Eq, PartialEq)]
pub struct ExecutorConfiguration {
    pub max_ab_memory_mb: u32,
    pub max_time_ms: u32,
    pub max_io_concurrency: u32,
    pub max_io_per_request: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct WorkerHandle {
    pub id: String,
}

impl WorkerHandle {
    pub fn generate() -> Self {
        Self {
            id: crate::rand_hex(16),
        }
    }
}

impl RuntimeId {
    pub fn generate() -> Self {
        Self(crate::rand_hex(16))
    }
}

#[derive(Default, Serialize, Deserialize, Clone, Debug)]
pub struct RequestObject {
    pub headers: BTreeMap<String, Vec<String>>,
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub body: HttpBody,
}

#[derive(Default, Serialize, Deserialize, Clone, Debug)]
pub struct ResponseObject {
    pub headers: BTreeMap<String, Vec<String>>,
    pub status: u16,
    #[serde(default)]
    pub body: HttpBody,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub enum HttpBody {
    Binary(Vec<u8>),
}

impl Default for HttpBody {
    fn default() -> Self {
        Self::Binary(vec![])
    }
}

/// An error that happens while a worker executes a request.
#[derive(Serialize, Deserialize, Clone, Debug, Error)]
pub enum ExecutionError {
    #[error("no such worker")]
    NoSuchWorker,
    #[error("runtime throws exception")]
    RuntimeThrowsException,
    #[error("time limit exceeded")]
    TimeLimitExceeded,
    #[error("memory limit exceeded")]
    MemoryLimitExceeded,
    #[error("I/O timed out")]
    IoTimeout,
    #[error("script throws exception")]
    ScriptThrowsException(String),
}
pub type ExecutionResult<T> = Result<T, ExecutionError>;

impl ExecutionError {
    pub fn terminates_worker(&self) -> bool {
        !matches!(self, ExecutionError::ScriptThrowsException(_))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Error)]
pub enum GenericError {
    #[error("io: {0}")]
    Io(String),
    #[error("db: {0}")]
    Database(String),
    #[error("executor: {0}")]
    Executor(String),
    #[error("v8 unknown error")]
    V8Unknown,
    #[error("execution error: {0:?}")]
    Execution(ExecutionError),
    #[error("script initialization exception")]
    ScriptInitException(String),
    #[error("I/O limit exceeded")]
    IoLimitExceeded,
    #[error("try again")]
    TryAgain,
    #[error("type conversion failed")]
    Conversion,
    #[error("type checking failed - expected {expected}")]
    Typeck { expected: String },
    #[error("other: {0}")]
    Other(String),
}
pub type GenericResult<T> = Result<T, GenericError>;
