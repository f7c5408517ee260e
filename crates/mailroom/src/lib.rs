//! Mailroom's patterns SDK.
#![warn(missing_docs)]

pub mod envelope;
pub mod error;
pub mod trace;
pub mod transport;

pub use envelope::{Envelope, MessageKind, Metadata, Payload, Raw};
pub use error::{Error, HandlerError, Result, TransportError};
