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
    /// The transport's settings are unusable (an unsupported URL scheme, say).
    #[error("invalid configuration: {0}")]
    Config(String),
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
///
/// Like `anyhow::Error`, it does not implement [`std::error::Error`] itself, so that every error type
/// converts into it: `?` works in a handler on any `E: std::error::Error + Send + Sync + 'static` (a
/// transient failure, its source chain in the message). Mark errors retrying cannot fix with
/// [`ResultExt::permanent`] (`parse(&x).permanent()?`) or [`HandlerError::permanent`].
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
    #[must_use]
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }
    /// Marks it permanent (kept kind, no more retries).
    #[must_use]
    pub fn into_permanent(mut self) -> Self {
        if !self.permanent && self.kind == "transient" {
            self.kind = "permanent".into();
        }
        self.permanent = true;
        self
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Every error converts into a transient `HandlerError` (so `?` works in handlers), its `source()`
/// chain joined into the message. Possible because `HandlerError` is not itself a `std::error::Error`.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        HandlerError { kind: "transient".into(), message, permanent: false }
    }
}

/// `.permanent()` and `.transient()` on any `Result` whose error converts into a [`HandlerError`].
pub trait ResultExt<T> {
    /// Fails permanently: no retries, straight to the DLQ (bad input, broken business rule).
    fn permanent(self) -> Result<T, HandlerError>;
    /// Fails transiently with `kind` as the category recorded in the DLQ headers.
    fn kind(self, kind: &str) -> Result<T, HandlerError>;
}

impl<T, E: Into<HandlerError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(|e| e.into().into_permanent())
    }
    fn kind(self, kind: &str) -> Result<T, HandlerError> {
        self.map_err(|e| e.into().with_kind(kind))
    }
}

/// `?` on a `HandlerError` in a function returning `Box<dyn Error + Send + Sync>` (as anyhow allows).
impl From<HandlerError> for Box<dyn std::error::Error + Send + Sync> {
    fn from(e: HandlerError) -> Self {
        e.to_string().into()
    }
}

/// `?` on a `HandlerError` in a function returning `Box<dyn Error>` (a `main`, say).
impl From<HandlerError> for Box<dyn std::error::Error> {
    fn from(e: HandlerError) -> Self {
        e.to_string().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    fn parse(text: &str) -> Result<u32, HandlerError> {
        Ok(text.parse::<u32>()?)
    }

    #[test]
    fn question_mark_converts_any_error_transiently_with_its_chain() {
        let e = parse("x").unwrap_err();
        assert!(!e.permanent);
        assert_eq!(e.kind, "transient");
        let chained: HandlerError = Outer(std::io::Error::other("disk gone")).into();
        assert_eq!(chained.message, "outer: disk gone");
    }

    #[test]
    fn permanent_marks_any_result() {
        let r: Result<u32, HandlerError> = "x".parse::<u32>().permanent();
        let e = r.unwrap_err();
        assert!(e.permanent);
        assert_eq!(e.kind, "permanent");
        // Already a HandlerError: kept kind, now permanent.
        let r: Result<(), HandlerError> = Err(HandlerError::transient("t").with_kind("db"));
        let e = r.permanent().unwrap_err();
        assert!(e.permanent);
        assert_eq!(e.kind, "db");
        assert_eq!(Err::<(), _>(std::fmt::Error).kind("fmt").unwrap_err().kind, "fmt");
    }
}
