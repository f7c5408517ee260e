//! # Idempotent consumer
//!
//! Delivery is at least once: a handler that crashed before its ack, a lost confirm or a redrive all
//! bring a message back, with the same message id (the producer fixes it; retries, redeliveries and
//! redrive keep it). [`WorkerBuilder::idempotent`](crate::pipeline::WorkerBuilder::idempotent) gives the
//! worker a processed-id store keyed by (consumer, message id): an id already processed is acked and
//! counted as a duplicate without running the handler, and two copies handled at once are serialised
//! so only one runs.
//!
//! [`MemoryInbox`](crate::MemoryInbox) marks an id after the handler succeeded: a crash between the
//! handler's effect and the mark can repeat the effect once. [`PgInbox`](crate::inbox::postgres::PgInbox)
//! (feature `postgres`, on by default) closes that window for handlers that write to PostgreSQL: the
//! `inbox(consumer, message_id)` row is inserted in a transaction the handler joins with
//! [`ctx.tx()`](crate::Context::tx), and the pipeline commits both only when the handler succeeded:
//! an exactly-once effect. Keep ids longer than any redelivery horizon (the default retention is
//! 7 days, which covers delayed retries and a redrive within a week); `PgInbox::spawn_purger`
//! deletes older ones.
//!
//! ```
//! use mailroom::{Bus, Envelope, MemoryInbox};
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let charged = Arc::new(AtomicU32::new(0));
//! let c = charged.clone();
//! let payments = bus.worker("payments")
//!     .idempotent(Arc::new(MemoryInbox::default()))
//!     .handle(move |_p: Envelope<u64>, _ctx| {
//!         c.fetch_add(1, Ordering::SeqCst);
//!         async { Ok(()) }
//!     })
//!     .run().await?;
//! let payment = Envelope::command(4_200u64);
//! bus.send_envelope("payments", payment.clone()).await?;
//! bus.send_envelope("payments", payment).await?; // the same message again (same id)
//! while payments.metrics().received < 2 { tokio::time::sleep(Duration::from_millis(10)).await; }
//! # tokio::time::sleep(Duration::from_millis(20)).await;
//! assert_eq!(charged.load(Ordering::SeqCst), 1);
//! assert_eq!(payments.metrics().duplicates, 1);
//! # payments.stop().await;
//! # Ok(()) }
//! ```
