//! # Ordered processing per key
//!
//! Messages of one key (an order, an account, a device) handled strictly in the order they were sent,
//! one at a time, while different keys run in parallel across any number of worker processes: what SQS
//! FIFO calls message groups and Azure Service Bus calls sessions. [`Bus::partitioned`](crate::Bus::partitioned)`(name, n)`
//! sets up `n` partitions (fixed at setup) behind a consistent-hash exchange; [`Bus::send_keyed`](crate::Bus::send_keyed)`(name, key, msg)`
//! routes by the key; every worker process runs the same `partitioned(..).handle(..).run()` and the
//! broker gives each partition to one of them at a time (single-active-consumer queues), so a crash or
//! a new worker never runs two messages of one key at once. How it works and what it costs:
//! [`crate::partition`].
//!
//! Needs the `x-consistent-hash` exchange: built into Mailroom (embedded and server); on RabbitMQ
//! enable `rabbitmq_consistent_hash_exchange` (on every node of a cluster).
//!
//! Pitfalls:
//! - **Delayed retries reorder.** A message waiting out a backoff is overtaken by the next one of its
//!   key, so a keyed worker refuses delayed retries; immediate retries are fine, then the DLQ (the key
//!   moves on: decide whether the rest of its messages still make sense).
//! - **Changing the partition count moves keys** to other partitions, where they could overtake
//!   messages still waiting in the old one: drain (stop publishing, let every partition empty, stop
//!   the workers), then rebind with the new count, then restart.
//! - **Ordering is per key, not global**, and only for one producer's order of sends: two producers
//!   sending for one key at once have no order between them to keep.
//! - **At-least-once still holds**: the message a crashed worker was handling comes again (first, before
//!   the next of its key). Make handlers idempotent or use the inbox.
//! - A handler must not outlive its connection (a handler still running after its worker lost the
//!   broker would overlap with the worker that takes over).
//!
//! ```
//! use mailroom::{Bus, Envelope};
//! use serde::{Deserialize, Serialize};
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Deposit { account: String, seq: u32 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = Arc::clone(&seen);
//! let workers = bus.partitioned("deposits", 4)
//!     .handle(move |d: Envelope<Deposit>, _ctx| {
//!         log.lock().unwrap().push((d.body.account.clone(), d.body.seq));
//!         async { Ok(()) }
//!     })
//!     .run().await?;
//! for seq in 0..5 {
//!     for account in ["alice", "bob", "carol"] {
//!         bus.send_keyed("deposits", account, Deposit { account: account.into(), seq }).await?;
//!     }
//! }
//! while workers.metrics().ok < 15 { tokio::time::sleep(Duration::from_millis(5)).await; }
//! let seen = seen.lock().unwrap();
//! for account in ["alice", "bob", "carol"] {
//!     let order: Vec<u32> = seen.iter().filter(|(a, _)| a == account).map(|(_, s)| *s).collect();
//!     assert_eq!(order, [0, 1, 2, 3, 4]); // each account's deposits in order
//! }
//! # drop(seen); workers.stop().await;
//! # Ok(()) }
//! ```
