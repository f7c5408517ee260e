//! # Publish/subscribe: topics and subscriber groups
//!
//! [`Bus::publish`](crate::Bus::publish) sends an event to a topic (a routing key on the bus's topic
//! exchange, `mailroom.events` by default); nobody subscribing is fine. A subscriber group is a named
//! durable queue bound to topic patterns (`orders.*` one word, `orders.#` any number):
//! [`Bus::subscribe`](crate::Bus::subscribe)`(pattern).group(name)`. Every group gets its own copy of
//! each event, and the workers of one group compete for it, so a group scales out by running more
//! workers and keeps receiving events while they are all offline (the queue holds them).
//!
//! Name groups after the service that owns them (`billing`, `shipping`): two deployments of billing
//! share the queue; renaming the group creates a new, empty queue.
//!
//! ```
//! use mailroom::{Bus, Envelope};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order: u32 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
//! let mut groups = Vec::new();
//! for group in ["billing", "shipping"] {
//!     let tx = tx.clone();
//!     groups.push(bus.subscribe("orders.*").group(group)
//!         .handle(move |e: Envelope<OrderPlaced>, _ctx| {
//!             let tx = tx.clone();
//!             async move { tx.send((group, e.body.order)).ok(); Ok(()) }
//!         })
//!         .run().await?);
//! }
//! bus.publish("orders.placed", OrderPlaced { order: 7 }).await?;
//! let mut seen = Vec::new();
//! for _ in 0..2 {
//!     seen.push(tokio::time::timeout(Duration::from_secs(5), got.recv()).await?.unwrap());
//! }
//! seen.sort();
//! assert_eq!(seen, [("billing", 7), ("shipping", 7)]); // one copy per group
//! # for g in groups { g.stop().await; }
//! # Ok(()) }
//! ```
