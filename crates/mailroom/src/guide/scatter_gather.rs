//! # Scatter-gather
//!
//! [`Bus::scatter`](crate::Bus::scatter)`(target, req)` sends one request to every recipient and
//! gathers replies with a [`Strategy`](crate::Strategy) before a deadline:
//! `All`, `FirstN(n)`, `Quorum(k)` or `UntilDeadline`. The result, [`Gathered`](crate::Gathered),
//! lists the replies and faults by responder, the known recipients that did not answer (`missing`)
//! and whether the strategy was met (`complete`). A deadline returns the partial result; only an unmet
//! quorum is an error ([`GatherError::QuorumNotMet`](crate::GatherError::QuorumNotMet)), and it
//! carries the partial result too.
//!
//! Targets are a list of queues ([`Target::Queues`](crate::Target::Queues): known recipients) or a
//! topic ([`Target::Topic`](crate::Target::Topic): whoever subscribed, so only `FirstN` and
//! `UntilDeadline` make sense; the others are rejected).
//!
//! ```
//! use mailroom::{Bus, Envelope, Strategy, Target};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let mut shards = Vec::new();
//! for (shard, delay_ms) in [("shard-a", 5), ("shard-b", 10), ("shard-slow", 1_000)] {
//!     shards.push(bus.responder(shard)
//!         .handle_request(move |q: Envelope<String>, _ctx| async move {
//!             tokio::time::sleep(Duration::from_millis(delay_ms)).await;
//!             Ok(format!("{shard} found {}", q.body))
//!         })
//!         .run().await?);
//! }
//! let target = Target::Queues(vec!["shard-a".into(), "shard-b".into(), "shard-slow".into()]);
//! let hits = bus.scatter::<String, _>(target, "rust".to_string())
//!     .gather(Strategy::All)
//!     .deadline(Duration::from_millis(300))
//!     .await?;
//! assert!(!hits.complete);
//! assert_eq!(hits.replies.len(), 2);
//! assert_eq!(hits.missing, ["shard-slow"]);
//! # for s in shards { s.stop().await; }
//! # Ok(()) }
//! ```
