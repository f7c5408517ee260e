//! Error types: one per layer, so callers can tell a broker problem from a handler problem.

use std::fmt;

/// A transport failure: the broker refused something, or the connection is gone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The broker rejected an operation (bad arguments, missing queue, access refused).
    #[error("broker refused: {0}")]
    Broker(String),
    /// The broker negatively confirmed a publish (e.g. a full queue with `reject-publish`).
    #[error("publish nacked by the broker")]
    Nacked,
    /// No connection could be (re-)established in time.
    #[error("not connected: {0}")]
    Disconnected(String),
    /// The operation did not finish in time (e.g. waiting for a confirm across reconnects).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The transport was closed by its owner.
    #[error("transport closed")]
    Closed,
}

/// An SDK-level error for sends and publishes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A mandatory publish reached no queue.
    #[error("no route to {0}")]
    NoRoute(String),
    /// The body could not be encoded.
    #[error("encode: {0}")]
    Encode(String),
    /// A builder was used in a way the pattern does not allow.
    #[error("invalid use: {0}")]
    Invalid(String),
}

/// Result alias for SDK calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a handler failed. Transient errors are retried by policy; permanent ones go to the DLQ at once.
#[derive(Debug, Clone)]
pub struct HandlerError {
    /// A short machine-readable category, recorded in the DLQ headers.
    pub kind: String,
    /// The human-readable message (trimmed when written into headers).
    pub message: String,
    /// Skip retries: retrying cannot help (bad input, business rule).
    pub permanent: bool,
}

impl HandlerError {
    /// A transient failure: the retry policy decides what happens next.
    pub fn transient(e: impl fmt::Display) -> Self {
        Self { kind: "transient".into(), message: e.to_string(), permanent: false }
    }
    /// A permanent failure: no retries, straight to the dead-letter queue (or a fault reply).
    pub fn permanent(e: impl fmt::Display) -> Self {
        Self { kind: "permanent".into(), message: e.to_string(), permanent: true }
    }
    /// Sets the category recorded in headers.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<Error> for HandlerError {
    /// SDK errors inside a handler (a failed `ctx.send`) are transient: the broker may come back.
    fn from(e: Error) -> Self {
        HandlerError::transient(e).with_kind("sdk")
    }
}
