//! Typed broker errors. Each carries a kind that the wire layer maps to a reply code.

/// What went wrong, in the broker's own terms; the AMQP layer maps each to a reply code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A named queue, exchange or vhost does not exist (AMQP 404).
    NotFound,
    /// The caller may not do this: reserved names, internal exchanges, the default exchange (AMQP 403).
    AccessRefused,
    /// An exclusive queue belongs to another connection (AMQP 405).
    ResourceLocked,
    /// Arguments or state do not allow the operation: inequivalent redeclare, bad argument, not empty (AMQP 406).
    PreconditionFailed,
    /// An unknown exchange type (AMQP 503, closes the connection).
    CommandInvalid,
    /// Not allowed on this connection, e.g. an unknown vhost (AMQP 530, closes the connection).
    NotAllowed,
    /// A feature RabbitMQ does not implement either (AMQP 540, closes the connection).
    NotImplemented,
    /// The broker is out of a resource (AMQP 506).
    ResourceError,
    /// Credentials were rejected (AMQP 403 at connection level).
    AuthenticationFailed,
    /// The broker could not do what it must, e.g. save a definition to disk (AMQP 541, closes the
    /// connection).
    InternalError,
}

/// A broker error: a kind plus a human-readable reason, RabbitMQ-style.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BrokerError {
    /// The category, which decides the reply code.
    pub kind: ErrorKind,
    /// The reply text sent to the client.
    pub message: String,
}

impl BrokerError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    /// 404 NOT_FOUND.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// 403 ACCESS_REFUSED.
    pub fn access_refused(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AccessRefused, message)
    }
    /// 405 RESOURCE_LOCKED.
    pub fn locked(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceLocked, message)
    }
    /// 541 INTERNAL_ERROR (closes the connection).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InternalError, message)
    }
    /// 406 PRECONDITION_FAILED.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PreconditionFailed, message)
    }
}

/// Result alias for broker operations.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
