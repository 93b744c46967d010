use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The proxy's configuration file (JSON).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub http_listen: SocketAddr,
    /// Serves the ground truth at `GET /truth`.
    pub admin_listen: SocketAddr,
    pub runtimes: Vec<SocketAddr>,
    /// Apps and routes, re-read on every lookup (stands in for rusty-workers' MySQL tables).
    pub apps_file: String,
    /// How often the proxy asks every runtime its load (0: never).
    #[serde(default = "default_load_interval")]
    pub load_interval_ms: u64,
    pub local: LocalConfig,
}

/// Scheduler knobs, as rusty-workers' `LocalConfig`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LocalConfig {
    pub max_ready_instances_per_app: usize,
    pub ready_instance_expiration_ms: u64,
    pub request_timeout_ms: u64,
    pub max_request_body_size_bytes: u64,
    pub dropout_rate: f32,
    pub route_cache_size: usize,
    pub app_cache_size: usize,
}

fn default_load_interval() -> u64 {
    1000
}
