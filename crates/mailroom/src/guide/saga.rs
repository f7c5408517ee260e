//! # Saga (orchestrated, with compensations)
//!
//! A [`Saga`](crate::saga::Saga) is an ordered list of steps, each a command sent to a service
//! (a [`responder`](crate::Bus::responder)) whose reply is awaited, with an optional compensating
//! command. When a step refuses, the steps before it are compensated in reverse order. The SDK
//! persists each instance with a version number in a [`SagaStore`](crate::saga::SagaStore) and
//! writes every transition (new state, its commands as outbox rows, a history line) atomically, so
//! a crashed orchestrator resumes from the store: a step not answered by its deadline is re-sent
//! with the same message id, a reply waiting in the durable reply queue is taken by the next one.
//!
//! Two stores: the embedded one ([`EmbeddedSagaStore`](crate::saga::EmbeddedSagaStore): a directory
//! with one fsynced log, no database) and PostgreSQL
//! ([`PgSagaStore`](crate::saga::PgSagaStore), feature `postgres`, through the
//! [`outbox`](crate::outbox) table so business rows can commit with it). Run the store's relay in
//! the orchestrator's process: it publishes the commands with confirms.
//!
//! Left to you: steps and compensations must be idempotent (a command can arrive twice with the
//! same id: give the service an [inbox](super::idempotent_consumer)), and a compensation must accept
//! "nothing to undo" (a timed-out step may never have run). A compensation that keeps failing
//! leaves the saga `Stuck`, logged at error level; operators list it and retry or abandon it with
//! [`SagaHandle`](crate::saga::SagaHandle), [`saga::ops`](crate::saga::ops) or the `mailroom saga`
//! command (`mailroom saga --store <dir> list --status stuck`, `history <id>`, `retry <id>`); the
//! running orchestrator picks a retry up at its next deadline scan.
//!
//! ```
//! use mailroom::saga::{Command, EmbeddedSagaStore, Saga, Status};
//! use mailroom::{Bus, Envelope, HandlerError};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { id: u32, cents: i64 }
//!
//! fn reserve(o: &Order) -> Command { Command::new("stock.reserve", serde_json::json!({ "order": o.id })) }
//! fn release(o: &Order) -> Command { Command::new("stock.release", serde_json::json!({ "order": o.id })) }
//! fn charge(o: &Order) -> Command { Command::new("payment.charge", serde_json::json!({ "cents": o.cents })) }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let mut services = Vec::new();
//! for q in ["stock.reserve", "stock.release"] {
//!     services.push(bus.responder(q).handle_request(|_: Envelope<serde_json::Value>, _| async { Ok(true) }).run().await?);
//! }
//! services.push(bus.responder("payment.charge")
//!     .handle_request(|c: Envelope<serde_json::Value>, _| async move {
//!         if c.body["cents"].as_i64() > Some(10_000) { return Err(HandlerError::permanent("declined")); }
//!         Ok(true)
//!     })
//!     .run().await?);
//!
//! # let dir = std::env::temp_dir().join(format!("mailroom-guide-saga-{}", std::process::id()));
//! let store = EmbeddedSagaStore::open(&dir)?;
//! let relay = store.relay(bus.clone()).run().await?;
//! let saga = Saga::<Order>::named("order")
//!     .step("reserve", reserve, Some(release))
//!     .step("charge", charge, None)
//!     .run_on(bus.clone(), store)
//!     .await?;
//! let id = saga.start(&Order { id: 7, cents: 99_000 }).await?;
//! while !saga.get(&id).await?.status.is_final() { tokio::time::sleep(Duration::from_millis(10)).await; }
//! assert_eq!(saga.get(&id).await?.status, Status::Failed); // declined, stock released
//! let history: Vec<String> = saga.history(&id).await?.into_iter().map(|h| h.event).collect();
//! assert_eq!(history.last().map(String::as_str), Some("reserve compensated; compensated"));
//! # saga.stop().await; relay.stop().await;
//! # for s in services { s.stop().await; }
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
