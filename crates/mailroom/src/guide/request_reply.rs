//! # Request-reply
//!
//! [`Bus::request`](crate::Bus::request)`(queue, req).timeout(d).await` returns the typed reply or a
//! [`RequestError`](crate::RequestError): `Timeout`, `Remote(Fault)` (the responder's handler failed
//! and said so), `NoRoute` (no queue by that name) or `Transport`. The SDK sets the correlation id and
//! the return address (RabbitMQ's direct reply-to: one reply consumer per bus, no reply queue to
//! declare), keeps many requests in flight on one connection, and drops (and counts,
//! [`Bus::late_replies`](crate::Bus::late_replies)) replies that arrive after their caller gave up. The
//! request expires on the broker with its deadline, so nobody works on it after the caller stopped
//! waiting.
//!
//! A responder is a worker whose handler returns the reply: [`Bus::responder`](crate::Bus::responder)
//! with [`handle_request`](crate::pipeline::WorkerBuilder::handle_request). Requests are not durable
//! across a requester's restart; when the answer must survive a crash, use commands and events (or
//! a saga) instead.
//!
//! ```
//! use mailroom::{Bus, Envelope, HandlerError, RequestError};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Quote { item: String }
//! #[derive(Serialize, Deserialize)]
//! struct Price { cents: u64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let pricing = bus.responder("pricing")
//!     .handle_request(|q: Envelope<Quote>, _ctx| async move {
//!         match q.body.item.as_str() {
//!             "tea" => Ok(Price { cents: 350 }),
//!             other => Err(HandlerError::permanent(format!("no price for {other}"))),
//!         }
//!     })
//!     .run().await?;
//!
//! let price: Price = bus.request("pricing", Quote { item: "tea".into() })
//!     .timeout(Duration::from_secs(5)).await?;
//! assert_eq!(price.cents, 350);
//!
//! let fault = bus.request::<Price, _>("pricing", Quote { item: "gold".into() }).await;
//! assert!(matches!(fault, Err(RequestError::Remote(f)) if f.message == "no price for gold"));
//! let nobody = bus.request::<Price, _>("quotes-v2", Quote { item: "tea".into() }).await;
//! assert!(matches!(nobody, Err(RequestError::NoRoute(_))));
//! # pricing.stop().await;
//! # Ok(()) }
//! ```
