//! # Message tracking: `traceparent` and spans
//!
//! Every send and publish carries a W3C `traceparent` header: a new trace when the caller has none,
//! the flow's trace otherwise. A worker runs each handler in a `process` span whose parent is the
//! incoming `traceparent`, and sends made through the handler's [`Context`](crate::Context)
//! (`ctx.send`, `ctx.publish`, replies) continue that trace as children and carry the flow's
//! correlation id, with the incoming message as their causation. So one business flow keeps one
//! trace id across send → handle → publish → handle. Spans are [`tracing`](https://docs.rs/tracing)
//! spans named `send` and `process`, with `messaging.destination`, `messaging.message.id` and
//! `trace_id` fields; install any `tracing` subscriber (or an OpenTelemetry layer) to see them.
//!
//! **OpenTelemetry** (feature `otel`): install a `tracing-opentelemetry` layer with your tracer and
//! the spans join up in any OTel backend — a `send` span is the child of the span that sent (or of the
//! message's `traceparent`), the `traceparent` it writes names it, and the consumer's `process` span is
//! its child, so send → broker → handle → publish → handle is one trace with each hop under the last.
//! Pitfall: commands a saga or an outbox relay publishes carry the `traceparent` stamped when they were
//! enqueued (same trace, parent = the handler that enqueued them), not a `send` span of the relay.
//!
//! Only the correlation id, causation and trace travel on: retry counts and failure headers of the
//! incoming message do not leak into what a handler sends.
//!
//! **Per-handler metrics.** Every worker counts received, handled, failed, retried, dead-lettered,
//! filtered and duplicate deliveries and their handling time ([`WorkerHandle::metrics`](crate::WorkerHandle::metrics)).
//! With the `metrics` feature the same numbers go to the [`metrics`](https://docs.rs/metrics) facade as
//! `mailroom_handler_received_total`, `…_handled_total`, `…_failed_total`, `…_retried_total`,
//! `…_dead_lettered_total`, `…_filtered_total`, `…_duplicates_total` and the histogram
//! `mailroom_handler_duration_seconds`, labelled `queue` and `handler`; install the recorder you export
//! with (Prometheus, StatsD, OpenTelemetry) before starting workers (handles are registered when a
//! worker starts). A retry counts once in `failed` per failed attempt and once in `retried` per retry
//! scheduled, and the DLQ once at the end: no fault per retry (MassTransit #4458).
//!
//! ```
//! use mailroom::{Bus, Envelope};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let (tx, mut traces) = tokio::sync::mpsc::unbounded_channel();
//! let tx2 = tx.clone();
//! // send -> handle (then publish) -> handle
//! let orders = bus.worker("place-order")
//!     .handle(move |cmd: Envelope<u32>, ctx| {
//!         let tx = tx.clone();
//!         async move {
//!             tx.send(ctx.trace().trace_id_hex()).ok();
//!             ctx.publish("orders.placed", cmd.body).await.map_err(mailroom::HandlerError::transient)?;
//!             Ok(())
//!         }
//!     })
//!     .run().await?;
//! let audit = bus.subscribe("orders.*").group("audit")
//!     .handle(move |evt: Envelope<u32>, ctx| {
//!         tx2.send(ctx.trace().trace_id_hex()).ok();
//!         assert!(evt.causation_id.is_some()); // caused by the command
//!         async { Ok(()) }
//!     })
//!     .run().await?;
//! bus.send("place-order", 42u32).await?;
//! let first = tokio::time::timeout(Duration::from_secs(5), traces.recv()).await?.unwrap();
//! let second = tokio::time::timeout(Duration::from_secs(5), traces.recv()).await?.unwrap();
//! assert_eq!(first, second, "one trace id for the whole flow");
//! # orders.stop().await; audit.stop().await;
//! # Ok(()) }
//! ```
