//! # Message filter
//!
//! [`WorkerBuilder::filter`](crate::pipeline::WorkerBuilder::filter) keeps only the messages a
//! [`Filter`](crate::Filter) accepts. On a subscription, header equalities
//! ([`Headers::eq`](crate::Headers::eq)) become a headers-exchange binding (`x-match: all`) between the
//! topic exchange and the group's queue, so unwanted events never reach the queue at all. Anything else
//! ([`Filter::predicate`](crate::Filter::predicate), or any filter on a point-to-point worker) is checked
//! in process: a rejected message is acked and counted in the worker's `filtered` metric. Topic
//! patterns (`orders.eu.*`) filter by routing key and need no filter at all.
//!
//! ```
//! use mailroom::{Bus, Envelope, Headers};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
//! let eu = bus.subscribe("orders.*").group("eu-tax")
//!     .filter(Headers::eq("region", "eu"))
//!     .handle(move |e: Envelope<u32>, _ctx| {
//!         let tx = tx.clone();
//!         async move { tx.send(e.body).ok(); Ok(()) }
//!     })
//!     .run().await?;
//! for (order, region) in [(1, "us"), (2, "eu"), (3, "apac")] {
//!     bus.publish_envelope("orders.placed", Envelope::event(order).with_header("region", region)).await?;
//! }
//! let first = tokio::time::timeout(Duration::from_secs(5), got.recv()).await?;
//! assert_eq!(first, Some(2));
//! tokio::time::sleep(Duration::from_millis(50)).await;
//! assert!(got.try_recv().is_err(), "nothing else arrived");
//! assert_eq!(eu.metrics().filtered, 0, "filtered by the broker binding, not in process");
//! # eu.stop().await;
//! # Ok(()) }
//! ```
