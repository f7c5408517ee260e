//! Guides, one per pattern: what the SDK does for you, what it leaves to you, and a short example
//! that runs (as a doctest) on the embedded broker. Swap `Bus::embedded()` for
//! `Bus::new(Amqp::connect_url("amqp://…").await?)` to run the same code against a Mailroom server or
//! RabbitMQ.
//!
//! | pattern | guide |
//! |---|---|
//! | point-to-point, competing consumers | [`point_to_point`] |
//! | typed endpoints (several message types), handler errors, shared state | [`typed_endpoints`] |
//! | publish/subscribe with subscriber groups | [`publish_subscribe`] |
//! | request-reply | [`request_reply`] |
//! | scatter-gather | [`scatter_gather`] |
//! | retries, dead letters, redrive | [`retry_dead_letter`] |
//! | ordered processing per key (partitions, single active consumer) | [`ordered_per_key`] |
//! | message filter | [`message_filter`] |
//! | recipient list | [`recipient_list`] |
//! | idempotent consumer | [`idempotent_consumer`] |
//! | outbox and inbox on SQLite (feature `sqlite`) | `sqlite_outbox` |
//! | message tracking (`traceparent`) | [`tracing`] |
//! | saga with compensations, operators' retry/abandon | [`saga`] |
//! | saga as an event-driven state machine (events, replies, timers) | [`event_driven_saga`] |

pub mod event_driven_saga;
pub mod idempotent_consumer;
pub mod message_filter;
pub mod ordered_per_key;
pub mod point_to_point;
pub mod publish_subscribe;
pub mod recipient_list;
pub mod request_reply;
pub mod retry_dead_letter;
pub mod saga;
pub mod scatter_gather;
#[cfg(feature = "sqlite")]
pub mod sqlite_outbox;
pub mod tracing;
pub mod typed_endpoints;
