//! Mailroom's patterns SDK.
#![warn(missing_docs)]

pub mod bus;
pub mod envelope;
pub mod error;
pub mod filter;
pub mod inbox;
pub mod pipeline;
pub mod request;
pub mod retry;
pub mod trace;
pub mod transport;

pub use bus::{Bus, BusConfig, Context};
pub use envelope::{Envelope, MessageKind, Metadata, Payload, Raw};
pub use error::{Error, HandlerError, Result, TransportError};
pub use filter::{Filter, Headers};
pub use inbox::{InboxStore, MemoryInbox};
pub use pipeline::{Incoming, Middleware, MetricsSnapshot, Next, Outcome, WorkerHandle};
pub use request::{Fault, Gathered, GatherError, RequestError, Strategy, Target};
pub use retry::{Jitter, RetryPolicy};
pub use transport::{Amqp, AmqpConfig, Embedded, Transport};
