//! Workers and the handler pipeline.
//!
//! Slots, outer to inner, fixed: **tracing** (span `process <queue>`, `traceparent` continued),
//! **metrics**, **filter**, **dead-letter**, **retry**, **idempotency** (inbox), **user layers**
//! ([`Middleware`]), **decode**, **handler**. Built-ins are builder switches, not hand-stacked layers, so
//! retries always run inside the dead-letter slot (Watermill #580/#645: poison queue before retries).
//! Only the dispatcher settles a delivery: `Ack`, or publish (retry queue / DLQ) with a confirm and
//! then ack. It never rejects with requeue (no hot loops); if that publish fails it rejects without
//! requeue and the queue's dead-letter backstop moves the message to `<queue>.dlq`.
//!
//! One job per module: `middleware` (outcomes and user layers), `builder` (configuring a worker),
//! `handlers` (decode and the user's handler), `endpoint` (several message types on one queue),
//! `worker` (running and stopping), `topology` (retry and subscription declarations),
//! `dispatch` (the slots and settling), `metrics` (counters).

mod builder;
mod dispatch;
mod endpoint;
mod handlers;
mod metrics;
mod middleware;
mod topology;
mod worker;

pub use builder::{Subscribe, WorkerBuilder};
pub use endpoint::Endpoint;
pub use metrics::{Metrics, MetricsSnapshot};
pub use middleware::{Incoming, Middleware, Next, Outcome};
pub use worker::{Worker, WorkerHandle};
