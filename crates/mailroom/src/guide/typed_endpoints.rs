//! # Typed endpoints: several message types on one queue, handler errors, shared state
//!
//! An endpoint is a worker whose queue carries several message types. Each type implements
//! [`Message`](crate::Message) with an explicit, stable `NAME` (it goes into the AMQP `type`
//! property); [`Bus::endpoint`](crate::Bus::endpoint)`(queue).on(handler_a).on(handler_b)` registers a
//! handler per type, and each delivery goes to the handler for its `type`. Send with
//! [`Bus::send_message`](crate::Bus::send_message) / [`Context::send_message`](crate::Context::send_message)
//! (or any client that sets `type`), so the name is on the wire.
//!
//! Handlers return `Result<(), HandlerError>`. [`HandlerError`](crate::HandlerError) converts from
//! every `std::error::Error`, like `anyhow::Error`, so `?` works on any error (a *transient* failure:
//! the retry policy runs); [`ResultExt::permanent`](crate::ResultExt::permanent) marks a failure retrying
//! cannot fix (bad input), which goes to the DLQ at once. Shared state (a pool, a cache) is set once
//! with [`WorkerBuilder::state`](crate::pipeline::WorkerBuilder::state) and read with
//! [`Context::state`](crate::Context::state): no `Arc` cloned twice around every closure.
//!
//! Pitfalls this avoids (from other toolkits' trackers):
//! - **Unknown types crash or loop.** A message whose `type` has no handler is not decoded as some
//!   other type and never requeued: it goes to `<queue>.dlq` with error kind `unknown-type` and a reason
//!   naming its type and the handled ones (Watermill #184: an undecodable message nacked before any
//!   middleware could dead-letter it; amqplib #293: requeue hot loops).
//! - **Names that drift.** `std::any::type_name` changes when a struct moves or a crate is renamed, and
//!   two crates can have a `PlaceOrder`; `NAME` is yours to keep stable (version it: `….v1`), and an
//!   endpoint with two handlers for one name refuses to start.
//! - **Retrying the unretryable.** Validation failures retried with backoff only delay the DLQ and load
//!   the broker: mark them `.permanent()` (one policy, counted in a header, DLQ at the end: no fault
//!   per retry as in MassTransit #4458).
//! - **Decode errors are permanent.** A body that does not decode as the registered type goes straight
//!   to the DLQ (kind `decode`), without retries.
//!
//! ```
//! use mailroom::{Bus, Envelope, Message, ResultExt};
//! use serde::{Deserialize, Serialize};
//! use std::sync::Mutex;
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct PlaceOrder { sku: String }
//! impl Message for PlaceOrder { const NAME: &'static str = "shop.place-order.v1"; }
//!
//! #[derive(Serialize, Deserialize)]
//! struct CancelOrder { order: u32 }
//! impl Message for CancelOrder { const NAME: &'static str = "shop.cancel-order.v1"; }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Unexpected { what: String }
//! impl Message for Unexpected { const NAME: &'static str = "shop.unexpected.v1"; }
//!
//! #[derive(Default)]
//! struct Orders { open: Mutex<Vec<u32>> }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let endpoint = bus.endpoint("orders")
//!     .state(Orders::default())
//!     .on(|m: Envelope<PlaceOrder>, ctx| async move {
//!         let n: u32 = m.body.sku.parse().permanent()?; // bad input: DLQ, no retries
//!         ctx.state::<Orders>()?.open.lock().unwrap().push(n);
//!         Ok(())
//!     })
//!     .on(|m: Envelope<CancelOrder>, ctx| async move {
//!         ctx.state::<Orders>()?.open.lock().unwrap().retain(|o| *o != m.body.order);
//!         Ok(())
//!     })
//!     .run().await?;
//! bus.send_message("orders", PlaceOrder { sku: "7".into() }).await?;
//! bus.send_message("orders", CancelOrder { order: 7 }).await?;
//! bus.send_message("orders", Unexpected { what: "?".into() }).await?; // no handler: to the DLQ
//! while bus.transport().message_count("orders.dlq").await? == 0 || endpoint.metrics().ok < 2 {
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! let mut dead = bus.transport().get("orders.dlq").await?.expect("the unknown type");
//! let meta = mailroom::Metadata::from_properties(&dead.properties);
//! assert_eq!(meta.header(mailroom::envelope::headers::ERROR_KIND), Some("unknown-type"));
//! dead.ack().await?;
//! # endpoint.stop().await;
//! # Ok(()) }
//! ```
