//! # Point-to-point: a queue and a pool of competing workers
//!
//! [`Bus::send`](crate::Bus::send) puts a command on one queue and waits for the broker's confirm.
//! [`Bus::worker`](crate::Bus::worker) consumes that queue: `concurrency(n)` handlers run at once and
//! `prefetch(n)` bounds the unacked deliveries held by this worker. Start the same worker in several
//! processes and they compete: each message goes to exactly one of them (at least once: after a crash
//! the unacked message is redelivered, see [`idempotent_consumer`](super::idempotent_consumer)).
//!
//! The worker declares its durable queue and `<queue>.dlq` when it runs. A send to a queue nobody
//! declared fails with [`Error::NoRoute`](crate::Error::NoRoute) instead of vanishing (it is
//! published mandatory); declare it up front with [`Bus::declare_queue`](crate::Bus::declare_queue)
//! if senders may start first. A handler returns `Ok(())` to ack; an error goes to the retry policy
//! (default: none, so straight to the DLQ).
//!
//! ```
//! use mailroom::{Bus, Envelope, Error};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Thumbnail { image: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! bus.declare_queue("thumbnails").await?; // senders may start before the workers
//! bus.send("thumbnails", Thumbnail { image: "cat.png".into() }).await?;
//!
//! let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
//! let pool = bus.worker("thumbnails").concurrency(4).prefetch(8)
//!     .handle(move |job: Envelope<Thumbnail>, _ctx| {
//!         let done = done.clone();
//!         async move { done.send(job.body.image).ok(); Ok(()) }
//!     })
//!     .run().await?;
//! let image = tokio::time::timeout(Duration::from_secs(5), finished.recv()).await?;
//! assert_eq!(image.as_deref(), Some("cat.png"));
//!
//! // Unknown queues are an error, not a silent drop.
//! assert!(matches!(bus.send("no-such-queue", Thumbnail { image: "x".into() }).await, Err(Error::NoRoute(_))));
//! pool.stop().await; // finishes running handlers, then cancels the consumer
//! # Ok(()) }
//! ```
