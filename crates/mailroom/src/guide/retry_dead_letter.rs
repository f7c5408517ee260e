//! # Retries, dead letters and redrive
//!
//! A handler error is retried by the worker's [`RetryPolicy`](crate::RetryPolicy): `immediate(n)`
//! attempts in process, then `delayed(n)` rounds through the broker with exponential backoff
//! (`backoff(base, factor, cap)`) and jitter, each round running the immediate attempts again. Then
//! the message goes to `<queue>.dlq` with the error, its kind, the attempt count, the first and last
//! failure times, the source queue and the handler recorded in `x-mailroom-*` headers
//! ([`envelope::headers`](crate::envelope::headers)). [`HandlerError::permanent`](crate::HandlerError::permanent)
//! and undecodable bodies skip the retries. [`Bus::redrive`](crate::Bus::redrive) moves a DLQ's messages
//! back to their source queue with the same message id and the attempt count reset.
//!
//! Redrive never loses a dead letter, and where the broker is Mailroom it runs inside the broker:
//!
//! - **Server-side on Mailroom.** On the embedded broker, and on a Mailroom server reached over AMQP
//!   whose HTTP API the transport knows ([`AmqpConfig::management_url`](crate::AmqpConfig::management_url),
//!   `http://host:15672`), the broker moves the dead letters a worker wrote to `<queue>.dlq` back to
//!   `<queue>` itself (`POST /api/queues/{vhost}/{dlq}/redrive` on a server): no message crosses the
//!   network, and each is removed from the DLQ only once its copy is enqueued (on disk, for a durable
//!   queue). The copy keeps its headers; the worker sees the dead-letter mark
//!   (`x-mailroom-dead-lettered`) and starts its attempts afresh. [`Redriven::server_side`](crate::Redriven::server_side)
//!   counts them.
//! - **Client-side elsewhere.** On RabbitMQ (no redrive endpoint), on a Mailroom server without a
//!   management URL, and for dead letters a worker did not write (the queue's dead-letter backstop,
//!   messages put there by hand), the bus takes each with `basic.get`, publishes it with `mandatory`
//!   and a confirm, and acks the dead letter only then.
//!
//! The SDK speaks to the HTTP API with one plain HTTP/1.1 request of its own, not an HTTP client
//! crate: only `http://` (no TLS stack for it); an API that is unreachable or refuses the login is
//! logged and the redrive runs client-side. If the target queue was deleted (a renamed worker, a
//! removed group), the dead letter stays in the DLQ, untouched, either way:
//! [`Bus::redrive_report`](crate::Bus::redrive_report) lists those (a plain publish would have been
//! confirmed and dropped, and the ack would have deleted the only copy). Redrive a DLQ of a queue that
//! moved by re-creating the queue first, or by reading the DLQ yourself.
//!
//! Delayed rounds use the broker's delayed-message exchange when it has one (Mailroom, embedded or
//! server: the message waits in `mailroom.delayed` with an `x-delay` header), and TTL queues
//! `<queue>.retry.<n>` that dead-letter back to the queue where it has not (RabbitMQ without the
//! plugin). The message id stays the same throughout, so an idempotent consumer recognises it.
//!
//! ```
//! use mailroom::{Bus, Envelope, HandlerError, RetryPolicy};
//! use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let database_up = Arc::new(AtomicBool::new(false));
//! let attempts = Arc::new(AtomicU32::new(0));
//! let (up, n) = (database_up.clone(), attempts.clone());
//! let worker = bus.worker("invoices")
//!     .retry(RetryPolicy::new().immediate(1).delayed(2)
//!         .backoff(Duration::from_millis(10), 2, Duration::from_millis(40)))
//!     .handle(move |_inv: Envelope<String>, _ctx| {
//!         n.fetch_add(1, Ordering::SeqCst);
//!         let up = up.load(Ordering::SeqCst);
//!         async move { if up { Ok(()) } else { Err(HandlerError::transient("database down")) } }
//!     })
//!     .run().await?;
//! bus.send("invoices", "invoice-7".to_string()).await?;
//!
//! // (1 + 1 immediate) attempts x (1 + 2 delayed rounds) = 6, then the DLQ.
//! while bus.transport().message_count("invoices.dlq").await? == 0 {
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! assert_eq!(attempts.load(Ordering::SeqCst), 6);
//!
//! database_up.store(true, Ordering::SeqCst);
//! let report = bus.redrive_report("invoices.dlq").await?; // same id, back to `invoices`
//! assert_eq!((report.moved, report.server_side), (1, 1)); // moved by the embedded broker itself
//! while worker.metrics().ok == 0 { tokio::time::sleep(Duration::from_millis(10)).await; }
//! # worker.stop().await;
//! # Ok(()) }
//! ```
//!
//! A dead letter whose source queue is gone stays put:
//!
//! ```
//! use mailroom::{Bus, Envelope};
//! use mailroom::envelope::headers::SOURCE_QUEUE;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! bus.declare_queue("reports").await?;
//! // A dead letter from a queue that has since been deleted.
//! bus.send_envelope("reports.dlq", Envelope::command("r-1".to_string()).with_header(SOURCE_QUEUE, "old-reports")).await?;
//! let report = bus.redrive_report("reports.dlq").await?;
//! assert_eq!(report.moved, 0);
//! assert_eq!(report.unroutable[0].target, "old-reports");
//! assert_eq!(bus.transport().message_count("reports.dlq").await?, 1); // still there
//! # Ok(()) }
//! ```
