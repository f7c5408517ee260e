//! AMQP errors: a reply code, its text, the method that caused it, and whether it closes the connection.

use crate::codec::MethodId;
use mailroom_broker::client_input::InputError;
use mailroom_broker::{BrokerError, ErrorKind};

/// AMQP 0-9-1 reply codes used by the server.
pub mod code {
    /// Normal closure.
    pub const REPLY_SUCCESS: u16 = 200;
    /// Mandatory message could not be routed.
    pub const NO_ROUTE: u16 = 312;
    /// The broker closed the connection (e.g. shutdown).
    pub const CONNECTION_FORCED: u16 = 320;
    /// Access refused.
    pub const ACCESS_REFUSED: u16 = 403;
    /// Entity not found.
    pub const NOT_FOUND: u16 = 404;
    /// Exclusive resource locked by another connection.
    pub const RESOURCE_LOCKED: u16 = 405;
    /// Precondition failed.
    pub const PRECONDITION_FAILED: u16 = 406;
    /// Malformed frame.
    pub const FRAME_ERROR: u16 = 501;
    /// Malformed method arguments.
    pub const SYNTAX_ERROR: u16 = 502;
    /// Invalid command.
    pub const COMMAND_INVALID: u16 = 503;
    /// Channel not open, or opened twice.
    pub const CHANNEL_ERROR: u16 = 504;
    /// A frame arrived where another kind was expected.
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// Out of a resource.
    pub const RESOURCE_ERROR: u16 = 506;
    /// Not allowed.
    pub const NOT_ALLOWED: u16 = 530;
    /// Not implemented.
    pub const NOT_IMPLEMENTED: u16 = 540;
    /// Internal error.
    pub const INTERNAL_ERROR: u16 = 541;

    /// The symbolic name RabbitMQ prefixes reply texts with.
    pub fn name(code: u16) -> &'static str {
        match code {
            200 => "OK",
            312 => "NO_ROUTE",
            320 => "CONNECTION_FORCED",
            403 => "ACCESS_REFUSED",
            404 => "NOT_FOUND",
            405 => "RESOURCE_LOCKED",
            406 => "PRECONDITION_FAILED",
            501 => "FRAME_ERROR",
            502 => "SYNTAX_ERROR",
            503 => "COMMAND_INVALID",
            504 => "CHANNEL_ERROR",
            505 => "UNEXPECTED_FRAME",
            506 => "RESOURCE_ERROR",
            530 => "NOT_ALLOWED",
            540 => "NOT_IMPLEMENTED",
            _ => "INTERNAL_ERROR",
        }
    }
}

/// An error answered with `channel.close` or `connection.close`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {text}")]
pub struct AmqpError {
    /// The reply code.
    pub code: u16,
    /// The reply text, RabbitMQ-style ("NOT_FOUND - no queue 'q' in vhost '/'").
    pub text: String,
    /// Class id of the method that failed (0 if none).
    pub class_id: u16,
    /// Method id of the method that failed (0 if none).
    pub method_id: u16,
    /// Closes the whole connection rather than one channel.
    pub connection: bool,
}

impl AmqpError {
    /// A channel-level error.
    pub fn channel(code: u16, reason: impl AsRef<str>) -> Self {
        Self::build(code, reason.as_ref(), false)
    }
    /// A connection-level error.
    pub fn connection(code: u16, reason: impl AsRef<str>) -> Self {
        Self::build(code, reason.as_ref(), true)
    }
    fn build(code: u16, reason: &str, connection: bool) -> Self {
        Self { code, text: format!("{} - {reason}", code::name(code)), class_id: 0, method_id: 0, connection }
    }
    /// Records the method that caused the error.
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }
    /// Records the method that caused the error, by name.
    pub fn at(self, method: MethodId) -> Self {
        self.on(method.class, method.method)
    }
}

impl From<BrokerError> for AmqpError {
    fn from(e: BrokerError) -> Self {
        let (code, connection) = match e.kind {
            ErrorKind::NotFound => (code::NOT_FOUND, false),
            ErrorKind::AccessRefused => (code::ACCESS_REFUSED, false),
            ErrorKind::ResourceLocked => (code::RESOURCE_LOCKED, false),
            ErrorKind::PreconditionFailed => (code::PRECONDITION_FAILED, false),
            ErrorKind::ResourceError => (code::RESOURCE_ERROR, false),
            ErrorKind::CommandInvalid => (code::COMMAND_INVALID, true),
            ErrorKind::NotAllowed => (code::NOT_ALLOWED, true),
            ErrorKind::NotImplemented => (code::NOT_IMPLEMENTED, true),
            ErrorKind::AuthenticationFailed => (code::ACCESS_REFUSED, true),
            ErrorKind::InternalError => (code::INTERNAL_ERROR, true),
        };
        Self::build(code, &e.message, connection)
    }
}

impl From<InputError> for AmqpError {
    fn from(e: InputError) -> Self {
        BrokerError::from(e).into()
    }
}
