//! A request's outcome, by the proxy's own error kinds: from the error it built (if any) and
//! how its last fetch went.

/// Outcomes of a request, by the proxy's own error kinds (rusty-workers-proxy/src/sched.rs).
pub const OUTCOMES: &[&str] = &[
    "ok",
    "execution_error",
    "no_route",
    "no_instance",
    "retries_exhausted",
    "body_too_large",
    "internal_error",
];

/// `SchedError`'s discriminants, in declaration order.
const NO_AVAILABLE_INSTANCE: u64 = 0;
const NO_ROUTE_MAPPING: u64 = 1;
const REQUEST_BODY_TOO_LARGE: u64 = 2;
const REQUEST_FAILED_AFTER_RETRIES: u64 = 3;

/// How a request's last fetch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchEnd {
    Ok,
    /// NoSuchWorker: the proxy retries on another instance.
    NoSuchWorker,
    /// Any other execution error: the proxy gives up (RequestFailedAfterRetries).
    ExecutionError,
    /// No answer (network error, timeout): the proxy retries.
    Transport,
}

/// The outcome of a request from the proxy's error (if it built one) and its last fetch.
pub fn outcome_of(sched_error: Option<u64>, last_fetch: Option<FetchEnd>) -> &'static str {
    match sched_error {
        Some(NO_AVAILABLE_INSTANCE) => "no_instance",
        Some(NO_ROUTE_MAPPING) => "no_route",
        Some(REQUEST_BODY_TOO_LARGE) => "body_too_large",
        Some(REQUEST_FAILED_AFTER_RETRIES) => match last_fetch {
            Some(FetchEnd::ExecutionError) => "execution_error",
            _ => "retries_exhausted",
        },
        Some(_) => "internal_error",
        None => match last_fetch {
            Some(FetchEnd::Ok) => "ok",
            _ => "internal_error",
        },
    }
}
