//! Mailroom's patterns SDK: typed envelopes and the messaging patterns, written once against a
//! [`Transport`] that is either the in-process broker ([`Embedded`], the default) or any AMQP 0-9-1
//! broker ([`Amqp`]: a Mailroom server or RabbitMQ, with reconnection).
//!
//! Delivery is at least once: the producer fixes the message id (UUIDv7) and retries, redeliveries and
//! redrive keep it, so an idempotent consumer ([`MemoryInbox`]) can drop duplicates.
//!
//! # Point-to-point and request-reply
//! ```
//! use mailroom::{Bus, Envelope, HandlerError};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Resize { width: u32 }
//! #[derive(Serialize, Deserialize)]
//! struct Resized { width: u32 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! // A worker pool: 4 handlers at once, 16 messages prefetched; failures dead-letter to `images.dlq`.
//! let worker = bus.worker("images").concurrency(4).prefetch(16)
//!     .handle(|job: Envelope<Resize>, _ctx| async move {
//!         if job.body.width == 0 { return Err(HandlerError::permanent("zero width")); }
//!         Ok(())
//!     })
//!     .run().await?;
//! bus.send("images", Resize { width: 640 }).await?;
//!
//! // Request-reply over direct reply-to, with a deadline.
//! let responder = bus.responder("resize")
//!     .handle_request(|job: Envelope<Resize>, _ctx| async move { Ok(Resized { width: job.body.width }) })
//!     .run().await?;
//! let done: Resized = bus.request("resize", Resize { width: 320 }).timeout(Duration::from_secs(5)).await?;
//! assert_eq!(done.width, 320);
//! # worker.stop().await; responder.stop().await;
//! # Ok(()) }
//! ```
//!
//! # Publish/subscribe, retries and dead letters
//! ```
//! use mailroom::{Bus, Envelope, HandlerError, RetryPolicy};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! // Each group has its own durable queue bound to the topic; a group's workers compete.
//! let billing = bus.subscribe("orders.*").group("billing")
//!     .retry(RetryPolicy::new().immediate(1).delayed(2)
//!         .backoff(Duration::from_millis(10), 2, Duration::from_millis(50)))
//!     .handle(|_e: Envelope<String>, _ctx| async { Err::<(), _>(HandlerError::transient("flaky")) })
//!     .run().await?;
//! bus.publish("orders.placed", "order-1".to_string()).await?;
//! // After 2 immediate attempts x 3 rounds the event lands in `billing.dlq`, error recorded in headers;
//! // `bus.redrive("billing.dlq")` sends it back with the same id.
//! # for _ in 0..200 { if bus.transport().message_count("billing.dlq").await? == 1 { break } tokio::time::sleep(Duration::from_millis(10)).await; }
//! # assert_eq!(bus.transport().message_count("billing.dlq").await?, 1);
//! # billing.stop().await;
//! # Ok(()) }
//! ```
//!
//! # Guides
//! [`guide`] has a guide per pattern (point-to-point, pub/sub, request-reply, scatter-gather,
//! retries and dead letters, filters, recipient lists, idempotent consumers, tracing), each with an
//! example that runs on the embedded broker.
//!
//! # Modules
//! - [`envelope`]: message metadata and its AMQP mapping; [`trace`]: `traceparent`.
//! - [`transport`]: the `Transport` trait, `Embedded` and `Amqp`.
//! - [`bus`]: send, publish, recipient lists, redrive; [`pipeline`]: workers and the fixed middleware slots.
//! - [`request`]: request-reply and scatter-gather; [`retry`], [`filter`], [`inbox`].
//! - [`partition`]: ordered processing per key (consistent-hash partitions, single active consumers).
//! - [`outbox`]: the transactional outbox on PostgreSQL and its relay (feature `postgres`); [`saga`]:
//!   event-driven sagas (typed state machines) and orchestrated sagas with compensations, on
//!   PostgreSQL or the embedded (file) store.
//! - [`sqlite`]: the transactional outbox and inbox on a SQLite file (feature `sqlite`).
#![warn(missing_docs)]

pub mod bus;
pub mod envelope;
pub mod error;
pub mod filter;
pub mod guide;
pub mod inbox;
#[cfg(feature = "otel")]
mod otel;
#[cfg(feature = "postgres")]
pub mod outbox;
pub mod partition;
pub mod pipeline;
pub mod relay;
mod replies;
pub mod request;
pub mod retry;
pub mod saga;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod trace;
pub mod transport;
pub mod wire;

pub use bus::{Bus, BusConfig, Context, Redriven, Unroutable};
pub use envelope::{Envelope, Message, MessageKind, Metadata, Payload, Raw};
pub use error::{Error, HandlerError, Result, ResultExt, TransportError};
pub use filter::{Filter, Headers};
#[cfg(feature = "postgres")]
pub use inbox::postgres::PgInbox;
pub use inbox::{Claim, InboxStore, MemoryInbox, UnitOfWork};
pub use pipeline::{Endpoint, Incoming, MetricsSnapshot, Middleware, Next, Outcome, Subscribe, WorkerHandle};
pub use request::{Fault, GatherError, Gathered, RequestError, Strategy, Target};
pub use retry::{Jitter, RetryPolicy};
#[cfg(feature = "embedded")]
pub use transport::Embedded;
pub use transport::Transport;
#[cfg(feature = "amqp")]
pub use transport::{Amqp, AmqpConfig};
